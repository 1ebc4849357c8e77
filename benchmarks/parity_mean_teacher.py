"""Mean teacher beside its official code (SSL4MIS ``code/train_mean_teacher_2D.py``): 2D ACDC, same data, split,
schedule and evaluator; rows to results/parity_mean_teacher.json.

    python benchmarks/parity_mean_teacher.py prepare --official /work/.mirror/HiLab-git+SSL4MIS/repo --patch 128
    python benchmarks/parity_mean_teacher.py official --seed 1337 --iterations 3000 --labeled 7 --patch 128
    python benchmarks/parity_mean_teacher.py ours --seed 1337 --iterations 3000 --labeled 7 --patch 128
    python benchmarks/parity_mean_teacher.py official --seed 1337 --iterations 600 --labeled 7 --patch 128 --no-augment
    python benchmarks/parity_mean_teacher.py ours --seed 1337 --iterations 600 --labeled 7 --patch 128 --no-augment
    python benchmarks/parity_mean_teacher.py official --seed 1337 --iterations 10 --smoke   # pipeline check, no row
    python benchmarks/parity_mean_teacher.py ours --seed 1337 --iterations 10 --smoke       # pipeline check, no row
    python benchmarks/parity_mean_teacher.py --table-only      # RESULTS.md from the rows (= python benchmarks/report.py)

``prepare`` copies the official ``code/`` (commit ``OFFICIAL_COMMIT``) into the gitignored
``benchmarks/runs/official/SSL4MIS/code``, applies the CPU-only edits of :func:`edits` there (each an exact
replacement that must match once; the list is printed and recorded in every official row) and writes the data in
SSL4MIS's layout under ``.../SSL4MIS/data/ACDC`` from ``shared/data/acdc``: ``data/slices/<name>.h5`` for the train
slices and ``data/<patient>_<frame>.h5`` volumes for val/test (keys ``image`` = PNG / 255, float64 as the source's,
and ``label``), and the official ``train_slices.list`` / ``val.list`` / ``test.list`` as they are (their order is
SSL4MIS's: its labelled slices are the first ``patients_to_slices`` lines, checked to be exactly the ``labeled_7`` /
``labeled_3`` slices of ``split.csv``). The official code runs in this project's environment: everything it imports
is there (h5py, medpy, scipy, opencv, matplotlib, scikit-image, tqdm, yacs) except tensorboardX and torchvision,
which the edits replace by stand-ins (``_cpu_standins.py``: torchvision does not install beside the CPU torch);
``--official-python`` runs it with another interpreter, which ``prepare`` checks imports it.

``official`` runs the edited script in a one-thread subprocess with its own arguments only (``--root_path``,
``--exp``, ``--max_iterations``, ``--labeled_num``, ``--seed``; everything else at its defaults: batch 24 with 12
labelled, SGD 0.01 / 0.9 / 1e-4, poly 0.9, EMA 0.99, consistency 0.1, validation every 200 iterations on the 20 val
volumes), times its iterations from its log (median interval) and scores its ``unet_best_model.pth`` (and the last
weights, which an edit saves) on the 40 test volumes. ``ours`` runs our ``mean_teacher`` in the same configuration
(:func:`our_recipe`) through ``run_recipe_process`` and scores its selected checkpoint (and ``last.ckpt``) the
same way. Both are scored by :func:`label_efficient.evaluation.evaluate_ssl4mis` at the training patch size:
SSL4MIS's ``test_single_volume`` (each original-size slice zoomed to the patch with ``order=0``, argmax, zoomed
back), medpy Dice / HD95 per class in pixels, an empty class scoring 0, averaged over the 40 volumes.

Known differences left between the two configurations:

* EMA: SSL4MIS warms α up as min(1 − 1/(t+1), 0.99); ours is constant 0.99 from step 0 (the teacher starts as the
  student's copy).
* Consistency ramp: ``rampup_fraction = 30000 / N`` makes ours follow SSL4MIS's λ(t) = 0.1·exp(−5(1 − t/30000)²)
  (200 "epochs" × 150 iterations, whatever ``--max_iterations``) at the same truncated schedule, but SSL4MIS steps it
  per 150 iterations (t = 150·⌊i/150⌋) and zeroes the consistency for its first 1000 iterations; ours is smooth
  from step 0. At N = 3000 λ stays below 0.0018 on both sides, so the runs are nearly supervised on both.
* Augmentation: SSL4MIS's ``RandomGenerator`` applies, at the slice's own size, rot90 (k ∈ 0…3) then a flip of a
  random axis (p = 0.5) or a rotation by an integer angle in −20…19° (p = 0.5), both nearest-neighbour on the image
  too, then zooms image and label to the patch with ``order=0``: every sample is transformed. Ours resizes each
  slice to the patch once (bilinear, antialiased; the label nearest-exact), then applies, at the patch size, one
  of the 8 dihedral transforms (p = 0.5, identity among them), a continuous rotation within ±20° (p = 0.25,
  bilinear image, nearest label) or nothing (p = 0.25).
* Validation (selection only): SSL4MIS zooms val slices with ``order=0`` and scores the nearest-zoomed label map,
  an empty prediction scoring 0; ours predicts the bilinear-resized slices and upsamples the logits bilinearly, an
  empty class left out (NaN). Both pick the best mean Dice every 200 iterations.
* Batches: SSL4MIS draws each "epoch" as a permutation of the labelled slices (11 batches of 12, the 4 left over
  dropped) beside an endless permutation of the unlabelled ones; ours draws its own per-stream order. Seeds do not
  make the two runs' draws equal, only each side reproducible.
* Numerics: both fp32 on the CPU, one thread; ours in channels-last memory format.
* Timing: the official ``s/iter (median)`` is the median interval between its logged iterations (validation
  excluded); our runner records no per-step time, so ours has only ``s/iter (mean)``: train seconds / steps
  (validation included); the official's mean is its log's first-to-last time / (iterations − 1), validation
  included.

``--no-augment`` is the ablation of the augmentation difference above: the official runs from a copy of the edited
code (``code_noaug/``) whose ``RandomGenerator`` skips its rotation / flip branch (one more edit, recorded in the
row) and keeps only the ``order=0`` zoom to the patch; ours runs with ``data.augment: false`` (the bilinear resize
once, no augmentation). The resize difference stays.

Only ``benchmarks/common.py`` and the standard library are imported at module level; torch, h5py and the package
inside functions, so ``section(rows)`` runs without them.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (RESULTS_DIR, ROOT, RUNS_DIR, apply_edits, edit_list, git_archive, git_show, load_rows, mean_sd,
                    md_table, merge_rows, print_edits, rebuild_report, row_provenance, run_recipe_process,
                    write_json)

RESULTS = RESULTS_DIR / "parity_mean_teacher.json"
OFFICIAL_COMMIT = "06df6047a59aba9988ced8331998b5957ecb356b"
OFFICIAL_DIR = RUNS_DIR / "official" / "SSL4MIS"
CODE = OFFICIAL_DIR / "code"
CODE_NOAUG = OFFICIAL_DIR / "code_noaug"  #: ``--no-augment``: the edited code with :data:`NO_AUGMENT_EDIT` applied
DATA = OFFICIAL_DIR / "data" / "ACDC"  #: "ACDC" in the path: SSL4MIS's ``patients_to_slices`` looks for it
MODELS = OFFICIAL_DIR / "model"  #: the official ``../model/<exp>_<labeled>_labeled/unet`` from ``code/``
PREPARED = OFFICIAL_DIR / "prepared.json"
OUR_RUNS = RUNS_DIR / "parity_mean_teacher"
SHARED = Path(os.environ.get("LABEL_EFFICIENT_DATA", ROOT.parent / "shared" / "data"))
SCRIPT = "train_mean_teacher_2D.py"
#: SSL4MIS ``patients_to_slices("ACDC", n)``: its labelled slices are the first n lines of train_slices.list
LABELED_SLICES = {3: 68, 7: 136}
#: SSL4MIS's consistency ramp: 200 "epochs" of 150 iterations, whatever --max_iterations is
RAMP_ITERATIONS = 200 * 150
PRECISION = "32-true"  #: both train in fp32 on the CPU


# ---------------------------------------------------------------------------------------------------- the edits
def edits(patch: int) -> list[dict]:
    """The edits applied to the copied official code: ``file``, exact ``old`` (matched once), ``new``, ``why``."""
    t, nf, ds, val = SCRIPT, "networks/net_factory.py", "dataloaders/dataset.py", "val_2D.py"
    standin = "stand-in (_cpu_standins.py): not installable beside the CPU torch / not needed on the CPU"
    e = [
        (t, "from tensorboardX import SummaryWriter", "from _cpu_standins import SummaryWriter", f"tensorboardX {standin}"),
        (t, "from torchvision import transforms", "from _cpu_standins import transforms", f"torchvision {standin}"),
        (t, "from torchvision.utils import make_grid", "from _cpu_standins import make_grid", f"torchvision {standin}"),
        (ds, "from torchvision import transforms", "from _cpu_standins import transforms",
         f"torchvision {standin} (only the CTAugment / colour-jitter paths, unused by mean teacher, need the real one)"),
        (t, "volume_batch, label_batch = volume_batch.cuda(), label_batch.cuda()", "pass", "CPU: no .cuda()"),
        (nf, "net = UNet(in_chns=in_chns, class_num=class_num).cuda()", "net = UNet(in_chns=in_chns, class_num=class_num)",
         "CPU: no .cuda()"),
        (val, ".float().cuda()\n        net.eval()\n        with torch.no_grad():\n            out = torch.argmax(",
         ".float()\n        net.eval()\n        with torch.no_grad():\n            out = torch.argmax(",
         "CPU: no .cuda() (test_single_volume; test_single_volume_ds, unused, keeps its own)"),
        (nf, "from networks.efficientunet import Effi_UNet\n", "",
         "imports efficientnet_pytorch, only for efficient_unet (the unet path does not use it)"),
        (nf, "from networks.vision_transformer import SwinUnet as ViT_seg\n", "",
         "imports torchvision, only for ViT_Seg (the unet path does not use it)"),
        (t, "num_workers=4, pin_memory=True, worker_init_fn=worker_init_fn)",
         "num_workers=0, worker_init_fn=worker_init_fn)", "one process, one thread: no loader workers, no pin_memory"),
        (t, "valloader = DataLoader(db_val, batch_size=1, shuffle=False,\n                           num_workers=1)",
         "valloader = DataLoader(db_val, batch_size=1, shuffle=False,\n                           num_workers=0)",
         "one process, one thread: no loader workers"),
        (t, "parser.add_argument('--patch_size', type=list,  default=[256, 256],",
         f"parser.add_argument('--patch_size', type=list,  default=[{patch}, {patch}],",
         "the patch size of this benchmark (type=list cannot be given on the command line)"),
        (t, "sampled_batch[\"image\"], sampled_batch[\"label\"], model, classes=num_classes)",
         "sampled_batch[\"image\"], sampled_batch[\"label\"], model, classes=num_classes,\n"
         "                        patch_size=args.patch_size)",
         "validation at the training patch: test_single_volume's default is [256, 256], which equals SSL4MIS's own "
         "training patch; with the patch changed, keep validating at the size the network trains at"),
        (t, "shutil.ignore_patterns(['.git', '__pycache__']))", "shutil.ignore_patterns('.git', '__pycache__'))",
         "the list pattern raises TypeError in current Python's fnmatch (the snapshot copy of the code)"),
        (t, "    writer.close()\n    return \"Training Finished!\"",
         "    torch.save(model.state_dict(), os.path.join(snapshot_path, 'unet_last_model.pth'))\n"
         "    writer.close()\n    return \"Training Finished!\"",
         "also save the last weights (no effect on training): the row scores them beside the best, as ours, and a "
         "smoke run shorter than one validation has no best"),
    ]
    return edit_list(e)


#: ``--no-augment``: SSL4MIS's ``RandomGenerator`` without its random rotation / flip (the zoom to the patch stays)
NO_AUGMENT_EDIT = {
    "file": "dataloaders/dataset.py",
    "old": "        rand_value = random.random()\n        if rand_value < 0.5:\n            image, label = "
           "random_rot_flip(image, label)\n        else:\n            image, label = random_rotate(image, label)\n",
    "new": "",
    "why": "ablation (--no-augment): no random rot90 / flip / rotation; only the order-0 zoom to the patch",
}


def no_augment_code() -> Path:
    """A copy of the edited official code whose ``RandomGenerator`` does not augment (:data:`NO_AUGMENT_EDIT`)."""
    if CODE_NOAUG.exists():
        shutil.rmtree(CODE_NOAUG)
    shutil.copytree(CODE, CODE_NOAUG, ignore=shutil.ignore_patterns("__pycache__"))
    path = CODE_NOAUG / NO_AUGMENT_EDIT["file"]
    text = path.read_text()
    if text.count(NO_AUGMENT_EDIT["old"]) != 1:
        raise SystemExit(f"the no-augment edit of {path} does not match once")
    path.write_text(text.replace(NO_AUGMENT_EDIT["old"], NO_AUGMENT_EDIT["new"]))
    return CODE_NOAUG


# ---------------------------------------------------------------------------------------------------- data
def ssl4mis_name(r: dict) -> str:
    """SSL4MIS's name of a slice of split.csv (its ``z`` counts from 1)."""
    return f"{r['patient']}_{r['frame']}_slice_{int(r['z']) + 1}"


def check_lists(lists: dict[str, list[str]], rows: list[dict]) -> None:
    """The official lists hold exactly our split, and their first labelled lines exactly our budget flags."""
    by = {ssl4mis_name(r): r for r in rows}
    train = lists["train_slices"]
    if set(train) != {n for n, r in by.items() if r["split"] == "train"} or len(train) != len(set(train)):
        raise SystemExit("train_slices.list is not exactly the train slices of split.csv")
    for split in ("val", "test"):
        ours = {f"{r['patient']}_{r['frame']}" for r in rows if r["split"] == split}
        if set(lists[split]) != ours:
            raise SystemExit(f"{split}.list is not exactly the {split} volumes of split.csv")
    for n, k in LABELED_SLICES.items():
        if set(train[:k]) != {name for name, r in by.items() if r[f"labeled_{n}"] == "1"}:
            raise SystemExit(f"the first {k} lines of train_slices.list are not the labeled_{n} slices of split.csv")
    print(f"lists check: {len(train)} train slices, {len(lists['val'])} val and {len(lists['test'])} test volumes; "
          + ", ".join(f"first {k} = labeled_{n}" for n, k in LABELED_SLICES.items()))


def write_data(official: Path, src: Path, out: Path) -> None:
    """SSL4MIS's ACDC layout from the shared PNGs (image = PNG / 255 as float64, the source's; label uint8)."""
    import h5py
    import numpy as np
    from PIL import Image

    with open(src / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lists = {k: git_show(official, OFFICIAL_COMMIT, f"data/ACDC/{k}.list").split() for k in ("train_slices", "val", "test")}
    check_lists(lists, rows)
    (out / "data" / "slices").mkdir(parents=True, exist_ok=True)
    read = lambda kind, r: np.asarray(Image.open(src / kind / f"{r['stem']}.png"))  # noqa: E731

    def write(path: Path, rs: list[dict], stack: bool) -> None:
        image = [read("images", r) / 255.0 for r in rs]
        label = [read("masks", r).astype(np.uint8) for r in rs]
        with h5py.File(path, "w") as h:
            h["image"], h["label"] = (np.stack(image), np.stack(label)) if stack else (image[0], label[0])

    by = {ssl4mis_name(r): r for r in rows}
    for name in lists["train_slices"]:
        write(out / "data" / "slices" / f"{name}.h5", [by[name]], False)
    for vid in lists["val"] + lists["test"]:
        rs = sorted((r for r in rows if f"{r['patient']}_{r['frame']}" == vid), key=lambda r: int(r["z"]))
        write(out / "data" / f"{vid}.h5", rs, True)
    for k, names in lists.items():
        (out / f"{k}.list").write_text("\n".join(names) + "\n")
    print(f"wrote {len(lists['train_slices'])} slices and {len(lists['val']) + len(lists['test'])} volumes to {out}")


def check_imports(python: str) -> None:
    """The official script's imports resolve under ``python`` in the copied code (stand-ins included)."""
    mods = "numpy, torch, h5py, medpy, scipy, tqdm, cv2, matplotlib, skimage, dataloaders.dataset, utils.losses, val_2D"
    code = f"import sys; sys.argv = sys.argv[:1]; import {mods}; import networks.net_factory"
    p = subprocess.run([python, "-W", "ignore", "-c", code], cwd=CODE, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode:
        raise SystemExit(f"{python} cannot import the official code's dependencies:\n{p.stderr[-2000:]}\n"
                         "install them into a separate venv (pip install -c constraints.txt ...) and pass "
                         "--official-python")
    print(f"imports check: the official code imports under {python}")


def prepare(official: Path, patch: int, python: str) -> None:
    """Copy the official code, apply the edits, write the data and record what was prepared."""
    head = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    if head != OFFICIAL_COMMIT:
        print(f"note: {official} is at {head}; the code and lists are taken at {OFFICIAL_COMMIT}")
    git_archive(official, OFFICIAL_COMMIT, "code", OFFICIAL_DIR)
    todo = apply_edits(CODE, edits(patch))
    print_edits(todo)
    check_imports(python)
    write_data(official, SHARED / "acdc", DATA)
    write_json(PREPARED, {"commit": OFFICIAL_COMMIT, "patch": patch, "edits": todo, "data": str(DATA)})


# ---------------------------------------------------------------------------------------------------- scoring
def test_volumes(patch: int):
    """The 40 test volumes our runs evaluate against, and the dataset's spec (class names, intensity)."""
    from label_efficient.context import DataContext
    from label_efficient.recipe import parse_recipe

    r = parse_recipe({"data": {"dataset": "acdc", "image_size": [patch, patch]},
                      "stages": [{"strategy": "supervised", "steps": 1}]})
    ctx = DataContext.build(r.stage_data(0), r.seed)
    return ctx.volumes("test", None), ctx.spec


def score(model, patch: int, prefix: str = "") -> dict:
    """SSL4MIS's test protocol (our :func:`evaluate_ssl4mis`) of ``model`` at the patch size, one thread."""
    import torch

    from label_efficient.evaluation import evaluate_ssl4mis

    torch.set_num_threads(1)
    vols, spec = test_volumes(patch)
    model.eval()
    s = evaluate_ssl4mis(model, vols, spec.num_classes, spec.class_names, ["dice", "hd95"], patch_size=(patch, patch),
                         intensity=spec.intensity, image_remap=spec.image_remap)
    out = {"mean_dice": round(s["mean_dice"], 4), "hd95": round(s["mean_hd95"], 2),
           "per_class_dice": {k: round(v, 4) for k, v in s["per_class"]["dice"].items()}, "num_cases": s["num_cases"]}
    return {f"{prefix}{k}": v for k, v in out.items()} if prefix else out


def official_unet(weights: Path):
    """The official UNet class (from the copied code) with ``weights`` loaded."""
    import torch

    spec = importlib.util.spec_from_file_location("ssl4mis_unet", CODE / "networks" / "unet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.UNet(in_chns=1, class_num=4)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net


# ---------------------------------------------------------------------------------------------------- official
LOG_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] iteration (\d+) : (loss|mean_dice) : ([-\d.e]+)")


def parse_log(path: Path) -> dict:
    """Median seconds between consecutive training iterations of the official log (validation excluded), the
    mean over the whole run, and the validation curve (iteration, mean Dice)."""
    stamps, val = [], []
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        h, mi, s, ms, it, kind, value = m.groups()
        if kind == "mean_dice":
            val.append([int(it), round(float(value), 4)])
        else:
            stamps.append(int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 1000)
    gaps = [(b - a) % 86400 for a, b in zip(stamps, stamps[1:])]
    val_its = {it for it, _ in val}
    train_gaps = [g for i, g in enumerate(gaps, 2) if i - 1 not in val_its]  # gap i-1 → i spans validation i-1
    best = max(val, key=lambda v: v[1]) if val else None
    return {"s_per_iter": round(statistics.median(train_gaps), 3) if train_gaps else None,
            "s_per_iter_mean": round(sum(gaps) / len(gaps), 3) if gaps else None, "logged_iterations": len(stamps),
            "val_curve": val, "best_val_dice": best[1] if best else None, "best_val_iteration": best[0] if best else None}


def run_official(seed: int, iterations: int, labeled: int, patch: int, python: str, smoke: bool,
                 augment: bool = True) -> dict:
    """Train the edited official script (fresh snapshot), time it, and score its best and last weights."""
    from label_efficient import provenance

    prepared = json.loads(PREPARED.read_text()) if PREPARED.exists() else None
    if prepared is None or prepared["patch"] != patch:
        raise SystemExit(f"run `prepare --patch {patch}` first (prepared: {prepared and prepared['patch']})")
    exp = f"{'smoke_' if smoke else ''}parity_MT_s{seed}_t{iterations}_p{patch}{'' if augment else '_noaug'}"
    code = CODE if augment else no_augment_code()
    snap = MODELS / f"{exp}_{labeled}_labeled" / "unet"
    if snap.parent.exists():
        shutil.rmtree(snap.parent)
    cmd = [python, SCRIPT, "--root_path", str(DATA), "--exp", exp, "--max_iterations", str(iterations),
           "--labeled_num", str(labeled), "--seed", str(seed)]
    print("cd", code, "&&", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t = time.time()
    (MODELS / "stdout").mkdir(parents=True, exist_ok=True)
    with open(MODELS / "stdout" / f"{exp}.txt", "w") as out:
        proc = subprocess.run(cmd, cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - t
    if proc.returncode:
        raise SystemExit(f"the official run failed: see {MODELS / 'stdout' / f'{exp}.txt'}")
    timing = parse_log(snap / "log.txt")
    best = snap / "unet_best_model.pth"
    if not best.exists() and not smoke:
        raise SystemExit(f"no {best}: the run validated no checkpoint (fewer than 200 iterations?)")
    last = score(official_unet(snap / "unet_last_model.pth"), patch, "last_")
    selected = score(official_unet(best), patch) if best.exists() else {k[5:]: v for k, v in last.items()}
    return {"code": "official", "labeled": labeled, "seed": seed, "iterations": iterations, "patch": patch,
            "augment": augment, **selected, "selected_checkpoint": best.name if best.exists() else "unet_last_model.pth (smoke)", **last,
            **timing, "train_seconds": round(seconds, 1), "precision": PRECISION, "threads": 1,
            "load_average": round(os.getloadavg()[0], 2), "official_commit": prepared["commit"],
            "command": " ".join(cmd[1:]), "edits": prepared["edits"] + ([] if augment else [NO_AUGMENT_EDIT]),
            "provenance": provenance.collect(PRECISION, requested="fp32 (the official code on the CPU)", t_start=t)}


# ---------------------------------------------------------------------------------------------------- ours
def our_recipe(seed: int, iterations: int, labeled: int, patch: int, augment: bool = True) -> dict:
    """Our ``mean_teacher`` in the SSL4MIS configuration (see the module docstring for what still differs)."""
    return {
        "name": f"parity_mean_teacher_l{labeled}", "seed": seed,
        "data": {"dataset": "acdc", "image_size": [patch, patch], "budget": {"flag": f"labeled_{labeled}"},
                 "max_val_cases": None, "augment": augment},
        "backbone": {"name": "basic_unet", "kwargs": {}},  # the SSL4MIS U-Net
        "trainer": {"precision": PRECISION, "progress_bar": False, "log_every": 50},
        "evaluation": {"metrics": ["dice", "hd95"], "empty": "ssl4mis", "overlays": 0},
        "stages": [{
            "strategy": "mean_teacher", "steps": iterations, "val_every": 200,
            "batch_size": {"labeled": 12, "unlabeled": 12},
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "schedule": "poly",
                          "poly_power": 0.9},
            "config": {"ema_decay": 0.99, "consistency": 0.1, "rampup_fraction": RAMP_ITERATIONS / iterations},
        }],
    }


def run_ours(seed: int, iterations: int, labeled: int, patch: int, smoke: bool, augment: bool = True) -> dict:
    """Run our recipe (one thread, resumable) and score its selected weights and ``last.ckpt`` as the official's."""
    from label_efficient.checkpoints import load_for_evaluation
    from label_efficient.context import DataContext
    from label_efficient.recipe import parse_recipe

    recipe = our_recipe(seed, iterations, labeled, patch, augment)
    out = OUR_RUNS / f"{'smoke_' if smoke else ''}mt_l{labeled}_s{seed}_t{iterations}_p{patch}{'' if augment else '_noaug'}"
    m = run_recipe_process(recipe, out)
    parsed = parse_recipe(recipe)
    ctx = DataContext.build(parsed.stage_data(0), parsed.seed)
    stage = m["stages"][-1]
    selected = score(load_for_evaluation(parsed, ctx, out / "model.pt"), patch)
    last = score(load_for_evaluation(parsed, ctx, next(out.glob("stage0_*")) / "last.ckpt"), patch, "last_")
    prov = row_provenance(m)
    return {"code": "ours", "labeled": labeled, "seed": seed, "iterations": iterations, "patch": patch,
            "augment": augment, **selected,
            "selected_checkpoint": stage.get("best"), **last, "best_val_dice": stage.get("best_score"),
            "s_per_iter": None, "s_per_iter_mean": round(m["train_seconds"] / iterations, 3),
            "train_seconds": round(m["train_seconds"], 1), "runner_mean_dice": round(m["mean_dice"], 4),
            "precision": prov.get("precision") or PRECISION, "threads": 1, "load_average": round(os.getloadavg()[0], 2),
            "command": f"parity_mean_teacher.py ours --seed {seed} --iterations {iterations} --labeled {labeled} "
                       f"--patch {patch}{'' if augment else ' --no-augment'}",
            "recipe": recipe, "provenance": prov}


def save(row: dict) -> list[dict]:
    return merge_rows(RESULTS, [row], key=lambda r: (r["code"], r["labeled"], r["seed"], r["iterations"], r["patch"],
                                                     r.get("augment", True)),
                      sort=lambda r: (r["labeled"], r["patch"], r["iterations"], not r.get("augment", True),
                                      r["code"] != "official", r["seed"]))


# ---------------------------------------------------------------------------------------------------- RESULTS.md
def load_results() -> list[dict]:
    return load_rows(RESULTS)


def _cells(rs: list[dict]) -> list[str]:
    d, h = [r["mean_dice"] for r in rs], [r["hd95"] for r in rs]
    timed = [r for r in rs if not r.get("timing_note")]  # a run paused or sharing its core is not a speed figure
    med = [r["s_per_iter"] for r in timed if r.get("s_per_iter") is not None]
    return [", ".join(str(r["seed"]) for r in rs), mean_sd(d) or f"{d[0]:.4f}", ", ".join(f"{x:.4f}" for x in d),
            mean_sd([r["last_mean_dice"] for r in rs]) or f"{rs[0]['last_mean_dice']:.4f}",
            mean_sd(h, ".2f") or f"{h[0]:.2f}", f"{statistics.median(med):.2f}" if med else ("n/a" if timed else "n/r"),
            f"{statistics.mean(r['s_per_iter_mean'] for r in timed):.2f}" if timed else "n/r"]


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["labeled"], r["patch"], r["iterations"], r.get("augment", True), r["code"]), []).append(r)
    table = [[code, f"{labeled} patients", f"{patch}²", iters, "its own" if augment else "none (ablation)",
              *_cells(rs), ", ".join(dict.fromkeys(r["precision"] for r in rs)),
              f"`{code} --seed S --iterations {iters} --labeled {labeled} --patch {patch}"
              f"{'' if augment else ' --no-augment'}`"]
             for (labeled, patch, iters, augment, code), rs in groups.items()]
    return "\n".join([
        "## Beside the official code: mean teacher (SSL4MIS)", "",
        "`python benchmarks/parity_mean_teacher.py official|ours --seed S --iterations N --labeled 7 --patch 128` "
        f"(rows in `results/{RESULTS.name}`; the script's docstring lists the edits to the official code and the "
        "differences left): SSL4MIS's `code/train_mean_teacher_2D.py` (commit "
        f"`{OFFICIAL_COMMIT[:7]}`, CPU-only edits) and our `mean_teacher` in its configuration (SSL4MIS U-Net, 12 + 12 "
        "slices, SGD 0.01 poly 0.9, its consistency ramp at the same truncated schedule, best val Dice every 200 "
        "iterations), on the same ACDC slices, split and labelled patients, in fp32 with one thread; both scored by "
        "our `evaluate_ssl4mis` (SSL4MIS's test protocol at the training patch) on the 40 test volumes. s/iter: "
        "median interval between logged iterations (official only; validation excluded), and the mean over the run "
        "(validation included; ours: train seconds / steps). Augmentation \"none\": the `--no-augment` ablation "
        "(the official's rotation / flip branch removed, ours with `data.augment: false`).", "",
        md_table(["code", "labelled", "patch", "iterations", "augmentation", "seeds", "mean Dice (mean ± s.d.)", "per seed",
                  "last-weights Dice", "HD95 (px)", "s/iter (median)", "s/iter (mean)", "precision", "command"],
                 table), "",
        *[f"- n/r, {r['code']} seed {r['seed']}: {r['timing_note']}" for r in rows if r.get("timing_note")], ""])


# ---------------------------------------------------------------------------------------------------- CLI
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["prepare", "official", "ours"])
    ap.add_argument("--official", type=Path, help="prepare: the official repository (a git dir)")
    ap.add_argument("--official-python", default=sys.executable, help="the interpreter that runs the official code")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--labeled", type=int, default=7, choices=sorted(LABELED_SLICES))
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="a pipeline check: own run folder, no row saved")
    ap.add_argument("--no-augment", action="store_true", help="the augmentation ablation (both sides unaugmented)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if args.table_only or args.command is None:
        rebuild_report()
        return
    if args.command == "prepare":
        if args.official is None:
            raise SystemExit("prepare: give --official <the SSL4MIS git dir>")
        prepare(args.official, args.patch, args.official_python)
        return
    if args.command == "official":
        row = run_official(args.seed, args.iterations, args.labeled, args.patch, args.official_python, args.smoke,
                           not args.no_augment)
    else:
        row = run_ours(args.seed, args.iterations, args.labeled, args.patch, args.smoke, not args.no_augment)
    print(json.dumps({k: v for k, v in row.items() if k not in ("provenance", "edits", "recipe")}), flush=True)
    if not args.smoke:
        save(row)
        rebuild_report()


if __name__ == "__main__":
    main()
