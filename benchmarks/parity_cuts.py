"""CUTS beside its official code (KrishnaswamyLab/CUTS ``src/main.py`` + ``diffusion_condensation_msphate``): the same
Kvasir images, split, schedule and scoring; rows to results/parity_cuts.json.

    python benchmarks/parity_cuts.py prepare --official /work/.mirror/KrishnaswamyLab+CUTS/repo --cuts-python PY
    python benchmarks/parity_cuts.py official --seed 1
    python benchmarks/parity_cuts.py ours --seed 1
    python benchmarks/parity_cuts.py score --seed 1          # the 2 × 2 rows of that seed (both sides trained)
    python benchmarks/parity_cuts.py --table-only            # RESULTS.md from the rows (= python benchmarks/report.py)

``PY``: a Python where the official stage 2 imports, i.e. this project's environment plus ``multiscale_phate`` and
``sewar`` (both on PyPI, installed with ``-c constraints.txt`` into a venv whose ``.pth`` file adds this project's
site-packages, so torch stays the pinned CPU build); it is recorded in ``prepared.json`` and runs the official code.

Data (``prepare``, gitignored ``benchmarks/runs/official/CUTS/``): the first ``TRAIN_IMAGES`` Kvasir train images
of ``shared/data/polyp_kvasir_cvc`` (sorted ids) and the first ``TEST_IMAGES`` Kvasir test images, each resized by
our loader to ``SIZE``² RGB and written as 8-bit PNG (``data/train/image_with_GA``, ``data/test/image_with_GA``,
masks beside), the layout of the official ``example_dataset_without_label`` (no label read in training). Both codes
read the same PNGs. The official split (``random_split`` 7:3 with the run's ``random_seed``) is computed the
official way and given to ours as explicit ``splits``, so both train on the same images and select on the same val.

Stage 1, both sides on the CPU, one thread, fp32: the official ``main.py --mode train`` with its retina config
(``config/retina_seed1.yaml``: AdamW 1e-3 / 1e-4, batch 16, λ = 0.001, 8 patches of 5² per image, linear warmup
over 10 epochs from 1e-6 then cosine, per epoch) at ``EPOCHS`` epochs (its ``ExtendedDataset`` pads an epoch to 5
batches: ``EPOCHS`` × 5 steps), keeping the epoch of lowest val loss; then ``--mode test`` on the test folder writes
the pixel embeddings. Ours: ``recipes/polyp_cuts.yaml``'s stage (``cuts_cnn`` 16…128, same λ, patches, optimizer,
``select: val_loss`` checked every 5 steps) for the same number of steps, cosine per step with a linear warmup over
the first 10 epochs' steps (the official steps its schedule once an epoch, from 1e-6).

Stage 2, a 2 × 2: each side's embeddings through the official ``diffusion_condensation_msphate`` (knn 100, its
default ``random_seed`` 0, finest level dropped) + ``get_persistent_structures``, and through ours
(``transforms.condensation`` on the full 64² grid, ``persistent_label``). Scores per test image (binary Dice and
Hausdorff in pixels, ``common.mask_dice_hausdorff``): the paper's "best one" (level and cluster chosen with the
mask), the persistent map with the cluster chosen with the mask, and the persistent map with our label-free centre
prior. Timing: stage 1 wall seconds (validation included) / steps, and stage 2 seconds per image, each side alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import (ROOT, RESULTS_DIR, RUNS_DIR, load_rows, mask_dice_hausdorff, md_table, merge_rows,
                    run_recipe_process)

RESULTS = RESULTS_DIR / "parity_cuts.json"
BASE = RUNS_DIR / "official" / "CUTS"
SIZE, TRAIN_IMAGES, TEST_IMAGES = 64, 80, 30
EPOCHS, STEPS_PER_EPOCH, WARMUP_EPOCHS = 40, 5, 10
OFFICIAL_CONFIG = "config/retina_seed1.yaml"
#: CPU-only edits of the official ``src/`` (each an exact replacement that must match once)
EDITS = [("utils/diffusion_condensation.py", "from CATCH import catch\n", "",
          "CATCH is not on PyPI and only its `diffusion_condensation_catch` (unused: msphate is the default) needs it")]

STAGE2 = r'''
import json, sys, time, glob, os
import numpy as np
sys.path.insert(0, os.getcwd())
from utils.diffusion_condensation import diffusion_condensation_msphate, get_persistent_structures
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in sorted(glob.glob(src + "/*.npz")):
    out = os.path.join(dst, os.path.basename(f))
    if os.path.exists(out):
        continue
    latent = np.load(f)["latent"]
    t0 = time.time()
    labels, gran = diffusion_condensation_msphate(X=latent, knn=100, num_workers=1, random_seed=0)
    persistent = get_persistent_structures(labels.reshape(len(labels), %d, %d))
    np.savez(out, levels=labels, persistent=persistent, seconds=time.time() - t0)
print("stage 2 done")
os._exit(0)
''' % (SIZE, SIZE)


def prepared() -> dict:
    p = BASE / "prepared.json"
    if not p.exists():
        raise SystemExit(f"{p} missing: run `python benchmarks/parity_cuts.py prepare --official ... --cuts-python ...`")
    return json.loads(p.read_text())


def write_images(cases, store, folder: Path, prefix: str) -> list[str]:
    from PIL import Image

    (folder / "image_with_GA").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    stems = []
    for i, case in enumerate(cases):
        item = store.get(case, True)
        stem = f"{prefix}_{i:03d}"
        rgb = np.clip(np.round(item.image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / "image_with_GA" / f"{stem}.png")
        Image.fromarray((item.label > 0).astype(np.uint8)).save(folder / "masks" / f"{stem}.png")
        stems.append(stem)
    return stems


def prepare(official: Path, cuts_python: str) -> None:
    from label_efficient.data import CaseStore, build_dataset

    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    src = BASE / "src"
    if src.exists():
        shutil.rmtree(src)
    BASE.mkdir(parents=True, exist_ok=True)
    subprocess.run(f"git -C {official} archive HEAD src config | tar -x -C {BASE}", shell=True, check=True)
    for rel, old, new, why in EDITS:
        path = src / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"edit of {rel} does not match once: {old!r}")
        path.write_text(text.replace(old, new))
    spec = build_dataset("polyp_kvasir_cvc")
    store = CaseStore(spec, (SIZE, SIZE))
    pick = lambda split, n: sorted(spec.select(split, "kvasir"), key=lambda c: c.id)[:n]
    train = write_images(pick("train", TRAIN_IMAGES), store, BASE / "data" / "train", "tr")
    test = write_images(pick("test", TEST_IMAGES), store, BASE / "data" / "test", "te")
    check = subprocess.run([cuts_python, "-c", "import multiscale_phate, sewar, torch; print(torch.__version__)"],
                           capture_output=True, text=True)
    if check.returncode:
        raise SystemExit(f"{cuts_python} cannot import the official stage 2: {check.stderr[-500:]}")
    (BASE / "prepared.json").write_text(json.dumps({
        "official_commit": commit, "cuts_python": cuts_python, "torch": check.stdout.strip(), "train": train,
        "test": test, "edits": [{"file": r, "removed": o, "why": w} for r, o, _, w in EDITS]}, indent=1))
    print(f"prepared {len(train)} train and {len(test)} test images at {SIZE}² from official {commit[:10]}")


def official_split(seed: int, stems: list[str]) -> tuple[list[str], list[str]]:
    """The official ``split_dataset`` (7:3, ``random_split`` with ``torch.Generator().manual_seed(seed)``)."""
    import torch
    from torch.utils.data import random_split

    val = int(0.3 * len(stems))
    tr, va = random_split(range(len(stems)), [len(stems) - val, val], generator=torch.Generator().manual_seed(seed))
    return [stems[i] for i in tr.indices], [stems[i] for i in va.indices]


def official_config(seed: int, mode: str) -> Path:
    import yaml

    cfg = yaml.safe_load((BASE / OFFICIAL_CONFIG).read_text())
    run = BASE / "results" / f"parity_s{seed}"
    cfg.update(dataset_name="example_dataset_without_label", no_label=True, num_workers=0, max_epochs=EPOCHS,
               random_seed=seed, dataset_path=str(BASE / "data" / ("train" if mode == "train" else "test")),
               model_save_path=str(run / "model.pty"), output_save_path=str(run / mode), log_folder=str(run / "logs"))
    path = run / f"config_{mode}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_official(seed: int) -> None:
    p = prepared()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = BASE / "results" / f"parity_s{seed}"
    timing = run / "timing.json"
    if not timing.exists():
        t0 = time.time()
        subprocess.run([p["cuts_python"], "main.py", "--mode", "train", "--config", str(official_config(seed, "train"))],
                       cwd=BASE / "src", env=env, check=True, capture_output=True)
        train_s = time.time() - t0
        subprocess.run([p["cuts_python"], "main.py", "--mode", "test", "--config", str(official_config(seed, "test"))],
                       cwd=BASE / "src", env=env, check=True, capture_output=True)
        timing.write_text(json.dumps({"train_seconds": train_s}))
    stage2(run / "test" / "numpy_files", run / "official_stage2", env)


def stage2(latents: Path, out: Path, env: dict) -> None:
    """The official msphate condensation + persistent map of every ``latent`` npz (resumable)."""
    subprocess.run([prepared()["cuts_python"], "-c", STAGE2, str(latents), str(out)], cwd=BASE / "src", env=env,
                   check=True, capture_output=True)


def our_recipe(seed: int) -> dict:
    import yaml

    p = prepared()
    train, val = official_split(seed, p["train"])
    r = yaml.safe_load((ROOT / "recipes" / "polyp_cuts.yaml").read_text())
    r.update(name=f"parity_cuts_s{seed}", seed=seed)
    r["data"] = {"dataset": "image_folder", "root": str(BASE / "data" / "train"), "image_size": [SIZE, SIZE],
                 "augment": False, "options": {"num_classes": 2, "in_channels": 3, "images": "image_with_GA",
                                               "splits": {"train": train, "val": val}}}
    stage = r["stages"][0]
    stage["config"]["condense_size"] = SIZE  # stage 2 on the full grid, as the official
    steps = EPOCHS * STEPS_PER_EPOCH
    stage.update(steps=steps, val_every=STEPS_PER_EPOCH)
    stage["optimizer"]["warmup_steps"] = WARMUP_EPOCHS * STEPS_PER_EPOCH
    r["trainer"] = {**r["trainer"], "precision": "32-true", "progress_bar": False, "log_every": 50}
    r["evaluation"] = {"split": "val"}  # the test images are scored by stage 2 here, not by the runner
    return r


def run_ours(seed: int) -> None:
    import torch
    from PIL import Image

    from label_efficient.runner import load_bundle
    from label_efficient.strategies import build_strategy
    from label_efficient.transforms.condensation import diffusion_condensation, persistent_label

    torch.set_num_threads(1)
    out = RUNS_DIR / "parity_cuts" / f"ours_s{seed}"
    metrics = run_recipe_process(our_recipe(seed), out)
    cuts = build_strategy("cuts", load_bundle(out / "model.pt")[0], 2).eval()
    latents, ours2 = out / "latents", out / "our_stage2"
    latents.mkdir(exist_ok=True)
    ours2.mkdir(exist_ok=True)
    for i, stem in enumerate(prepared()["test"]):
        image = np.asarray(Image.open(BASE / "data" / "test" / "image_with_GA" / f"{stem}.png"), np.float32) / 255
        with torch.no_grad():
            z = cuts.embed(torch.from_numpy(image.transpose(2, 0, 1))[None] * 2 - 1)[0]
        np.savez(latents / f"sample_{i:05d}.npz", latent=z.permute(1, 2, 0).reshape(SIZE * SIZE, -1).numpy())
    (out / "timing.json").write_text(json.dumps({"train_seconds": metrics["train_seconds"]}))
    stage2(latents, out / "official_stage2", {**os.environ, "OMP_NUM_THREADS": "1"})
    for run in (out, BASE / "results" / f"parity_s{seed}"):
        our_stage2(run, diffusion_condensation, persistent_label)


def our_stage2(run: Path, condense, persist) -> None:
    """Our condensation + persistent map of a run's test embeddings (resumable)."""
    import torch

    folder = run / ("latents" if (run / "latents").is_dir() else "test/numpy_files")
    dst = run / "our_stage2"
    dst.mkdir(exist_ok=True)
    for f in sorted(folder.glob("*.npz")):
        if (dst / f.name).exists():
            continue
        t0 = time.time()
        levels = [lab.reshape(SIZE, SIZE) for lab in condense(torch.from_numpy(np.load(f)["latent"]))]
        np.savez(dst / f.name, levels=np.stack(levels), persistent=persist(levels), seconds=time.time() - t0)


def score(seed: int, timing_note: str | None) -> list[dict]:
    from PIL import Image

    from label_efficient.strategies.cuts import centre_cluster, oracle_cluster

    p = prepared()
    truths = [np.asarray(Image.open(BASE / "data" / "test" / "masks" / f"{s}.png")) > 0 for s in p["test"]]
    runs = {"official": BASE / "results" / f"parity_s{seed}", "ours": RUNS_DIR / "parity_cuts" / f"ours_s{seed}"}
    rows = []
    for side, run in runs.items():
        train_s = json.loads((run / "timing.json").read_text())["train_seconds"]
        for condensation, folder in {"official": run / "official_stage2", "ours": run / "our_stage2"}.items():
            per: dict[str, list] = {"best one (oracle level + cluster)": [], "persistent, oracle cluster": [],
                                    "persistent, label-free (centre)": []}
            seconds, counts = [], []
            for i, truth in enumerate(truths):
                z = np.load(folder / f"sample_{i:05d}.npz")
                levels = [lab.reshape(SIZE, SIZE) for lab in z["levels"]]
                persistent = z["persistent"].reshape(SIZE, SIZE)
                per["best one (oracle level + cluster)"].append(
                    max((mask_dice_hausdorff(oracle_cluster(lab, truth), truth) for lab in levels), key=lambda s: s[0]))
                per["persistent, oracle cluster"].append(mask_dice_hausdorff(oracle_cluster(persistent, truth), truth))
                per["persistent, label-free (centre)"].append(mask_dice_hausdorff(centre_cluster(persistent), truth))
                seconds.append(float(z["seconds"]))
                counts.append(len(levels))
            for method, vs in per.items():
                rows.append({"embedder": side, "condensation": condensation, "method": method, "seed": seed,
                             "images": len(vs), "dice": round(statistics.mean(v[0] for v in vs), 4),
                             "dice_sd": round(statistics.stdev(v[0] for v in vs), 4),
                             "hausdorff": round(statistics.mean(v[1] for v in vs), 2),
                             "levels_mean": round(statistics.mean(counts), 1),
                             "stage1_s_per_step": round(train_s / (EPOCHS * STEPS_PER_EPOCH), 3),
                             "stage2_s_per_image": round(statistics.mean(seconds), 2), "size": SIZE,
                             "steps": EPOCHS * STEPS_PER_EPOCH, "official_commit": p["official_commit"],
                             "precision": "32-true", "threads": 1, "timing_note": timing_note})
    return rows


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["embedder"], r["condensation"]), []).append(r)
    cells = []
    for (method, emb, cond), rs in sorted(groups.items()):
        d = [r["dice"] for r in rs]
        sd = f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else ""
        cells.append([method, emb, cond, ", ".join(str(r["seed"]) for r in rs), f"{statistics.mean(d):.4f}{sd}",
                      f"{statistics.mean(r['hausdorff'] for r in rs):.2f}",
                      f"{statistics.mean(r['stage1_s_per_step'] for r in rs):.3f}",
                      f"{statistics.mean(r['stage2_s_per_image'] for r in rs):.2f}", r["precision"]])
    return "\n".join([
        "## CUTS beside its official code", "",
        f"`python benchmarks/parity_cuts.py` (the script's docstring gives the protocol; official commit "
        f"`{r0['official_commit'][:10]}`): {r0['images']} Kvasir test images at {r0['size']}², stage 1 on the same "
        f"{TRAIN_IMAGES} train images ({r0['steps']} steps, batch 16, fp32, one thread) by each code, stage 2 by each "
        "code's condensation on each side's embeddings (a 2 × 2). Dice: mean over seeds of the per-image mean (± s.d. "
        "over seeds); Hausdorff in pixels (the image diagonal when a map is empty). Stage-1 s/step includes the "
        "per-epoch validation.", "",
        md_table(["method", "embedder (stage 1)", "condensation (stage 2)", "seeds", "Dice", "Hausdorff (px)",
                  "stage 1 s/step", "stage 2 s/image", "precision"], cells), "",
        *_reading(groups), "",
        *sorted({f"- seconds of seed {r['seed']}: {r['timing_note']}" for r in rows if r.get("timing_note")}), ""])


def _reading(groups: dict[tuple, list[dict]]) -> list[str]:
    """One line per method: our stage 1 against the official one (each through the official condensation), and our
    condensation against the official one (each on the official embeddings), each gap against 2 s.d. over seeds."""
    def gap(a: list[dict], b: list[dict]) -> str:
        da, db = [r["dice"] for r in a], [r["dice"] for r in b]
        diff = statistics.mean(da) - statistics.mean(db)
        if min(len(da), len(db)) < 2:
            return f"{diff:+.4f} (one seed)"
        sd = max(statistics.stdev(da), statistics.stdev(db))
        return f"{diff:+.4f} ({'within' if abs(diff) <= 2 * sd else 'outside'} 2 s.d. = {2 * sd:.4f})"

    lines = []
    for method in sorted({m for m, _, _ in groups}):
        g = {(e, c): rs for (m, e, c), rs in groups.items() if m == method}
        if len(g) == 4:
            lines.append(f"- {method}: our stage 1 − official, both through the official condensation: "
                         f"{gap(g['ours', 'official'], g['official', 'official'])}; our condensation − official, both on "
                         f"the official embeddings: {gap(g['official', 'ours'], g['official', 'official'])}.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["prepare", "official", "ours", "score"])
    ap.add_argument("--official", type=Path, help="prepare: the official repository (a git checkout or mirror)")
    ap.add_argument("--cuts-python", help="prepare: the Python that runs the official code")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timing-note", help="score: why the rows' seconds are not a speed figure (e.g. shared cores)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args.official, args.cuts_python)
    elif args.command == "official":
        run_official(args.seed)
    elif args.command == "ours":
        run_ours(args.seed)
    elif args.command == "score":
        new = score(args.seed, args.timing_note)
        for r in new:
            print(json.dumps(r))
        merge_rows(RESULTS, new, key=lambda r: (r["embedder"], r["condensation"], r["method"], r["seed"]))
    if args.command == "score" or args.table_only:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py")], check=True)


if __name__ == "__main__":
    main()
