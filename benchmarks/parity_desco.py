"""DeSCO beside its official code (HengCai-NJU/DeSCO ``code/train_desco.py``): 3D LA, the same images, the same
labelled / unlabelled cases, the same registration-propagated labels, network, crop, schedule and evaluator; rows to
results/parity_desco.json.

    python benchmarks/parity_desco.py prepare --official /work/.mirror/HengCai-NJU+DeSCO/repo
    python benchmarks/parity_desco.py official --seed 1337 --iterations 400
    python benchmarks/parity_desco.py ours --seed 1337 --iterations 400
    python benchmarks/parity_desco.py official --seed 1338 --iterations 400
    python benchmarks/parity_desco.py ours --seed 1338 --iterations 400
    python benchmarks/parity_desco.py official --seed 1337 --iterations 5 --smoke   # pipeline check, no row
    python benchmarks/parity_desco.py ours --seed 1337 --iterations 5 --smoke       # pipeline check, no row
    python benchmarks/parity_desco.py official --seed 1337 --iterations 40 --timing  # speed rows: each code alone,
    python benchmarks/parity_desco.py ours --seed 1337 --iterations 40 --timing      # one after the other
    python benchmarks/parity_desco.py --table-only      # RESULTS.md from the rows (= python benchmarks/report.py)

``prepare`` copies the official ``code/`` (commit ``OFFICIAL_COMMIT``, by ``git archive``) into the gitignored
``benchmarks/runs/official/DeSCO/code``, applies the CPU edits of :func:`edits` there (each an exact replacement that
must match once, in the file as shipped and when it is applied; the list is printed and recorded in
``prepared.json`` and in every row) and writes ``_cpu_standins.py`` (torchvision is not installed beside the CPU
torch; tensorboardX is, but a no-op writer keeps event files out). It then makes OUR propagated labels once:
``benchmarks/runs/parity_desco/targets/<case>.npz`` (keys ``label`` (the sparse label: the two GT slices),
``label_mask``, ``label_1``/``dist_1`` (Net1: grown along z from the axial slice, the coronal GT slice pasted in),
``label_2``/``dist_2``), copied from a run of ours that has them (``<runs>/*/*/stage0_desco/targets``, e.g.
``la_desco.py``'s) or else built by our own code path (``StepBatches`` with the recipe's ``SliceAnnotation`` and
``DeSCO.target_transform()``: ANTs SyNRA, 2-3 min per volume on one core). From those and our readers
(``DataContext`` of ``recipes/la_desco.yaml``: ``build_dataset("la_heart")``, its ``CaseStore``) it writes the official
layout under ``.../DeSCO/data``: ``LA/<id>.h5`` (``image`` = our z-scored float32 volume, axes (x, y, z), as our runs
see it; ``label`` = the sparse label for the 5 labelled cases, zeros for the 11 unlabelled, the dense GT for the 8
test cases), ``LA/<id>px.h5`` (``label_1``) and ``LA/<id>py.h5`` (``label_2``) for the labelled cases,
``train_la.txt`` (our 5 labelled cases first, as the official code takes its first 5 lines as labelled, then our 11
unlabelled) and ``test_la.txt``. No dense label of a labelled case reaches either code's training.

The common configuration: 400 iterations; per network 1 labelled + 1 unlabelled crop of 80×80×48 (the official
``--batch_size 2 --labeled_bs 1``, one loader per network; ours ``{labeled: 2, unlabeled: 2}`` split in halves);
our 3D U-Net 16…128 (MONAI, BN, dropout 0.1) in both codes; SGD 0.01 / 0.9 / 1e-4, Net1 ×0.1 at 167 and 334, Net2
constant; s, λ, τ and the LR steps on the paper's 6000 iterations (15 per step, the edits' ``paper(i)``); the
axial annotated slice z = 44 in both (the official hard-codes 43; an edit moves it to our middle slice); fp32; one
thread; seeds 1337 and 1338 on each side (each side reproducible; the two codes' draws are not equal). Net1's last
weights are scored.

``official`` runs the edited ``train_desco.py`` in a one-thread subprocess (cwd ``code/``, ``OMP_NUM_THREADS=1``, and
an edit calls ``torch.set_num_threads(1)``) with ``--dataset la --split train --exp E --max_iterations N --seed S``
(everything else at its defaults), checks from its log that it ran N iterations, times them from its log (it logs
every iteration with a millisecond stamp: ``s/iter (median)`` is the median interval, ``s/iter (mean)`` first to
last stamp / (N − 1)) and scores its Net1 ``iter_N.pth`` in our U-Net. ``ours`` runs ``recipes/la_desco.yaml`` at
``precision: 32-true`` for N steps (Net1's ``step_size`` = ⌈2500·N/6000⌉, 167 at 400) through ``run_recipe_process``
with the SAME targets copied into its ``stage0_desco/targets/`` first (their sha256 are checked and recorded), and is
scored by its own ``metrics.json`` (``runner_mean_dice``) and by the same scorer as the official (``mean_dice``); ours
has no per-step time, so only ``s/iter (mean)`` = train seconds / steps. The scorer (:func:`score`) is our runner's
test: :func:`label_efficient.evaluation.evaluate` on the 8 test volumes, MONAI Gaussian sliding window at 80×80×48
with overlap 0.5, Dice and HD95 (in mm: the LA volumes carry their 0.625 mm spacing), the recipe's empty-class
rule (NaN).

Known differences left between the two configurations:

* BN batching of the MC passes: the official makes its T = 8 noisy teacher passes as 4 forwards of 2 copies, ours
  as one forward of 8; in train mode the BN batch statistics come from 2 copies there, from 8 here, and each
  network's running statistics (which Net1 is evaluated with) get 6 updates per iteration there, 3 here (own
  forward, clean pseudo-label pass, noisy passes).
* Augmentation: the official rotates by k·90° (k ∈ 0…3) in the x-y plane and then always flips one of x, y: every
  crop is one of the 4 reflections; ours draws rot90 (p = 0.5, k ∈ 1…3) and a flip of x and of y (p = 0.5 each):
  all 8 in-plane symmetries, half of the crops unreflected. The official crop offset never takes the last position
  (``randint(0, w − p)``).
* The logged cross term when no voxel is confident: 1.0 in the official wce, 0 in ours (zero gradient in both); it
  changes logged losses only.
* Per-network labelled draw: the official's two loaders permute the 5 labelled cases independently, so Net1 and Net2
  can train on the same case in an iteration; ours takes two consecutive draws of one permutation (different cases
  within a pass).
* Independent loaders: the official draws each network's unlabelled case, crop and flips from its own loader (one
  global numpy stream, no workers here), ours from per-(seed, draw) generators; the two codes never see the same
  crops.

Removed by the setup (so not differences here): the backbone (the official V-Net), crop, case counts, the labelled
cases (the official's first 5 lines), the axial slice (43), input intensities (the official feeds the stored h5
image: ours is written in its place), registration (both get our SyNRA labels; the official's own ``registration.py``
runs SyN and crashes on ``opentime2``), precision (ours defaults to bf16-mixed on AVX-512-BF16 hosts) and the
evaluator (the official's stride 18/4 uniform window, an empty prediction scoring 0, is not run).

Only ``benchmarks/common.py`` and the standard library are imported at module level; torch, h5py, yaml and the
package inside functions, so ``section(rows)`` runs without them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (RESULTS_DIR, ROOT, RUNS_DIR, apply_edits, edit_list, git_archive, git_show, load_json, load_rows,
                    md_table, merge_rows, print_edits, rebuild_report, row_provenance, run_recipe_process,
                    summary_cell, value_cell, write_json)

RESULTS = RESULTS_DIR / "parity_desco.json"
OFFICIAL_COMMIT = "d3f08527e11464867eac5ecba2fa8f36b3b540f5"
OFFICIAL_REPO = "HengCai-NJU/DeSCO"
OFFICIAL_DIR = RUNS_DIR / "official" / "DeSCO"
CODE = OFFICIAL_DIR / "code"
DATA = OFFICIAL_DIR / "data"  #: the official ``../data`` from ``code/``: ``LA/``, ``train_la.txt``, ``test_la.txt``
MODELS = OFFICIAL_DIR / "model"  #: the official ``../model/<exp>/`` from ``code/``
PREPARED = OFFICIAL_DIR / "prepared.json"
OUR_RUNS = RUNS_DIR / "parity_desco"
TARGETS = OUR_RUNS / "targets"  #: our propagated labels, made once, given to both codes
RECIPE = ROOT / "recipes" / "la_desco.yaml"
SCRIPT = "train_desco.py"
STAGE_FOLDER = "stage0_desco"  #: our run's stage folder (its ``targets/`` cache)
PRECISION = "32-true"  #: both train in fp32 on the CPU
CROP = (80, 80, 48)
N_LABELED, N_TRAIN = 5, 16  #: our budget (count 5) and the LA subset's train cases
AXIAL = 44  #: our axial annotated slice, 88 // 2 (the official hard-codes 43)
PAPER_ITERATIONS = 6000  #: the official --max_iterations default: the schedules' time base on both sides
#: the official U-Net in both codes = recipes/la_desco.yaml's backbone (checked by ``prepare`` and ``ours``)
BACKBONE = {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128], "num_res_units": 0, "dropout": 0.1}}
TARGET_KEYS = ("label", "label_mask", "label_1", "dist_1", "label_2", "dist_2")
KNOWN_DIFFERENCES = [
    "BN batching of the MC passes: official 4 forwards of 2 noisy copies, ours 1 forward of 8 (BN batch statistics; "
    "6 vs 3 running-statistics updates per network and iteration)",
    "augmentation: official rot90 k in 0..3 then always one flip (the 4 reflections); ours rot90 p 0.5 and a flip of "
    "each in-plane axis p 0.5 (all 8 symmetries)",
    "logged cross term on an empty confidence mask: official 1.0, ours 0 (zero gradient in both)",
    "labelled draw per network: official two independent permutations (same case possible), ours consecutive draws "
    "of one permutation",
    "independent loaders: the two codes draw different unlabelled cases, crops and flips",
]


# ---------------------------------------------------------------------------------------------------- the edits
def edits() -> list[dict]:
    """The edits applied to the copied official code: ``file``, exact ``old`` (matched once), ``new``, ``why``.
    Line numbers in ``why`` are the file's at ``OFFICIAL_COMMIT``."""
    t, la = SCRIPT, "dataloaders/la_heart.py"
    standin = "stand-in (_cpu_standins.py)"
    crop = ", ".join(map(str, CROP))
    mc_teacher = ("            for i in range(T // 2):\n"
                  "                cs_inputs = volume_batch_r + torch.clamp(torch.randn_like(volume_batch_r) * 0.1, "
                  "-0.2, 0.2)\n"
                  "                with torch.no_grad():\n"
                  "                    preds[2 * stride * i:2 * stride * (i + 1)] = {}(cs_inputs)")
    preds = "            preds = torch.zeros([stride * T, 2, patch_size[0], patch_size[0], patch_size[2]])"
    loader = ("{i}trainloader1 = DataLoader(db_train1, batch_sampler=batch_sampler, num_workers={w},{p}\n"
              "{c}worker_init_fn=worker_init_fn)\n"
              "{i}trainloader2 = DataLoader(db_train2, batch_sampler=batch_sampler, num_workers={w},{p}\n"
              "{c}worker_init_fn=worker_init_fn)")
    slice_weight = "LARandomCrop{k}(patch_size, get_current_slice_weight({x} // args.slice_weight_step))"
    paper_rebuild = "paper(iter_num) // 1000 * 1000"
    e = [
        (t, "from tensorboardX import SummaryWriter", "from _cpu_standins import SummaryWriter",
         f":4 tensorboardX {standin}: installed, but no event files are wanted"),
        (t, "from torchvision import transforms", "from _cpu_standins import transforms",
         f":14 torchvision {standin}: not installable beside the CPU torch (only Compose is used)"),
        (t, "from torchvision.utils import make_grid", "from _cpu_standins import make_grid",
         f":18 torchvision {standin} (make_grid is only used by the TensorBoard images, disabled below)"),
        (la, "from torchvision import transforms\nfrom torchvision.transforms import Compose",
         "from _cpu_standins import transforms\nCompose = transforms.Compose",
         f":7-8 torchvision {standin} (Compose is only used by make_data_3d)"),
        (t, "import torch\nimport torch.optim as optim", "import torch\ntorch.set_num_threads(1)\nimport torch.optim as optim",
         ":12 one thread, as our runs (run_recipe_process)"),
        (t, "labeled_bs = args.labeled_bs\n",
         "labeled_bs = args.labeled_bs\n"
         f"PAPER_ITERATIONS = {PAPER_ITERATIONS}  # parity: the schedules run on the paper's iterations\n\n\n"
         "def paper(i):\n"
         "    return i * PAPER_ITERATIONS // max_iterations\n",
         ":52 paper(i) = i·6000 // N, our time base (label_efficient DeSCO.paper_iteration); the identity at N = 6000"),
        (t, "num_classes = 2\npatch_size = (112, 112, 80)\n", f"num_classes = 2\npatch_size = ({crop})\n",
         ":63 the common crop 80×80×48 (ours)"),
        (t, 'if args.dataset=="la":\n    patch_size = (112, 112, 80)', f'if args.dataset=="la":\n    patch_size = ({crop})',
         ":65 the common crop 80×80×48 (ours)"),
        (t, "        net = VNet(n_channels=1, n_classes=num_classes, normalization='batchnorm', has_dropout=True)\n"
            "        model = net.cuda()",
         "        from label_efficient.backbones import build_backbone  # parity: our U-Net in both codes\n"
         "        net = build_backbone(\"unet\", 3, 1, num_classes, channels=[16, 32, 64, 128], num_res_units=0, "
         "dropout=0.1)\n"
         "        model = net",
         ":104-105 the same network as ours (recipes/la_desco.yaml: MONAI U-Net 16…128, BN, dropout 0.1; each network "
         "initialised independently as before); CPU: no .cuda()"),
        (t, "        labeled_idxs = list(range(5))\n        unlabeled_idxs = list(range(5, 80))\n    elif",
         f"        labeled_idxs = list(range(5))\n        unlabeled_idxs = list(range(5, {N_TRAIN}))\n    elif",
         ":129 our 11 unlabelled cases (train_la.txt lines 6-16)"),
        (t, "                    unlabeled_idxs = list(range(5, 80))",
         f"                    unlabeled_idxs = list(range(5, {N_TRAIN}))",
         ":369 our 11 unlabelled cases, at every rebuild"),
        (t, loader.format(i="    ", c=" " * 30, w=4, p=" pin_memory=True,"),
         loader.format(i="    ", c=" " * 30, w=0, p=""),
         ":172-175 one process, one thread: no loader workers, no pin_memory"),
        (t, loader.format(i=" " * 16, c=" " * 42, w=4, p=" pin_memory=True,"),
         loader.format(i=" " * 16, c=" " * 42, w=0, p=""),
         ":408-411 one process, one thread: no loader workers, no pin_memory (the rebuilt loaders)"),
        (t, "    max_epoch = max_iterations // len(trainloader1) + 1", "    max_epoch = max_iterations + 1",
         ":184 required: the rebuilds end their epoch early (:412), so with 5 iterations per epoch and rebuilds at "
         "67, 134, 200, 267, 334 the epoch count runs out at 389 iterations (iter_400.pth would still be saved); "
         "the loop still stops at max_iterations (:350, :414)"),
        (t, "            maskz = maskz[0:labeled_bs].cuda()\n"
            "            maskzz = torch.unsqueeze(maskz, 1).cuda()\n"
            "            maskzz = maskzz.repeat(1, 2, 1, 1, 1).cuda()\n"
            "            volume_batch, label_batch = volume_batch.cuda(), label_batch.cuda()\n",
         "            maskz = maskz[0:labeled_bs]\n"
         "            maskzz = torch.unsqueeze(maskz, 1)\n"
         "            maskzz = maskzz.repeat(1, 2, 1, 1, 1)\n",
         ":195-198 CPU: no .cuda()"),
        (t, preds + ".cuda()\n" + mc_teacher.format("m_seg2"), preds + "\n" + mc_teacher.format("m_seg2"),
         ":210 CPU: no .cuda() (Net1's teacher passes)"),
        (t, "consistency_weight = get_current_consistency_weight(iter_num // 150)\n            threshold",
         "consistency_weight = get_current_consistency_weight(paper(iter_num) // 150)\n            threshold",
         ":229 λ on paper iterations (= ours DeSCO.consistency_weight); τ (:230) is left as is: "
         "sigmoid_rampup(i, N) = sigmoid_rampup(paper(i), 6000) exactly when N divides 6000"),
        (t, "            volume_batch, label_batch = volume_batch.cuda(), label_batch.cuda()\n"
            "            unlabeled_volume_batch = volume_batch[labeled_bs:]\n"
            "            masky = masky[0:labeled_bs].cuda()\n"
            "            maskyy = torch.unsqueeze(masky, 1).cuda()\n"
            "            maskyy = maskyy.repeat(1, 2, 1, 1, 1).cuda()\n",
         "            unlabeled_volume_batch = volume_batch[labeled_bs:]\n"
         "            masky = masky[0:labeled_bs]\n"
         "            maskyy = torch.unsqueeze(masky, 1)\n"
         "            maskyy = maskyy.repeat(1, 2, 1, 1, 1)\n",
         ":249-253 CPU: no .cuda()"),
        (t, preds + ".cuda()\n" + mc_teacher.format("m_seg1"), preds + "\n" + mc_teacher.format("m_seg1"),
         ":262 CPU: no .cuda() (Net2's teacher passes)"),
        (t, "consistency_weight = get_current_consistency_weight(iter_num // 150)\n\n            threshold",
         "consistency_weight = get_current_consistency_weight(paper(iter_num) // 150)\n\n            threshold",
         ":281 λ on paper iterations (Net2); τ (:283) as is"),
        (t, "            if iter_num % 50 == 0:",
         "            if False:  # parity: no TensorBoard images (make_grid, decode_seg_map)",
         ":309 the TensorBoard image block (:309-336) off; it changes no training state"),
        (t, "            if iter_num % 2500 == 0:\n                lr_ = base_lr * 0.1 ** (iter_num // 2500)",
         "            if paper(iter_num) // 2500 > paper(iter_num - 1) // 2500:\n"
         "                lr_ = base_lr * 0.1 ** (paper(iter_num) // 2500)",
         ":340-341 Net1's LR ×0.1 at paper iterations 2500 and 5000 = iterations 167 and 334 of 400 (ours step_size "
         "167); still optimizer1 only; the same as iter_num % 2500 == 0 at N = 6000"),
        (t, "            if iter_num % 1000 == 0:",
         "            if paper(iter_num) // 1000 > paper(iter_num - 1) // 1000:",
         ":352 rebuild (new s) at paper iterations 1000…5000 = iterations 67, 134, 200, 267, 334 (ours switches s at "
         "the same steps); the same as iter_num % 1000 == 0 at N = 6000"),
        (t, slice_weight.format(k=1, x="iter_num"), slice_weight.format(k=1, x=paper_rebuild),
         ":357 s = ½(cos(π·t/40) + 1), t = the rebuild's paper iteration // 150 (0.946, 0.761, 0.5, 0.273, 0.074, as "
         "ours DeSCO.decay_base)"),
        (t, slice_weight.format(k=2, x="iter_num"), slice_weight.format(k=2, x=paper_rebuild),
         ":364 s for Net2's loader, as :357"),
        (la, "label[:, :, 43] = truelabel[:, :, 43]", f"label[:, :, {AXIAL}] = truelabel[:, :, {AXIAL}]",
         f":78 our axial annotated slice z = {AXIAL} (88 // 2); at 43 the paste would copy an empty slice of our "
         "sparse label into Net2's label"),
        (la, "self.slice_weight ** abs(i - 43)", f"self.slice_weight ** abs(i - {AXIAL})",
         f":225 Net1's weights s^|z − {AXIAL}| from our axial slice"),
        (la, "weight[:,:,43]=1", f"weight[:,:,{AXIAL}]=1", f":267 Net2's weight 1 on our axial slice z = {AXIAL}"),
    ]
    return edit_list(e)


def copy_official(official: Path) -> list[dict]:
    """``git archive`` the official ``code/`` at ``OFFICIAL_COMMIT`` into :data:`CODE` and apply the edits."""
    git_archive(official, OFFICIAL_COMMIT, "code", OFFICIAL_DIR)
    todo = edits()
    original = {f: git_show(official, OFFICIAL_COMMIT, f"code/{f}") for f in {e["file"] for e in todo}}
    return apply_edits(CODE, todo, original)


def check_official_code(python: str) -> str:
    """The edited files compile, ``train_desco.py``'s module level imports (stand-ins included; its training runs
    under ``__main__`` only), C's namespace packages are the ones in ``code/`` and our U-Net builds there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([python, "-m", "py_compile", SCRIPT, "dataloaders/la_heart.py"], cwd=CODE, check=True, env=env)
    kw = ", ".join(f"{k}={v!r}" for k, v in BACKBONE["kwargs"].items())
    code = ("import os; import train_desco as t; "
            "import utils.losses, utils.ramps, dataloaders.la_heart, networks.vnet; "
            "here = os.getcwd(); "
            "bad = [m.__name__ for m in (utils.losses, utils.ramps, dataloaders.la_heart, networks.vnet) "
            "if not os.path.abspath(m.__file__).startswith(here)]; "
            "assert not bad, f'not from code/: {bad}'; "
            "assert t.patch_size == %r, t.patch_size; "
            "assert [t.paper(i) for i in (66, 67, 166, 167, 333, 334)] == [990, 1005, 2490, 2505, 4995, 5010]; "
            "from label_efficient.backbones import build_backbone; "
            f"net = build_backbone('unet', 3, 1, 2, {kw}); "
            "print(sum(p.numel() for p in net.parameters()))") % (CROP,)
    # argv after -c: train_desco.py parses its arguments at import (module level); 400 iterations for paper()
    p = subprocess.run([python, "-W", "ignore", "-c", code, "--max_iterations", "400"], cwd=CODE, capture_output=True,
                       text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{python} cannot import the edited official code:\n{p.stderr[-3000:]}")
    n = p.stdout.strip().splitlines()[-1]
    print(f"imports check: the edited official code imports under {python}; our U-Net there has {n} parameters")
    return n


# ---------------------------------------------------------------------------------------------------- our side
def our_recipe(seed: int, iterations: int) -> dict:
    """``recipes/la_desco.yaml`` at fp32 for ``iterations`` steps (Net1's LR step at ⌈2500·N/6000⌉; the second
    decay, at twice that, is the official's ⌈5000·N/6000⌉ at N = 400)."""
    import yaml

    r = yaml.safe_load(RECIPE.read_text())
    if r["backbone"] != BACKBONE or tuple(r["data"]["patch_size"]) != CROP:
        raise SystemExit(f"{RECIPE} no longer has the backbone / crop the official edits put in: "
                         f"{r['backbone']} / {r['data']['patch_size']} (edit BACKBONE / CROP and re-prepare)")
    st = r["stages"][0]
    step = math.ceil(2500 * iterations / PAPER_ITERATIONS)
    if iterations == 400 and step != st["optimizer"]["step_size"]:
        raise SystemExit(f"{RECIPE}: step_size {st['optimizer']['step_size']} is not the official's {step}")
    st.update(steps=iterations, val_every=min(st["val_every"], iterations))
    st["optimizer"] = {**st["optimizer"], "step_size": step}
    r.update(name="parity_desco", seed=seed)
    r["trainer"] = {**r.get("trainer", {}), "precision": PRECISION, "progress_bar": False}
    return r


def our_context(seed: int = 1337, iterations: int = 400):
    """(parsed recipe, stage plan, data context) of :func:`our_recipe`: our cases, store and test volumes."""
    from label_efficient.context import DataContext
    from label_efficient.planning import plan_stage
    from label_efficient.recipe import parse_recipe

    parsed = parse_recipe(our_recipe(seed, iterations))
    plan = plan_stage(parsed, 0)
    if plan.folder != STAGE_FOLDER:
        raise SystemExit(f"our stage folder is {plan.folder}, not {STAGE_FOLDER}")
    return parsed, plan, DataContext.for_stage(plan, parsed.seed)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _complete(folder: Path, ids: list[str]) -> bool:
    return folder.is_dir() and all((folder / f"{i}.npz").is_file() for i in ids)


def make_targets() -> dict:
    """Our propagated labels of the labelled cases in :data:`TARGETS`: kept when there, else copied from a run of
    ours, else built by our own code path. Returns what was done and each file's sha256."""
    import logging

    import numpy as np
    import torch

    from label_efficient.checkpoints import build_model
    from label_efficient.data import StepBatches, Stream
    from label_efficient.data.annotation import SliceAnnotation
    from label_efficient.provenance import git_commit
    from label_efficient.strategies.desco import annotated_slices

    parsed, plan, ctx = our_context()
    ids = [c.id for c in ctx.labeled]
    info = load_json(TARGETS / "targets.json", {})
    partial = sorted(TARGETS.glob("*.npz")) if TARGETS.is_dir() else []
    runs = [d for d in sorted(RUNS_DIR.glob(f"*/*/{STAGE_FOLDER}/targets")) if _complete(d, ids)]
    if _complete(TARGETS, ids) and info.get("cases") == ids:
        how = info.get("how", "kept")
    else:
        if runs and not partial:
            TARGETS.mkdir(parents=True, exist_ok=True)
            for i in ids:
                shutil.copy2(runs[0] / f"{i}.npz", TARGETS / f"{i}.npz")
            how = f"copied from {runs[0].relative_to(ROOT)}"
        else:  # the run's own path: StepBatches computes every labelled case's targets up front into its cache
            # (cases already in TARGETS are read back, so an interrupted build continues)
            TARGETS.mkdir(parents=True, exist_ok=True)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
            torch.set_num_threads(1)
            strategy = plan.strategy(build_model(parsed, ctx.spec), ctx.spec.num_classes, plan.stage.config,
                                     in_channels=ctx.spec.in_channels, spatial_dims=ctx.spec.spatial_dims)
            print(f"building our targets of {ids} (ANTs {strategy.config.registration}, 2-3 min a volume)", flush=True)
            t0 = time.time()
            StepBatches(ctx.store, {"labeled": Stream(ctx.labeled, 1, with_label=True)}, 1, seed=0,
                        patch_size=ctx.cfg.patch_size, annotation=SliceAnnotation(ctx.cfg.annotation),
                        target_transform=strategy.target_transform(), target_cache=TARGETS)
            how = (f"built by StepBatches + DeSCO.target_transform (label_efficient {git_commit()}) in "
                   f"{time.time() - t0:.0f} s")
    for i in ids:  # the layout the official edits assume
        with np.load(TARGETS / f"{i}.npz") as z:
            missing = [k for k in TARGET_KEYS if k not in z.files]
            if missing:
                raise SystemExit(f"{TARGETS / f'{i}.npz'} lacks {missing}")
            found = annotated_slices(z["label_mask"])
            want = {2: [AXIAL], 1: [z["label_mask"].shape[1] // 2]}
            if found != want:
                raise SystemExit(f"{i}: annotated slices {found}, the official edits assume {want}")
    out = {"how": how, "cases": ids, "sha256": {i: _sha256(TARGETS / f"{i}.npz") for i in ids}}
    write_json(TARGETS / "targets.json", out)
    print(f"targets: {how}", flush=True)
    return out


def write_data(ctx) -> dict:
    """The official layout under :data:`DATA` from our store and :data:`TARGETS` (see the module docstring)."""
    import h5py
    import numpy as np

    la = DATA / "LA"
    if la.exists():
        shutil.rmtree(la)
    la.mkdir(parents=True)

    def write(name: str, image, label) -> None:
        if image.shape != label.shape:
            raise SystemExit(f"{name}: image {image.shape} and label {label.shape} differ")
        with h5py.File(la / f"{name}.h5", "w") as h:
            h.create_dataset("image", data=np.asarray(image, np.float32))
            h.create_dataset("label", data=np.asarray(label).astype(np.uint8))

    labeled, unlabeled = [c.id for c in ctx.labeled], [c.id for c in ctx.unlabeled]
    test = ctx.spec.select("test", ctx.cfg.domain)
    if len(labeled) != N_LABELED or len(labeled) + len(unlabeled) != N_TRAIN:
        raise SystemExit(f"our split is {len(labeled)} + {len(unlabeled)}, the edits assume {N_LABELED} + "
                         f"{N_TRAIN - N_LABELED}")
    for case in ctx.labeled:
        image = ctx.store.get(case, True).image[0]
        with np.load(TARGETS / f"{case.id}.npz") as z:
            write(case.id, image, z["label"])  # sparse: only the two GT slices (read for the official pastes)
            write(f"{case.id}px", image, z["label_1"])  # Net1: z-propagated, coronal GT in place
            write(f"{case.id}py", image, z["label_2"])  # Net2: y-propagated, axial GT in place
    for case in ctx.unlabeled:
        image = ctx.store.get(case, False).image[0]
        write(case.id, image, np.zeros(image.shape, np.uint8))
    for case in test:
        item = ctx.store.get(case, True)
        write(case.id, item.image[0], item.label)
    (DATA / "train_la.txt").write_text("\n".join(labeled + unlabeled) + "\n")
    (DATA / "test_la.txt").write_text("\n".join(c.id for c in test) + "\n")
    print(f"wrote {len(labeled)} labelled (x3), {len(unlabeled)} unlabelled and {len(test)} test volumes to {la}")
    return {"train_la.txt": labeled + unlabeled, "labeled": labeled, "unlabeled": unlabeled,
            "test_la.txt": [c.id for c in test], "image": "our CaseStore image (z-scored per volume, float32, x y z)"}


def prepare(official: Path, python: str) -> None:
    """Copy the official code, apply the edits, make our targets, write the data and record what was prepared."""
    head = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    if head != OFFICIAL_COMMIT:
        print(f"note: {official} is at {head}; the code is taken at {OFFICIAL_COMMIT}")
    todo = copy_official(official)
    print_edits(todo)
    params = check_official_code(python)
    targets = make_targets()
    _, _, ctx = our_context()
    data = write_data(ctx)
    write_json(PREPARED, {"commit": OFFICIAL_COMMIT, "repo": OFFICIAL_REPO, "python": python, "crop": list(CROP),
                          "axial_slice": AXIAL, "backbone": BACKBONE, "unet_parameters": int(params),
                          "edits": todo, "targets": targets, "data": {"root": str(DATA.relative_to(ROOT)), **data}})
    print(f"prepared: {PREPARED}")


def prepared() -> dict:
    p = load_json(PREPARED)
    if p is None:
        raise SystemExit(f"{PREPARED} missing: run `python benchmarks/parity_desco.py prepare --official <git dir>`")
    return p


# ---------------------------------------------------------------------------------------------------- scoring
def score(model, seed: int = 1337, iterations: int = 400, prefix: str = "") -> dict:
    """Our runner's test of ``model`` (Net1) on the 8 test volumes: ``evaluate`` with the recipe's metrics,
    sliding window at the crop, overlap and empty-class rule; one thread."""
    import torch

    from label_efficient.evaluation import evaluate

    torch.set_num_threads(1)
    parsed, _, ctx = our_context(seed, iterations)
    ev = parsed.evaluation
    vols = ctx.volumes(ev.split, ctx.cfg.max_test_cases)
    model.eval()
    with torch.no_grad():
        s = evaluate(model, vols, ctx.spec.num_classes, ctx.spec.class_names, ctx.spec.spatial_dims, ev.metrics,
                     roi_size=ctx.cfg.patch_size, overlap=ev.sw_overlap, empty=ev.empty)
    unit = "voxels" if all(getattr(v, "spacing", None) is None for v in vols) else "mm"
    out = {"mean_dice": round(s["mean_dice"], 4), "hd95": round(s["mean_hd95"], 2), "hd95_unit": unit,
           "per_class_dice": {k: round(v, 4) for k, v in s["per_class"]["dice"].items()}, "num_cases": s["num_cases"],
           "empty_cases": {k: v for k, v in s["empty_cases"].items() if k != "pairs"}}
    return {f"{prefix}{k}": v for k, v in out.items()} if prefix else out


def official_net1(weights: Path, seed: int, iterations: int):
    """Our U-Net (the one the edited official code trains) with the official Net1 weights loaded."""
    import torch

    from label_efficient.checkpoints import build_model

    parsed, _, ctx = our_context(seed, iterations)
    net = build_model(parsed, ctx.spec)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net


# ---------------------------------------------------------------------------------------------------- official
LOG_LINE = re.compile(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] iteration (\d+) : loss : (\S+?),(\S+) cons_dist: (\S+?),")


def parse_log(path: Path) -> dict:
    """Seconds per iteration from the official log (a line per iteration, millisecond stamps): the median interval
    and first-to-last / (n − 1); the iterations logged and the last losses."""
    stamps, its, last = [], [], None
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if m:
            h, mi, s, ms, it, l1, l2, cons = m.groups()
            stamps.append(int(h) * 3600 + int(mi) * 60 + int(s) + int(ms) / 1000)
            its.append(int(it))
            last = {"loss_net1": float(l1), "loss_net2": float(l2), "cons_dist_net2": float(cons)}
    gaps = [(b - a) % 86400 for a, b in zip(stamps, stamps[1:])]
    return {"s_per_iter": round(statistics.median(gaps), 3) if gaps else None,
            "s_per_iter_mean": round(sum(gaps) / len(gaps), 3) if gaps else None,
            "logged_iterations": len(its), "last_logged_iteration": its[-1] if its else None, "last_losses": last}


def run_official(seed: int, iterations: int, python: str, prefix: str, timing_note: str | None) -> dict:
    """Train the edited official script (fresh snapshot folder), time it, and score its Net1."""
    from label_efficient import provenance

    p = prepared()
    exp = f"{prefix}parity_desco_s{seed}_t{iterations}"
    snap = MODELS / exp
    if snap.exists():
        shutil.rmtree(snap)
    cmd = [python, SCRIPT, "--dataset", "la", "--split", "train", "--exp", exp, "--max_iterations", str(iterations),
           "--seed", str(seed)]
    print("cd", CODE, "&& OMP_NUM_THREADS=1 MKL_NUM_THREADS=1", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    (MODELS / "stdout").mkdir(parents=True, exist_ok=True)
    stdout = MODELS / "stdout" / f"{exp}.txt"
    t = time.time()
    with open(stdout, "w") as out:
        proc = subprocess.run(cmd, cwd=CODE, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.time() - t
    if proc.returncode:
        raise SystemExit(f"the official run failed: see {stdout}")
    timing = parse_log(snap / "log.txt")
    if timing["logged_iterations"] != iterations or timing["last_logged_iteration"] != iterations:
        raise SystemExit(f"the official run logged {timing['logged_iterations']} iterations (last "
                         f"{timing['last_logged_iteration']}), not {iterations}: see {snap / 'log.txt'}")
    weights = snap / f"iter_{iterations}.pth"
    t_score = time.time()
    scores = score(official_net1(weights, seed, iterations), seed, iterations)
    return {"code": "official", "seed": seed, "iterations": iterations, "crop": list(CROP), **scores,
            "scored": f"Net1 {weights.name}", **timing, "timing_source": "official log: an entry per iteration",
            "train_seconds": round(seconds, 1), "score_seconds": round(time.time() - t_score, 1),
            "precision": PRECISION, "threads": 1, "load_average": round(os.getloadavg()[0], 2),
            **({"timing_note": timing_note} if timing_note else {}),
            "official_commit": p["commit"], "command": f"cd {CODE.relative_to(ROOT)} && OMP_NUM_THREADS=1 "
                                                       f"{' '.join(['python', *cmd[1:]])}",
            "edits": p["edits"], "targets_sha256": p["targets"]["sha256"], "known_differences": KNOWN_DIFFERENCES,
            "provenance": provenance.collect(PRECISION, requested="fp32 (the official code on the CPU)", t_start=t)}


# ---------------------------------------------------------------------------------------------------- ours
def run_ours(seed: int, iterations: int, prefix: str, timing_note: str | None) -> dict:
    """Run our recipe (one thread, resumable) on the shared targets and score its Net1 as the official's."""
    from label_efficient.checkpoints import load_for_evaluation

    p = prepared()
    recipe = our_recipe(seed, iterations)
    out = OUR_RUNS / f"{prefix}ours_s{seed}_t{iterations}"
    if prefix and out.exists():  # smoke and timing runs start afresh
        shutil.rmtree(out)
    from label_efficient.outputs import RECIPE_FILE, prepare as prepare_run_folder
    from label_efficient.recipe import parse_recipe

    # the folder's recipe first, as the runner writes it, so the copied targets sit in a run folder (the runner
    # refuses a folder holding files but no recipe) and the run below resumes it
    prepare_run_folder(out, parse_recipe(recipe), resume=(out / RECIPE_FILE).exists())
    dst = out / STAGE_FOLDER / "targets"
    dst.mkdir(parents=True, exist_ok=True)
    for case, sha in p["targets"]["sha256"].items():
        f = dst / f"{case}.npz"
        if not f.exists():
            shutil.copy2(TARGETS / f"{case}.npz", f)
        if _sha256(f) != sha:
            raise SystemExit(f"{f} is not the prepared target (sha256 differs): remove {out} and rerun")
    m = run_recipe_process(recipe, out)
    parsed, _, ctx = our_context(seed, iterations)
    t_score = time.time()
    scores = score(load_for_evaluation(parsed, ctx, out / "model.pt"), seed, iterations)
    stage = m["stages"][-1]
    prov = row_provenance(m)
    return {"code": "ours", "seed": seed, "iterations": iterations, "crop": list(CROP), **scores,
            "scored": f"Net1 model.pt ({stage.get('best')})", "runner_mean_dice": round(m["mean_dice"], 4),
            "runner_hd95": None if m.get("mean_hd95") is None else round(m["mean_hd95"], 2), "s_per_iter": None,
            "s_per_iter_mean": round(m["train_seconds"] / iterations, 3), "timing_source": "train seconds / steps",
            "train_seconds": round(m["train_seconds"], 1), "score_seconds": round(time.time() - t_score, 1),
            "precision": prov.get("precision") or PRECISION, "threads": 1,
            "load_average": round(os.getloadavg()[0], 2), **({"timing_note": timing_note} if timing_note else {}),
            "official_commit": p["commit"],
            "command": f"python benchmarks/parity_desco.py ours --seed {seed} --iterations {iterations}",
            "edits": p["edits"], "targets_sha256": p["targets"]["sha256"], "known_differences": KNOWN_DIFFERENCES,
            "recipe": recipe, "provenance": prov}


def save(row: dict) -> list[dict]:
    return merge_rows(RESULTS, [row], key=lambda r: (r.get("purpose", ""), r["code"], r["seed"], r["iterations"],
                                                    tuple(r["crop"])),
                      sort=lambda r: (r["iterations"], tuple(r["crop"]), r["seed"], r["code"] != "official"))


# ---------------------------------------------------------------------------------------------------- RESULTS.md
def load_results() -> list[dict]:
    return load_rows(RESULTS)


def _spi(r: dict | None) -> str:
    if r is None:
        return "—"
    if r.get("timing_note"):
        return "n/r"
    med = r.get("s_per_iter")
    return (f"{med:.2f} / " if med is not None else "") + value_cell(r.get("s_per_iter_mean"), ".2f")


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    timing = [r for r in rows if r.get("purpose") == "timing"]
    rows = [r for r in rows if r.get("purpose") != "timing"]
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in rows:
        groups.setdefault((r["iterations"], tuple(r["crop"])), {}).setdefault(r["code"], {})[r["seed"]] = r
    table = []
    for (iters, crop), by in groups.items():
        off, ours = by.get("official", {}), by.get("ours", {})
        c = "×".join(map(str, crop))
        for seed in sorted(set(off) | set(ours)):
            o, u = off.get(seed), ours.get(seed)
            table.append([iters, c, seed, value_cell(o and o["mean_dice"], ".4f"), value_cell(u and u["mean_dice"], ".4f"),
                          value_cell(o and o["hd95"], ".2f"), value_cell(u and u["hd95"], ".2f"), _spi(o), _spi(u),
                          ", ".join(dict.fromkeys(r["precision"] for r in (o, u) if r))])
        if len(off) > 1 or len(ours) > 1:
            os_, us = list(off.values()), list(ours.values())
            table.append([iters, c, f"mean ± s.d. ({len(os_)} / {len(us)} seeds)", summary_cell(os_, "mean_dice", ".4f"),
                          summary_cell(us, "mean_dice", ".4f"), summary_cell(os_, "hd95", ".2f"), summary_cell(us, "hd95", ".2f"),
                          "", "", ""])
        if off and ours:
            d = statistics.mean(r["mean_dice"] for r in ours.values()) - statistics.mean(r["mean_dice"] for r in off.values())
            h = statistics.mean(r["hd95"] for r in ours.values()) - statistics.mean(r["hd95"] for r in off.values())
            table.append([iters, c, "ours − official (difference of the means)", "", f"{d:+.4f}", "", f"{h:+.2f}",
                          "", "", ""])
    commit = rows[0]["official_commit"][:7]
    units = " / ".join(sorted({r.get("hd95_unit", "voxels") for r in rows}))
    return "\n".join([
        "## Beside the official code: DeSCO (HengCai-NJU/DeSCO)", "",
        "`python benchmarks/parity_desco.py prepare --official <git dir>`, then `official|ours --seed S --iterations "
        f"400` (rows in `results/{RESULTS.name}`; the script's docstring lists the edits to the official code and the "
        f"differences left): DeSCO's `code/train_desco.py` (commit `{commit}`, CPU edits: our 3D U-Net 16…128 with "
        "dropout 0.1, 80×80×48 crops, our 5 labelled + 11 unlabelled LA cases, s / λ / LR on the paper's 6000 "
        "iterations, axial slice z = 44, and the epoch count that lets it reach its last iteration) and our "
        "`recipes/la_desco.yaml` at fp32, each given the same z-scored images and the same propagated labels (ours, "
        "made once: ANTs SyNRA); per network 1 labelled + 1 unlabelled crop per iteration; one thread. Net1's last "
        "weights of both are scored by our runner's test (Gaussian sliding window at the crop, overlap 0.5) on the 8 "
        f"test volumes; HD95 in {units}. s/iter: official median interval between its logged iterations / mean over "
        "the run; ours train seconds / steps (n/r: the run shared its core or was paused).", "",
        md_table(["iterations", "crop", "seed", "official Dice", "ours Dice", "official HD95", "ours HD95",
                  "official s/iter (median / mean)", "ours s/iter (mean)", "precision"], table), "",
        *[f"- n/r, {r['code']} seed {r['seed']}: {r['timing_note']}" for r in rows if r.get("timing_note")], "",
        *_timing_table(timing)])


def _cpu_model(prov: dict) -> str:
    """The CPU of a row: ``provenance.collect``'s nested form (official rows) or ``row_provenance``'s flat one (ours)."""
    return (prov.get("cpu") or {}).get("model") or prov.get("cpu_model") or "—"


def _timing_table(timing: list[dict]) -> list[str]:
    """Speed rows (``--timing``): each code alone on the machine, one thread, one after the other."""
    if not timing:
        return []
    cells = [[r["code"], r["seed"], r["iterations"], _spi({k: v for k, v in r.items() if k != "timing_note"}),
              r.get("load_average", "—"), r["precision"], _cpu_model(r.get("provenance") or {}),
              r.get("timing_note", "")] for r in timing]
    return ["Speed, each code alone in one sitting (`... official|ours --seed 1337 --iterations N --timing`; the "
            "official from its per-iteration log stamps, ours train seconds / steps, which include its start-up):", "",
            md_table(["code", "seed", "iterations", "s/iter (median / mean)", "load average at the end", "precision",
                      "CPU", "note"], cells), ""]


# ---------------------------------------------------------------------------------------------------- CLI
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["prepare", "official", "ours"])
    ap.add_argument("--official", type=Path, help="prepare: the official repository (a git dir)")
    ap.add_argument("--official-python", default=sys.executable, help="the interpreter that runs the official code")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--smoke", action="store_true", help="a pipeline check: own run folder, no row saved")
    ap.add_argument("--timing", action="store_true", help="a speed row (own run folder, run it alone): s/iter "
                    "only, in the section's timing table")
    ap.add_argument("--timing-note", help="why the row's seconds are not a speed figure (e.g. shared cores)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if args.table_only or args.command is None:
        rebuild_report()
        return
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported (inside the functions)
        os.environ.setdefault(k, "1")
    if args.command == "prepare":
        if args.official is None:
            raise SystemExit("prepare: give --official <the DeSCO git dir> (fetch github:HengCai-NJU/DeSCO)")
        prepare(args.official, args.official_python)
        return
    if PAPER_ITERATIONS % args.iterations:
        print(f"note: {args.iterations} does not divide {PAPER_ITERATIONS}: the official τ ramp "
              "(sigmoid_rampup(i, N), left as is) then differs slightly from ours (sigmoid_rampup(paper(i), 6000))")
    prefix = "smoke_" if args.smoke else "timing_" if args.timing else ""
    if args.command == "official":
        row = run_official(args.seed, args.iterations, args.official_python, prefix, args.timing_note)
    else:
        row = run_ours(args.seed, args.iterations, prefix, args.timing_note)
    print(json.dumps({k: v for k, v in row.items() if k not in ("provenance", "edits", "recipe", "known_differences")}),
          flush=True)
    if not args.smoke:
        save({**row, "purpose": "timing"} if args.timing else row)
        rebuild_report()


if __name__ == "__main__":
    main()
