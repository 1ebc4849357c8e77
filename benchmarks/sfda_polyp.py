"""Source-free adaptation across polyp centres (Kvasir-SEG ↔ CVC-ClinicDB): rows to results/sfda_polyp.json.

    python benchmarks/sfda_polyp.py [--jobs 2] [--directions kvasir:cvc_clinicdb cvc_clinicdb:kvasir]
    python benchmarks/sfda_polyp.py --seed 1338 --methods bn_sfda upl_sfda bn_sfda+upl_sfda   # another seed
    python benchmarks/sfda_polyp.py --directions kvasir:cvc_clinicdb --methods sdc_uda   # SDC-UDA (uses the source)
    python benchmarks/sfda_polyp.py --table-only

Per direction: source model (supervised on source train, selected on source val), source-only on the target
test split, BN-SFDA, UPL-SFDA, BN-SFDA→UPL-SFDA, and the target oracle (supervised on target train, selected on
target val). Adaptation stages start from the source model.pt and see unlabelled target train images only; they
run a fixed number of steps (no target-label model selection). "recovered" = (adapted − source-only) /
(oracle − source-only). OOD AUROC: Mahalanobis score vs. "Dice < 0.5" per target test image, before adaptation
(detector fitted on the source domain) and after (fitted on the adapted model's target training images).
Run it as a script (it imports only ``benchmarks/common.py``); ``section(rows)`` is its part of RESULTS.md.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (POLYP_PROTOCOL, POLYP_SHORT, RESULTS_DIR, ROOT, RUNS_DIR, load_json, load_rows, md_table, pct,
                    polyp_recipe, polyp_supervised_stage, rebuild_report, run_recipe_process, write_json)
from common import with_recovered as _with_recovered

RESULTS = RESULTS_DIR / "sfda_polyp.json"
#: reference rows of earlier commits that the section compares with (recovered from git, commands in the file)
SUPERSEDED = RESULTS_DIR / "superseded_rows.json"
PROTOCOL = POLYP_PROTOCOL  #: shared with ood_polyp.py, which scores these source models
SHORT = POLYP_SHORT
#: rows that are references, not adaptations (no "recovered" share)
REFERENCES = ("source_only", "oracle", "source_on_source_test")
_recipe, _supervised = polyp_recipe, polyp_supervised_stage


def _adapt(strategy: str, init: str, target: str, config: dict | None = None) -> dict:
    p = PROTOCOL
    return {"strategy": strategy, "steps": p["adapt_steps"], "val_every": 100, "init": init,
            "data": {"domain": target}, "batch_size": {"unlabeled": p["batch"]},
            "optimizer": p["bn_opt"] if strategy == "bn_sfda" else p["upl_opt"], "config": config or {}}


#: adaptation methods: row name -> (run folder, stages as (strategy, config)); later stages start from the
#: previous stage's last weights. The last four are ablations of one setting each.
METHODS = {
    "bn_sfda": ("bn_sfda", [("bn_sfda", {})]),
    "upl_sfda": ("upl_sfda", [("upl_sfda", {})]),
    "bn_sfda+upl_sfda": ("bn_upl_sfda", [("bn_sfda", {}), ("upl_sfda", {})]),
    "bn_sfda (no entropy)": ("bn_sfda_no_entropy", [("bn_sfda", {"entropy_weight": 0.0})]),
    "bn_sfda (entropy λ=1000)": ("bn_sfda_entropy1000", [("bn_sfda", {"entropy_weight": 1000.0})]),
    "upl_sfda (frozen BN)": ("upl_sfda_frozen_bn", [("upl_sfda", {"bn_mode": "frozen"})]),
    "bn_sfda+upl_sfda (frozen BN)": ("bn_upl_sfda_frozen_bn", [("bn_sfda", {}), ("upl_sfda", {"bn_mode": "frozen"})]),
}

#: SDC-UDA (unsupervised DA: it reads the labelled source, so it is not source-free) on request, ``--methods sdc_uda``:
#: ``recipes/polyp_sdc_uda.yaml`` per direction, its translation cut to this many GAN steps for the CPU
SDC_TRANSLATE_STEPS = 1000


def _sdc_uda(src: str, tgt: str, seed: int) -> dict:
    import yaml

    r = yaml.safe_load((ROOT / "recipes" / "polyp_sdc_uda.yaml").read_text())
    r["data"].update(domain=tgt, labeled_domain=src)
    r["stages"][0]["steps"] = SDC_TRANSLATE_STEPS
    return {**r, "name": f"{SHORT[src]}_to_{SHORT[tgt]}_sdc_uda", "seed": seed, "trainer": PROTOCOL["trainer"],
            "evaluation": {"metrics": ["dice", "hd95"], "overlays": 2}}


def _ood_auroc(cases: dict) -> float:
    import numpy as np

    from label_efficient.ood import auroc

    ids = [c for c in cases if "ood" in cases[c]]
    dice = np.array([np.mean(list(cases[c]["dice"].values())) for c in ids])
    score = np.array([cases[c]["ood"]["mahalanobis"] for c in ids])
    return round(auroc(score, dice < 0.5), 4)


def source_only(source_dir: Path, target: str) -> dict:
    """The source model.pt (with its source-fitted OOD detector) on the target test split."""
    import torch

    torch.set_num_threads(1)
    from label_efficient.data import CaseStore, build_dataset, eval_volumes
    from label_efficient.evaluation import evaluate
    from label_efficient.ood import OODDetector, pooled_features
    from label_efficient.runner import load_bundle

    model, blob = load_bundle(source_dir / "model.pt")
    spec = build_dataset("polyp_kvasir_cvc")
    vols = eval_volumes(CaseStore(spec, PROTOCOL["image_size"]), spec.select("test", target))
    m = evaluate(model, vols, spec.num_classes, spec.class_names, 2, ["dice", "hd95"])
    det = OODDetector.from_state(blob["ood"])
    for v in vols:
        m["cases"][v.id]["ood"] = {"mahalanobis": float(det.score(pooled_features(model, [v.image]))["mahalanobis"][0])}
    return m


def direction(src: str, tgt: str, runs: Path, jobs: int, seed: int = PROTOCOL["seed"],
              methods: list[str] | None = None) -> list[dict]:
    tag = f"{SHORT[src]}_to_{SHORT[tgt]}"
    base = runs / (tag if seed == PROTOCOL["seed"] else f"{tag}_s{seed}")
    src_dir, oracle_dir = base / "source", base / "oracle"
    with ThreadPoolExecutor(jobs) as pool:
        fut_src = pool.submit(run_recipe_process, _recipe(f"{tag}_source", src, [_supervised(PROTOCOL["source_steps"])], seed),
                              src_dir)
        fut_orc = pool.submit(run_recipe_process, _recipe(f"{tag}_oracle", tgt, [_supervised(PROTOCOL["source_steps"])], seed),
                              oracle_dir)
        src_m = fut_src.result()
        model = str(src_dir / "model.pt")
        adapted = {}
        if methods is not None and "sdc_uda" in methods:
            adapted["sdc_uda"] = pool.submit(run_recipe_process, _sdc_uda(src, tgt, seed), base / "sdc_uda")
        for method, (folder, plan) in METHODS.items():
            if methods is not None and method not in methods:
                continue
            stages = [_adapt(st, model if j == 0 else "previous_last", tgt, cfg) for j, (st, cfg) in enumerate(plan)]
            adapted[method] = pool.submit(run_recipe_process, _recipe(f"{tag}_{folder}", tgt, stages, seed),
                                          base / folder)
        oracle_m = fut_orc.result()
        adapted = {k: f.result() for k, f in adapted.items()}
    so = source_only(src_dir, tgt)
    rows = []

    def row(method, m, seconds=None, steps=None, ood=None):
        rows.append({"direction": f"{src}->{tgt}", "seed": seed, "method": method, "mean_dice": round(m["mean_dice"], 4),
                     "hd95": round(m["mean_hd95"], 2), "recovered": None,
                     "sec_per_adapt_step": round(seconds / steps, 4) if seconds else None, "ood_auroc": ood})

    row("source_only", so, ood=_ood_auroc(so["cases"]))
    for method, m in adapted.items():
        if method == "sdc_uda":  # trained from scratch on the source labels: no adaptation-step cost
            row(method, m, ood=_ood_auroc(m["cases"]))
            continue
        adapt_stages = m["stages"]
        secs = sum(s["seconds"] for s in adapt_stages)
        row(method, m, secs, sum(s["steps"] for s in adapt_stages), _ood_auroc(m["cases"]))
    row("oracle", oracle_m, ood=_ood_auroc(oracle_m["cases"]))
    rows.append({"direction": f"{src}->{tgt}", "seed": seed, "method": "source_on_source_test", "mean_dice": round(src_m["mean_dice"], 4),
                 "hd95": round(src_m["mean_hd95"], 2), "recovered": None, "sec_per_adapt_step": None, "ood_auroc": None})
    return with_recovered(rows)


def _seed(r: dict) -> int:
    return r.get("seed", PROTOCOL["seed"])


def with_recovered(rows: list[dict]) -> list[dict]:
    """Set "recovered" = (adapted − source-only) / (oracle − source-only); undefined (None) when the oracle does
    not beat source-only, i.e. when there is no domain drop to recover."""
    return _with_recovered(rows, lambda r: (r["direction"], _seed(r)), REFERENCES)


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        rec = pct(r["recovered"]) if r["recovered"] is not None else ""
        if r["recovered"] is None and r["method"] not in REFERENCES:
            rec = "n/a (oracle ≤ source-only)"
        sps = f"{r['sec_per_adapt_step']:.3f}" if r["sec_per_adapt_step"] else ""
        ood = f"{r['ood_auroc']:.3f}" if r["ood_auroc"] is not None else ""
        out.append([r["direction"], _seed(r), r["method"], f"{r['mean_dice']:.4f}", f"{r['hd95']:.2f}", rec, sps, ood])
    return md_table(["direction", "seed", "method", "mean Dice", "HD95 (px)", "drop recovered", "s / adapt step",
                     "OOD AUROC (Dice<0.5)"], out)


def load_results() -> dict:
    return {"rows": with_recovered(load_rows(RESULTS)), "superseded": load_json(SUPERSEDED, {}).get("sfda_polyp")}


def _remade(rows: list[dict], old: dict | None) -> str:
    """The seed-1337 references re-made with the SDC-UDA rows, beside the earlier ones the BN/UPL rows had."""
    if not old:
        return ""

    def dice(rs: list[dict], direction: str, method: str) -> str:
        return next(f"{r['mean_dice']:.4f}" for r in rs
                    if r["direction"] == direction and r["method"] == method and _seed(r) == old["seed"])

    kc, ck = "kvasir->cvc_clinicdb", "cvc_clinicdb->kvasir"
    new, was = rows, old["rows"]
    return (f"The seed-{old['seed']} source-only, oracle and source-on-source rows were re-made on 2026-12-01 with "
            "the SDC-UDA rows (the source folder re-evaluated, the oracle re-trained): kvasir→cvc source-only "
            f"{dice(new, kc, 'source_only')} and oracle {dice(new, kc, 'oracle')}, where the same seed's BN/UPL rows, "
            f"made earlier, had {dice(was, kc, 'source_only')} and {dice(was, kc, 'oracle')} beside them; cvc→kvasir "
            f"{dice(new, ck, 'source_only')} and {dice(new, ck, 'oracle')}, where they had "
            f"{dice(was, ck, 'source_only')} and {dice(was, ck, 'oracle')} (the earlier rows: `{old['command']}`). ")


def section(rows: dict) -> str:
    if not rows["rows"]:
        return ""
    p = PROTOCOL
    return "\n".join([
        "## Source-free adaptation across polyp centres (Kvasir-SEG ↔ CVC-ClinicDB)", "",
        f"Regenerate: `python benchmarks/sfda_polyp.py`. Images resized to {p['image_size'][0]}², same U-Net; "
        f"source and oracle {p['source_steps']} supervised steps (selected on their own val split); adaptation "
        f"{p['adapt_steps']} steps per method on unlabelled target train images, last checkpoint (no target "
        "labels for selection). Dice/HD95 on the target test split, per image. drop recovered = (adapted − "
        "source-only) / (oracle − source-only). `sdc_uda` (`--methods sdc_uda`; unsupervised DA, it reads the "
        f"labelled source): `recipes/polyp_sdc_uda.yaml` with {SDC_TRANSLATE_STEPS} translation steps, trained from "
        "scratch. Every `sdc_uda` row was made after commit ae086f5 (the discriminator's R1 penalty summed over the "
        f"slab, as in the official code). {_remade(rows['rows'], rows['superseded'])}"
        "The seed-1338 rows are one consistent set.", "", table(rows["rows"]), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--directions", nargs="*", default=["kvasir:cvc_clinicdb", "cvc_clinicdb:kvasir"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", default=str(RUNS_DIR / "sfda"))
    ap.add_argument("--seed", type=int, default=PROTOCOL["seed"])
    ap.add_argument("--methods", nargs="*", default=None, help="adaptation rows to run (default: all of METHODS)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = with_recovered(load_rows(RESULTS))
    if not args.table_only:
        for d in args.directions:
            src, tgt = d.split(":")
            new = direction(src, tgt, Path(args.runs), args.jobs, args.seed, args.methods)
            done = {(r["direction"], r["method"]) for r in new}
            rows = [r for r in rows if _seed(r) != args.seed or (r["direction"], r["method"]) not in done] + new
            write_json(RESULTS, rows)
    write_json(RESULTS, rows)
    rebuild_report()
    print(table(rows))


if __name__ == "__main__":
    main()
