"""CUTS (unsupervised) against the simplest label-free baselines and supervised training at a few labels, on
Kvasir-SEG polyps and ACDC (left-ventricle cavity as the binary target): results/cuts.json + RESULTS.md.

    python benchmarks/cuts.py [--datasets polyp acdc] [--images 100]

Per dataset: CUTS stage 1 from its recipe (label-free, every train image, no mask read; the checkpoint of lowest
loss on the val images, ``select: val_loss``, scored every quarter of the run), then per test image diffusion
condensation. Rows, each scored per image (binary Dice; Hausdorff in pixels, the image diagonal when a
mask is empty) on the same first ``--images`` test images:

- ``cuts, label-free``: level with the best silhouette, foreground = the centre-prior cluster (no label used);
- ``cuts, oracle cluster``: the same level, the cluster holding most ground-truth foreground (the paper's scoring);
- ``cuts, oracle level + cluster``: the paper's "best one" (granularity and cluster chosen with the ground truth);
- ``cuts persistent, …``: the official code's "persistent" map (one map from the whole hierarchy, no label used),
  with the centre rule (label-free) and with the oracle cluster;
- ``otsu`` / ``kmeans-3`` on intensity, with the same label-free centre rule and with the oracle cluster;
- ``supervised``: `basic_unet` trained on a few labelled train images (``SUPERVISED`` budget) at the same size.
Each training runs in a single-thread subprocess, resumable. Run it as a script (it imports only
``benchmarks/common.py``); ``section(rows)`` is its part of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from common import (ROOT, RESULTS_DIR, RUNS_DIR, load_rows, mask_dice_hausdorff, md_table, merge_rows,
                    row_provenance, run_recipe_process)

RESULTS = RESULTS_DIR / "cuts.json"
SIZE = 64
#: binary target per dataset: the label value scored, and which test cases (polyp: Kvasir; ACDC: slices with LV)
DATASETS = {
    "polyp": {"dataset": "polyp_kvasir_cvc", "domain": "kvasir", "target": 1, "supervised_budget": {"count": 10}},
    "acdc": {"dataset": "acdc", "domain": None, "target": 3, "supervised_budget": {"flag": "labeled_3"}},
}
CUTS_STEPS, SUPERVISED_STEPS = 200, 300


def cuts_recipe(name: str) -> dict:
    import yaml

    d = DATASETS[name]
    r = yaml.safe_load((ROOT / "recipes" / "polyp_cuts.yaml").read_text())
    r["name"] = f"cuts_{name}"
    r["data"].update({"dataset": d["dataset"], "domain": d["domain"], "image_size": [SIZE, SIZE]})
    r["stages"][0].update({"steps": CUTS_STEPS, "val_every": CUTS_STEPS // 4, "batch_size": {"unlabeled": 8}})
    r["trainer"].update({"progress_bar": False, "log_every": 50})
    return r


def supervised_recipe(name: str) -> dict:
    d = DATASETS[name]
    return {"name": f"cuts_supervised_{name}", "seed": 1337,
            "data": {"dataset": d["dataset"], "domain": d["domain"], "image_size": [SIZE, SIZE],
                     "budget": d["supervised_budget"], "max_val_cases": 10},
            "backbone": {"name": "basic_unet"}, "trainer": {"progress_bar": False, "log_every": 50},
            "evaluation": {"metrics": ["dice"], "overlays": 0},
            "stages": [{"strategy": "supervised", "steps": SUPERVISED_STEPS, "val_every": 100,
                        "batch_size": {"labeled": 8},
                        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "constant"}}]}


def train(recipe: dict, out: Path) -> Path:
    if not (out / "model.pt").exists():
        run_recipe_process(recipe, out)
    return out / "model.pt"


def otsu(gray: np.ndarray) -> np.ndarray:
    """Two classes by Otsu's threshold on a [0, 1] image (between-class variance over 256 bins)."""
    hist, edges = np.histogram(gray, 256, (0.0, 1.0))
    p = hist / hist.sum()
    w0, mu = np.cumsum(p), np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    between = (mu[-1] * w0 - mu) ** 2 / np.clip(w0 * (1 - w0), 1e-12, None)
    return (gray > edges[1:][np.argmax(between)]).astype(int)


def kmeans(image: np.ndarray, k: int = 3) -> np.ndarray:
    from scipy.cluster.vq import kmeans2

    pixels = image.reshape(image.shape[0], -1).T.astype(np.float64)
    return kmeans2(pixels, k, seed=0, minit="++")[1].reshape(image.shape[1:])


def evaluate(name: str, images: int, runs: Path) -> list[dict]:
    import torch

    from label_efficient.data import CaseStore, build_dataset
    from label_efficient.runner import load_bundle
    from label_efficient.strategies import build_strategy
    from label_efficient.strategies.cuts import centre_cluster, oracle_cluster
    from label_efficient.transforms.condensation import persistent_label

    torch.set_num_threads(1)
    d = DATASETS[name]
    cuts = build_strategy("cuts", load_bundle(train(cuts_recipe(name), runs / f"cuts_{name}"))[0], 2).eval()
    sup = load_bundle(train(supervised_recipe(name), runs / f"supervised_{name}"))[0].eval()
    spec = build_dataset(d["dataset"])
    store = CaseStore(spec, (SIZE, SIZE))
    cases = [c for c in spec.select("test", d["domain"])]
    per: dict[str, list[tuple[float, float]]] = {}
    n = 0
    for case in cases:
        item = store.get(case, True)
        truth = item.label == d["target"]
        if not truth.any():
            continue
        image = item.image
        levels, chosen = cuts.segment(torch.from_numpy(image))
        best = max(levels, key=lambda lab: mask_dice_hausdorff(oracle_cluster(lab, truth), truth)[0])
        persistent = persistent_label(levels)
        gray = image.mean(0)
        with torch.no_grad():
            supervised = sup(torch.from_numpy(image)[None]).argmax(1)[0].numpy() == d["target"]
        for method, pred in {
            "cuts, label-free": centre_cluster(levels[chosen]),
            "cuts, oracle cluster": oracle_cluster(levels[chosen], truth),
            "cuts, oracle level + cluster": oracle_cluster(best, truth),
            "cuts persistent, label-free": centre_cluster(persistent),
            "cuts persistent, oracle cluster": oracle_cluster(persistent, truth),
            "otsu, label-free": centre_cluster(otsu(gray)), "otsu, oracle cluster": oracle_cluster(otsu(gray), truth),
            "kmeans-3, label-free": centre_cluster(kmeans(image)),
            "kmeans-3, oracle cluster": oracle_cluster(kmeans(image), truth),
            f"supervised, {json.dumps(d['supervised_budget'])}": supervised,
        }.items():
            per.setdefault(method, []).append(mask_dice_hausdorff(pred, truth))
        n += 1
        if n == images:
            break
    made = stage1_record(runs / f"cuts_{name}")
    # the precision a row's network ran at: CUTS rows their stage 1's, supervised its own; Otsu and k-means none
    precision = {"cuts": made["precision"], "supervised": row_provenance(
        json.loads((runs / f"supervised_{name}" / "metrics.json").read_text())).get("precision")}
    return [{"dataset": name, "method": m, "images": n, "dice": round(statistics.mean(v[0] for v in vs), 4),
             "dice_sd": round(statistics.stdev(v[0] for v in vs), 4),
             "hausdorff": round(statistics.mean(v[1] for v in vs), 2), "size": SIZE, "cuts_steps": CUTS_STEPS,
             "supervised_steps": SUPERVISED_STEPS, **made,
             "precision": precision.get(m.split(maxsplit=1)[0].rstrip(","), "n/a (no network)")}
            for m, vs in per.items()]


def stage1_record(run: Path) -> dict:
    """What a row keeps of its CUTS stage-1 run: the val loss at each check (``metrics.csv``), the step
    ``select: val_loss`` kept, and the run's precision, commit and date (``metrics.json``)."""
    import csv
    import datetime

    log = list(csv.DictReader((run / "stage0_cuts" / "metrics.csv").open()))
    checks = [(int(r["step"]) + 1, round(float(r["val/loss"]), 6)) for r in log if r.get("val/loss")]
    prov = row_provenance(json.loads((run / "metrics.json").read_text()))
    made = datetime.date.fromtimestamp((run / "metrics.json").stat().st_mtime).isoformat()
    return {"val_loss_checks": checks, "chosen_step": min(checks, key=lambda c: c[1])[0],
            "precision": prov.get("precision"), "git_commit": prov.get("git_commit"),
            "cpu_model": prov.get("cpu_model"), "made": made}


def table(rows: list[dict]) -> str:
    return md_table(["dataset", "method", "images", "Dice (mean ± s.d. over images)", "Hausdorff (px)", "precision"],
                    [[r["dataset"], r["method"], r["images"], f"{r['dice']:.4f} ± {r['dice_sd']:.4f}",
                      f"{r['hausdorff']:.2f}", r.get("precision") or "not recorded"] for r in rows])


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def _reading(rows: list[dict]) -> str:
    """What the label-free rows show, as the rows have it."""
    label_free = {}
    for r in rows:
        if r["method"].endswith("label-free"):
            label_free.setdefault(r["dataset"], {})[r["method"]] = r["dice"]
    cuts_best = {d: max(v for m, v in lf.items() if m.startswith("cuts")) for d, lf in label_free.items()}
    kmeans = {d: lf.get("kmeans-3, label-free") for d, lf in label_free.items()}
    beaten = all(k is not None and cuts_best[d] < k for d, k in kmeans.items())
    out = ("No CUTS label-free row beats k-means on intensity here" if beaten else
           "A CUTS label-free row beats k-means on intensity on " + ", ".join(
               d for d, k in kmeans.items() if k is None or cuts_best[d] >= k))
    polyp = label_free.get("polyp", {})
    if polyp and min(polyp, key=polyp.get) == "cuts persistent, label-free":
        out += ("; the persistent map is the worst label-free row on polyps (it keeps many small clusters, and the "
                "centre prior then picks one of them)")
    return out + "."


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    images = sorted({r["images"] for r in rows})
    return "\n".join([
        "## CUTS: unsupervised segmentation against label-free baselines", "",
        f"Regenerate: `python benchmarks/cuts.py`. Images at {r0['size']}²; CUTS stage 1 ({r0['cuts_steps']} steps, "
        "`recipes/polyp_cuts.yaml`, no label read; the checkpoint of lowest loss on the val images, checked "
        "every quarter of the run: `select: val_loss`, the official rule) on the train images, then per test image "
        "diffusion condensation. Binary target: polyp (Kvasir test) and left-ventricle cavity (ACDC test slices that "
        "contain it). *label-free* rows choose the granularity and the foreground cluster without any label "
        "(silhouette level or the official code's *persistent* map of the whole hierarchy, then the centre prior); "
        f"*oracle* rows choose them with the ground truth, as the paper scores. {_reading(rows)} "
        f"{_selection(rows)} `supervised`: `basic_unet` on the stated few labels, {r0['supervised_steps']} steps, "
        f"SGD 0.01; {' / '.join(map(str, images))} test images.", "",
        table(rows), ""])


def _selection(rows: list[dict]) -> str:
    """Which step ``select: val_loss`` kept on each dataset, and when, at which commit and precision each was made."""
    by = {r["dataset"]: r for r in rows if r.get("val_loss_checks")}
    if not by:
        return ""
    parts = []
    for d, r in by.items():
        losses = [v for _, v in r["val_loss_checks"]]
        fell = all(b < a for a, b in zip(losses, losses[1:]))
        parts.append(f"{d}: step {r['chosen_step']} of {r['cuts_steps']} kept"
                     f"{' (the val loss fell at every check)' if fell else ''}, made {r['made']} at "
                     f"`{(r['git_commit'] or '?')[:7]}`, {r['precision']}, {r['cpu_model']}")
    return "Checkpoint and provenance: " + "; ".join(parts) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--runs", default=str(RUNS_DIR / "cuts"))
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        new = evaluate(name, args.images, runs)
        for r in new:
            print(json.dumps(r), flush=True)
        merge_rows(RESULTS, new, key=lambda r: (r["dataset"], r["method"]))


if __name__ == "__main__":
    main()
