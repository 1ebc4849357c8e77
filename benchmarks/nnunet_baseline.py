"""nnU-Net v2 beside us: the same labelled cases, the same test cases, scored by our evaluator.

    python benchmarks/nnunet_baseline.py convert                          # raw datasets, every key below
    python benchmarks/nnunet_baseline.py plan --datasets acdc_labeled_3    # nnUNetv2_plan_and_preprocess
    python benchmarks/nnunet_baseline.py smoke --datasets acdc_labeled_3 --iters 6   # s/iteration, no row
    python benchmarks/nnunet_baseline.py row --datasets acdc_labeled_3 --minutes 60  # train, predict, score, save
    python benchmarks/nnunet_baseline.py --table-only                     # RESULTS.md from the rows

Install nnU-Net into the project's environment first (its torch pin kept): ``.venv/bin/python -m pip install -c
constraints.txt nnunetv2``, then ``.venv/bin/python -m pip uninstall -y torchvision`` if ``import label_efficient``
fails with ``operator torchvision::nms does not exist``: pip pulls a CUDA build of torchvision (nnU-Net itself does
not need it; diffusers and MONAI import it when present).

What is converted (``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` all under ``benchmarks/runs/nnunet/``):

* ``acdc_labeled_3`` / ``acdc_labeled_7`` → ``Dataset801_ACDCl3`` / ``Dataset802_ACDCl7``: ``imagesTr`` holds exactly the
  volumes (patient × frame) of the ``labeled_3`` / ``labeled_7`` patients of ``shared/data/acdc/split.csv`` (6 / 14
  volumes), ``imagesTs`` the 40 test volumes. Each volume's PNG slices are stacked, in order of ``z``, into one 3D
  NIfTI (8-bit grey levels as stored; spacing 1 × 1 in-plane, in pixels: the source records none, and a nominal 10
  between slices). nnU-Net's ``2d`` configuration, the one trained here, puts the axis of largest spacing first and
  trains on the slices across it, so it trains on exactly our 2D slices, at their own size (no in-plane resampling:
  every slice has spacing 1), where ours are resized to 128².
* ``la_labeled_4`` → ``Dataset803_LAl4``: the 4 ``labeled_4`` volumes of ``shared/data/la_heart`` (NIfTI as they are,
  0.625 mm isotropic) in ``imagesTr``, the 8 test volumes in ``imagesTs``; configuration ``3d_fullres``.

Training: nnU-Net's own plans, preprocessing, augmentation, network, loss, optimizer and poly schedule, on fold
``all`` (every labelled case trains; nnU-Net's per-epoch pseudo-Dice is then on training cases and selects
nothing), on the CPU (``device cpu``: fp32, nnU-Net enables autocast on CUDA only; no ``torch.compile`` on CPU), one
thread, augmentation in the training process (``nnUNet_n_proc_DA=0``). Its schedule (1000 epochs × 250 iterations)
is truncated by a trainer subclass defined here (``nnUNetTrainer_Budget``: ``num_epochs``, ``num_iterations_per_epoch``,
``num_val_iterations_per_epoch``): its 2D network at ~256² costs ~89 GFLOP per image per step against 4.6 for ours
at 128², so a row is planned by time (``--minutes``: epochs = minutes × 60 / (CPU s/iteration × iterations per
epoch), the process's CPU seconds per iteration from the ``smoke`` timing of that dataset on this host: with one
thread, the wall-clock of the run alone on a core, whatever else shares the machine) rather than by steps. ``--run N``
repeats a row (nnU-Net seeds nothing: each run is another draw of its initialisation and sampling). Prediction:
``checkpoint_final.pth`` of fold ``all``, nnU-Net's defaults (sliding window with step 0.5, Gaussian weighting,
mirroring test-time augmentation), on the CPU. Scoring: :func:`label_efficient.evaluation.case_metrics` against the
labels our runs evaluate against (``ctx.volumes("test")``: the file's own size and, for LA, spacing in mm), the means
by :func:`label_efficient.evaluation.summarize` (our empty-class rule), so the Dice and HD95 here are ours.

It imports only ``benchmarks/common.py`` at module level (nnU-Net, torch and the package inside the functions), so
``section(rows)`` runs without them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (RESULTS_DIR, ROOT, RUNS_DIR, load_rows, mean_sd, md_table, merge_rows, minus, precision_cell,
                    rebuild_report, row_seed)

RESULTS = RESULTS_DIR / "nnunet_baseline.json"
NNUNET = RUNS_DIR / "nnunet"
SHARED = Path(os.environ.get("LABEL_EFFICIENT_DATA", ROOT.parent / "shared" / "data"))
#: our rows beside nnU-Net's (supervised at the same labels, protocol seed)
OURS = {"acdc": RESULTS_DIR / "acdc_cpu.json", "la_heart": RESULTS_DIR / "la_cpu_v2.json"}
#: our steps' cost alone on this host, one thread, ``precision: auto`` (``speed.py --backbone basic_unet --batch 12
#: --optimizer sgd --threads 1``): the basis of nnU-Net's equal-time budget
OUR_SPEED = RESULTS_DIR / "speed_bcp_official_config_epyc_bf16_1thread.json"
#: the strategies of ours put beside nnU-Net
OURS_BESIDE = ("supervised", "bcp")

#: the nnU-Net datasets: our data and label budget → an nnU-Net dataset id and the configuration trained
DATASETS = {
    "acdc_labeled_3": {"id": 801, "name": "ACDCl3", "source": "acdc", "flag": "labeled_3", "configuration": "2d"},
    "acdc_labeled_7": {"id": 802, "name": "ACDCl7", "source": "acdc", "flag": "labeled_7", "configuration": "2d"},
    "la_labeled_4": {"id": 803, "name": "LAl4", "source": "la_heart", "flag": "labeled_4",
                     "configuration": "3d_fullres"},
}
LABELS = {"acdc": {"background": 0, "RV": 1, "MYO": 2, "LV": 3}, "la_heart": {"background": 0, "LA": 1}}
#: ACDC: in-plane spacing in pixels, and the nominal slice distance that makes nnU-Net's 2d slice across z
ACDC_SPACING_XYZ = (1.0, 1.0, 10.0)
ITERS_PER_EPOCH = 50  #: iterations per (truncated) epoch of a row; nnU-Net: 250
FULL_SCHEDULE = 1000 * 250  #: nnU-Net's own schedule: 1000 epochs of 250 iterations
VAL_ITERS = 2  #: nnU-Net's per-epoch pseudo-Dice batches (on training cases in fold ``all``); nnU-Net: 50
#: nnU-Net on the CPU trains in fp32 (autocast only on CUDA); the Lightning name of that precision
PRECISION = "32-true"


def folder_name(key: str) -> str:
    d = DATASETS[key]
    return f"Dataset{d['id']:03d}_{d['name']}"


def nnunet_env() -> dict:
    """nnU-Net's three folders (under the gitignored ``benchmarks/runs/nnunet/``), one thread, augmentation in the
    training process, no compile; set in ``os.environ`` too, before nnunetv2 is imported (it reads them then)."""
    env = {"nnUNet_raw": str(NNUNET / "raw"), "nnUNet_preprocessed": str(NNUNET / "preprocessed"),
           "nnUNet_results": str(NNUNET / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(env)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    return {**os.environ, **env}


# ---------------------------------------------------------------------------------------------------- conversion
def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def acdc_volumes(root: Path, flag: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """The slices of the labelled train volumes (``flag`` = 1) and of the test volumes, by volume
    ``<patient>_<frame>``, in order of ``z``. Every slice of a labelled volume carries the flag (whole patients)."""
    rows = _rows(root / "split.csv")
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(f"{r['patient']}_{r['frame']}", []).append(r)
    train, test = {}, {}
    for vid, rs in sorted(by.items()):
        rs.sort(key=lambda r: int(r["z"]))
        flags = {r[flag] for r in rs}
        if rs[0]["split"] == "train" and "1" in flags:
            if flags != {"1"}:
                raise ValueError(f"{vid}: only some slices carry {flag}")
            train[vid] = rs
        elif rs[0]["split"] == "test":
            test[vid] = rs
    return train, test


def _write_acdc_volume(root: Path, rows: list[dict], image_out: Path, label_out: Path | None) -> None:
    import numpy as np
    import SimpleITK as sitk
    from PIL import Image

    def stack(kind: str):
        arr = np.stack([np.asarray(Image.open(root / kind / f"{r['stem']}.png")) for r in rows])
        img = sitk.GetImageFromArray(arr.astype(np.uint8))  # numpy (z, y, x) → image of size (x, y, z)
        img.SetSpacing(ACDC_SPACING_XYZ)
        return img

    sitk.WriteImage(stack("images"), str(image_out), useCompression=True)
    if label_out is not None:
        sitk.WriteImage(stack("masks"), str(label_out), useCompression=True)


def convert(key: str) -> Path:
    """Write ``key``'s nnU-Net raw dataset (``imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs`` for reference,
    ``dataset.json``); returns its folder. Idempotent: an existing folder is rewritten."""
    nnunet_env()
    d = DATASETS[key]
    src = SHARED / d["source"]
    out = NNUNET / "raw" / folder_name(key)
    if out.exists():
        shutil.rmtree(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True)
    if d["source"] == "acdc":
        train, test = acdc_volumes(src, d["flag"])
        for split, vols in (("Tr", train), ("Ts", test)):
            for vid, rows in vols.items():
                _write_acdc_volume(src, rows, out / f"images{split}" / f"{vid}_0000.nii.gz",
                                   out / f"labels{split}" / f"{vid}.nii.gz")
        train_ids, test_ids = list(train), list(test)
    else:  # LA: the shared NIfTI files as they are
        rows = _rows(src / "split.csv")
        train_ids = [r["case"] for r in rows if r["split"] == "train" and r[d["flag"]] == "1"]
        test_ids = [r["case"] for r in rows if r["split"] == "test"]
        for split, ids in (("Tr", train_ids), ("Ts", test_ids)):
            for cid in ids:
                shutil.copyfile(src / "imagesTr" / f"{cid}.nii.gz", out / f"images{split}" / f"{cid}_0000.nii.gz")
                shutil.copyfile(src / "labelsTr" / f"{cid}.nii.gz", out / f"labels{split}" / f"{cid}.nii.gz")
    meta = {"channel_names": {"0": "MRI"}, "labels": LABELS[d["source"]], "numTraining": len(train_ids),
            "file_ending": ".nii.gz", "name": folder_name(key),
            "description": f"label-efficient's {d['source']} {d['flag']} cases (imagesTr) and test split (imagesTs), "
                           f"from {src}",
            "label_efficient": {"source": d["source"], "flag": d["flag"], "train": train_ids, "test": test_ids}}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{folder_name(key)}: {len(train_ids)} training cases ({d['flag']}), {len(test_ids)} test cases -> {out}")
    return out


# ---------------------------------------------------------------------------------------------------- planning
def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def plan(key: str) -> dict:
    """``nnUNetv2_plan_and_preprocess`` for ``key``'s configuration only (one process); returns its plans."""
    env = nnunet_env()
    d = DATASETS[key]
    if not (NNUNET / "raw" / folder_name(key) / "dataset.json").exists():
        convert(key)
    cmd = [_tool("nnUNetv2_plan_and_preprocess"), "-d", str(d["id"]), "-c", d["configuration"], "-np", "1",
           "-npfp", "1", "--verify_dataset_integrity"]
    print(" ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, env={**env, "nnUNet_n_proc_DA": "1"}, check=True)  # its planner sets threads to this (> 0)
    print(f"planned and preprocessed {folder_name(key)} in {time.time() - t:.0f} s")
    plans = json.loads((NNUNET / "preprocessed" / folder_name(key) / "nnUNetPlans.json").read_text())
    c = plans["configurations"][d["configuration"]]
    print(f"{d['configuration']}: patch {c['patch_size']}, batch {c['batch_size']}, spacing {c['spacing']}")
    return plans


# ---------------------------------------------------------------------------------------------------- training
def budget_trainer_class():
    """``nnUNetTrainer_Budget``: nnU-Net's trainer with a truncated schedule (set ``num_epochs``,
    ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch`` on the instance before ``run_training``), timing
    each training iteration (its data loading and augmentation, and the step alone)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_Budget(nnUNetTrainer):
        # the signature spelled out: nnU-Net saves its __init__ arguments by name
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 1, 1
            self.iteration_seconds: list[float] = []  # data + step, per training iteration
            self.step_seconds: list[float] = []  # the step alone
            self.iteration_cpu_seconds: list[float] = []  # CPU time of the process per iteration (one thread)
            self._t_last = self._c_last = None

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            self._t_last, self._c_last = time.perf_counter(), time.process_time()

        def train_step(self, batch: dict) -> dict:
            t = time.perf_counter()
            out = super().train_step(batch)
            now, cpu = time.perf_counter(), time.process_time()
            self.step_seconds.append(now - t)
            self.iteration_seconds.append(now - self._t_last)
            self.iteration_cpu_seconds.append(cpu - self._c_last)
            self._t_last, self._c_last = now, cpu
            return out

    return nnUNetTrainer_Budget


def train(key: str, epochs: int, iters: int, val_iters: int = VAL_ITERS) -> dict:
    """Train ``key``'s configuration on fold ``all`` on the CPU for ``epochs`` × ``iters``; returns timings."""
    nnunet_env()
    import torch

    torch.set_num_threads(1)
    d = DATASETS[key]
    pre = NNUNET / "preprocessed" / folder_name(key)
    if not (pre / "nnUNetPlans.json").exists():
        plan(key)
    plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}  # as nnUNetv2_train
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = budget_trainer_class()(plans, d["configuration"], "all", dataset_json, device=torch.device("cpu"))
    if Path(trainer.output_folder).exists():  # a fresh run: nothing of an earlier smoke or row carries over
        shutil.rmtree(trainer.output_folder)
        Path(trainer.output_folder).mkdir(parents=True)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, iters, val_iters
    t, cpu = time.time(), time.process_time()
    trainer.run_training()
    seconds, cpu_seconds = time.time() - t, time.process_time() - cpu
    c = plans["configurations"][d["configuration"]]
    later = lambda xs: statistics.median(xs[1:] or xs)  # noqa: E731  (the first iteration pays for warm-up)
    return {"epochs": epochs, "iters_per_epoch": iters, "val_iters": val_iters, "steps": epochs * iters,
            "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "s_per_iter": round(later(trainer.iteration_seconds), 3),
            "s_per_step_only": round(later(trainer.step_seconds), 3),
            "cpu_s_per_iter": round(later(trainer.iteration_cpu_seconds), 3),
            "first_iter_s": round(trainer.iteration_seconds[0], 3), "patch_size": c["patch_size"],
            "batch_size": c["batch_size"], "model_folder": str(trainer.output_folder_base)}


# ---------------------------------------------------------------------------------------------------- predict, score
def predict(key: str, model_folder: str, mirroring: bool = True, limit: int | None = None) -> tuple[Path, float]:
    """Predict ``key``'s imagesTs (the first ``limit`` cases) with fold ``all``'s final checkpoint on the CPU."""
    nnunet_env()
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(1)
    raw = NNUNET / "raw" / folder_name(key)
    inputs = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[:limit]
    out = NNUNET / "predictions" / folder_name(key)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    import nnunetv2.inference.predict_from_raw_data as pred_mod

    find = pred_mod.recursive_find_trainer_class_by_name  # nnU-Net looks trainers up in its own package only
    budget = budget_trainer_class()
    pred_mod.recursive_find_trainer_class_by_name = lambda name: budget if name == budget.__name__ else find(name)
    try:
        predictor.initialize_from_trained_model_folder(model_folder, use_folds=("all",),
                                                       checkpoint_name="checkpoint_final.pth")
    finally:
        pred_mod.recursive_find_trainer_class_by_name = find
    t = time.time()
    predictor.predict_from_files([[str(p)] for p in inputs],
                                 [str(out / p.name.replace("_0000.nii.gz", "")) for p in inputs],
                                 save_probabilities=False, overwrite=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    return out, time.time() - t


def our_test_volumes(source: str):
    """The test volumes our runs evaluate against (labels at the file's own size; LA spacing in mm), with the
    evaluation settings of a default recipe (class names, empty-class rule)."""
    from label_efficient.context import DataContext
    from label_efficient.recipe import parse_recipe

    data = ({"dataset": "acdc", "image_size": [128, 128]} if source == "acdc"
            else {"dataset": "la_heart", "patch_size": [112, 112, 80], "val_split": None})
    r = parse_recipe({"data": data, "stages": [{"strategy": "supervised", "steps": 1}]})
    ctx = DataContext.build(r.stage_data(0), r.seed)
    return ctx.volumes("test", None), ctx.spec, r.evaluation


def score(key: str, predictions: Path, metrics: tuple[str, ...] = ("dice", "hd95")) -> dict:
    """Our metrics of nnU-Net's predictions (every predicted test case), per case and their means."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    from label_efficient.evaluation import case_metrics, summarize

    source = DATASETS[key]["source"]
    volumes, spec, ev = our_test_volumes(source)
    per_case = {}
    for vol in volumes:
        path = predictions / f"{vol.id}.nii.gz"
        if not path.exists():
            continue
        if source == "acdc":  # written with SimpleITK from (z, y, x) stacks: read back the same way
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        else:  # the shared NIfTI's own grid, as our reader (nibabel) gives it: (x, y, z)
            pred = np.asarray(nib.load(str(path)).dataobj)
        if pred.shape != vol.label.shape:
            raise ValueError(f"{vol.id}: prediction {pred.shape} against label {vol.label.shape}")
        per_case[vol.id] = case_metrics(pred.astype(np.int64), vol.label, spec.num_classes, metrics,
                                        spacing=vol.spacing, empty=ev.empty)
    if not per_case:
        raise FileNotFoundError(f"no predictions in {predictions}")
    s = summarize(per_case, spec.class_names)
    return {"num_cases": len(per_case), "of_cases": len(volumes), **s}


# ---------------------------------------------------------------------------------------------------- rows
def smoke(key: str, iters: int) -> dict:
    """One epoch of ``iters`` iterations (one pseudo-Dice batch): the s/iteration of nnU-Net's trainer on this host;
    saved as a ``timing`` row (no test score)."""
    from label_efficient import provenance

    plans = NNUNET / "preprocessed" / folder_name(key) / "nnUNetPlans.json"
    if not plans.exists():
        plan(key)
    t = time.time()
    timing = train(key, 1, iters, 1)
    row = {"kind": "timing", "dataset": key, "configuration": DATASETS[key]["configuration"], **timing,
           "precision": PRECISION, "threads": 1, "nnunetv2": provenance.package_version("nnunetv2"),
           "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
           "provenance": provenance.collect(PRECISION, requested="fp32 (nnU-Net on CPU)", t_start=t)}
    row.pop("model_folder")
    return row


def full_row(key: str, minutes: float | None, epochs: int | None, mirroring: bool, limit: int | None,
             iters: int = ITERS_PER_EPOCH, run: int = 1) -> dict:
    """Train (``epochs`` × ``iters``, or as many epochs as ``minutes`` of one core allow at the dataset's
    measured CPU s/iteration), predict the test cases (the first ``limit``) and score them with our evaluator."""
    from label_efficient import provenance

    if epochs is None:
        timing = next((r for r in load_rows(RESULTS) if r.get("kind") == "timing" and r["dataset"] == key), None)
        if timing is None or minutes is None:
            raise SystemExit(f"{key}: give --epochs, or --minutes after a `smoke` timing of this dataset")
        epochs = max(1, round(minutes * 60 / (timing.get("cpu_s_per_iter", timing["s_per_iter"]) * iters)))
    t = time.time()
    trained = train(key, epochs, iters)
    pred_dir, pred_s = predict(key, trained.pop("model_folder"), mirroring, limit)
    s = score(key, pred_dir)
    d = DATASETS[key]
    return {"kind": "row", "dataset": key, "source": d["source"], "labeled": d["flag"], "seed": None, "run": run,
            "method": f"nnU-Net v2 {d['configuration']}", "configuration": d["configuration"],
            "trainer": "nnUNetTrainer_Budget", "fold": "all", "checkpoint": "checkpoint_final", "mirroring": mirroring,
            **trained, "planned_minutes": minutes, "predict_seconds": round(pred_s, 1),
            "mean_dice": round(s["mean_dice"], 4), "hd95": round(s["mean_hd95"], 2),
            "per_class_dice": {k: round(v, 4) for k, v in s["per_class"]["dice"].items()},
            "num_cases": s["num_cases"], "of_cases": s["of_cases"], "precision": PRECISION, "threads": 1,
            "nnunetv2": provenance.package_version("nnunetv2"),
            "provenance": provenance.collect(PRECISION, requested="fp32 (nnU-Net on CPU)", t_start=t)}


def save(row: dict | None) -> list[dict]:
    """Merge ``row`` into the rows: a row per dataset and schedule, the latest timing per dataset."""
    return merge_rows(RESULTS, [row], key=lambda r: (r["kind"], r["dataset"]) + (
        (r["steps"], r.get("mirroring"), r.get("run", 1)) if r["kind"] == "row" else ()),
        sort=lambda r: (r["kind"] != "row", r["dataset"], r.get("steps", 0), r.get("run", 1)))


# ---------------------------------------------------------------------------------------------------- RESULTS.md
def load_results() -> dict:
    return {"rows": load_rows(RESULTS), "ours": {k: load_rows(p) for k, p in OURS.items()},
            "speed": load_rows(OUR_SPEED)}


def our_core_seconds(strategy: str, steps: int, speed: list[dict]) -> float | None:
    """Seconds of one core for ``steps`` training steps of ours, from the speed rows (Lightning s/step measured
    alone); BCP: its first third as copy-paste pre-training (timed as ``bcp_pretrain``, else as ``supervised``,
    which makes the same passes on as many images), the rest as self-training. Validation not included."""
    s = {r["strategy"]: 1 / r["lightning_its"] for r in speed}
    if strategy == "bcp" and "bcp" in s:
        pre = steps // 3
        pre_s = s.get("bcp_pretrain", s.get("supervised"))
        return None if pre_s is None else pre * pre_s + (steps - pre) * s["bcp"]
    return steps * s[strategy] if strategy in s else None


def _group_cells(rs: list[dict], dice: str, hd95: str) -> list[str]:
    d, h = [r[dice] for r in rs], [r[hd95] for r in rs]
    return [mean_sd(d) or f"{d[0]:.4f}", ", ".join(f"{x:.4f}" for x in d), mean_sd(h, ".2f") or f"{h[0]:.2f}"]


def beside_rows(rows: dict) -> tuple[list[list], list[str]]:
    """The "against nnU-Net" table (nnU-Net's runs, our supervised and BCP seeds at the same labels) and one
    sentence per budget saying which is ahead."""
    table, verdicts = [], []
    runs = [r for r in rows["rows"] if r["kind"] == "row" and r.get("planned_minutes")]
    for key in DATASETS:
        nn = [r for r in runs if r["dataset"] == key]
        if not nn:
            continue
        src, flag = DATASETS[key]["source"], DATASETS[key]["flag"]
        core = statistics.mean(r.get("train_cpu_seconds", r["train_seconds"]) for r in nn)
        table.append([src, flag, f"nnU-Net v2 {nn[0]['configuration']}", f"{len(nn)} run" + "s" * (len(nn) > 1), *_group_cells(
            nn, "mean_dice", "hd95"), f"{nn[0]['steps']} its × batch {nn[0]['batch_size']}",
            f"{core:.0f} (measured: process CPU time, one thread)", "32-true"])
        means = {"nnU-Net": statistics.mean(r["mean_dice"] for r in nn)}
        for strategy in OURS_BESIDE:
            ours = [r for r in rows["ours"].get(src, []) if r.get("strategy") == strategy and r.get("labeled") == flag
                    and r.get("schedule", "protocol") == "protocol"]
            if not ours:
                continue
            t = our_core_seconds(strategy, ours[0]["steps"], rows["speed"]) if src == "acdc" else None
            when = (f"{t:.0f} (steps × s/step alone, this host)" if t is not None else
                    f"≤ {min(r['train_seconds'] for r in ours):.0f} (recorded, cores shared)")
            table.append([src, flag, f"ours: {strategy}", "seeds " + ", ".join(str(row_seed(r)) for r in ours),
                          *_group_cells(ours, "mean_dice", "hd95"), f"{ours[0]['steps']} steps × batch "
                          + ("12 + 12 unlabelled" if strategy == "bcp" else "12"),
                          when, ", ".join(dict.fromkeys(precision_cell(r) for r in ours))])
            means[strategy] = statistics.mean(r["mean_dice"] for r in ours)
        if "bcp" in means:
            bcp, sup = means["bcp"] - means["nnU-Net"], means.get("supervised", float("nan")) - means["nnU-Net"]
            verdicts.append(
                f"{src} {flag}: in {core:.0f} s of one core nnU-Net ran {nn[0]['steps']} of its {FULL_SCHEDULE:,} "
                f"iterations; BCP {'beats' if bcp > 0 else 'falls short of'} it by {abs(bcp):.3f} mean Dice, and "
                f"nnU-Net {'loses to' if sup > 0 else 'beats'} our supervised by {abs(sup):.3f}.")
    return table, verdicts


def _ours_supervised(ours: list[dict], labeled: str) -> str:
    r = next((r for r in ours if r.get("strategy") == "supervised" and r.get("labeled") == labeled
              and row_seed(r) == 1337 and r.get("schedule", "protocol") == "protocol"), None)
    return "" if r is None else f"{r['mean_dice']:.4f} ({r['steps']} steps, {r['train_seconds']:.0f} s)"


def section(rows: dict) -> str:
    all_rows = rows["rows"]
    if not all_rows:
        return ""
    md = ["## nnU-Net v2 beside us (same labelled cases, our evaluator)", ""]
    table, verdicts = beside_rows(rows)
    if table:
        md += ["### Against nnU-Net at equal time", "",
               "`python benchmarks/nnunet_baseline.py row --datasets KEY --minutes M --run N`: nnU-Net gets at least "
               "the time our BCP takes for its protocol (3000 steps, 1000 of them copy-paste pre-training) on one core "
               "of this host (`results/" + OUR_SPEED.name + "`), planned from its own measured CPU seconds per "
               "iteration; each nnU-Net run is one draw of its (unseeded) initialisation and sampling. Ours are the "
               "protocol rows of the tables above (same labelled patients, same 40 test volumes, same evaluator). "
               "nnU-Net trains in fp32 on the CPU (its autocast is CUDA-only); ours at `precision: auto`. This is nnU-Net "
               "cut to a CPU budget (its 2D network at 256² costs ~20× our step per image), not nnU-Net at its own "
               "schedule on a GPU: these rows say what a CPU user gets in the same time, not which method is better "
               "given time.", "",
               md_table(["data", "labelled", "method", "runs", "mean Dice (mean ± s.d.)", "per run", "HD95",
                         "schedule", "time on one core, s", "precision"], table), "", *verdicts, ""]
    md += [
          "`python benchmarks/nnunet_baseline.py row --datasets KEY --minutes M` (rows in `results/nnunet_baseline.json`; "
          "the script's docstring gives the conversion and protocol): nnU-Net's own plans, preprocessing, "
          "augmentation and network trained on exactly our labelled cases (fold `all`) on the CPU in fp32 with one "
          "thread, its 1000 × 250-iteration schedule truncated to a wall-clock budget (nnUNetTrainer_Budget), the "
          "final checkpoint predicting our test cases with nnU-Net's defaults (mirroring TTA, except rows marked "
          "*no mirroring*), scored by our evaluator against our labels (ACDC per volume at each slice's own size, "
          "HD95 in pixels; LA HD95 in mm).", ""]
    full = [r for r in all_rows if r["kind"] == "row"]
    if full:
        md += [md_table(["data", "labelled", "configuration", "run", "mean Dice", "HD95", "epochs × iters", "batch",
                         "patch",
                         "train s", "predict s", "cases", "precision", "ours: supervised, same labels"],
                        [[r["source"], r["labeled"],
                          r["configuration"] + ("" if r.get("mirroring", True) else ", no mirroring"),
                          r.get("run", 1), f"{r['mean_dice']:.4f}",
                          f"{r['hd95']:.2f}",
                          f"{r['epochs']} × {r['iters_per_epoch']}", r["batch_size"],
                          "×".join(map(str, r["patch_size"])), f"{r['train_seconds']:.0f}",
                          f"{r['predict_seconds']:.0f}", f"{r['num_cases']}/{r['of_cases']}", r["precision"],
                          _ours_supervised(rows["ours"].get(r["source"], []), r["labeled"])] for r in full]), ""]
    timing = [r for r in all_rows if r["kind"] == "timing"]
    if timing:
        md += ["Speed of nnU-Net's trainer on this CPU (`python benchmarks/nnunet_baseline.py smoke --datasets KEY "
               "--iters N`: one epoch of N iterations, median after the first; data loading and augmentation in the "
               "same process). Other processes shared the cores (load average at the end of the timing), so the wall "
               "s/iteration is inflated; the process's CPU seconds per iteration are close to what it takes alone "
               "on one core:", "",
               md_table(["data", "configuration", "batch", "patch", "wall s/iteration", "CPU s/iteration",
                         "step alone s", "first iteration s", "precision", "threads", "load", "CPU"],
                        [[r["dataset"], r["configuration"], r["batch_size"], "×".join(map(str, r["patch_size"])),
                          f"{r['s_per_iter']:.2f}", f"{r['cpu_s_per_iter']:.2f}" if "cpu_s_per_iter" in r else "",
                          f"{r['s_per_step_only']:.2f}", f"{r['first_iter_s']:.2f}", r["precision"], r["threads"],
                          f"{r['load_average']:.1f} / {r['cpus']} cores" if "load_average" in r else "",
                          (r.get("provenance") or {}).get("cpu", {}).get("model", "")] for r in timing]), ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", choices=["convert", "plan", "smoke", "row"])
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--iters", type=int, help=f"smoke: training iterations to time (default 6); row: iterations per "
                                              f"epoch (default {ITERS_PER_EPOCH})")
    ap.add_argument("--minutes", type=float, help="row: training budget in minutes of one core (needs a smoke timing)")
    ap.add_argument("--run", type=int, default=1, help="row: the repeat's number (a second run of a row: --run 2)")
    ap.add_argument("--epochs", type=int, help=f"row: epochs of {ITERS_PER_EPOCH} iterations (instead of --minutes)")
    ap.add_argument("--no-mirroring", action="store_true", help="row: predict without mirroring TTA")
    ap.add_argument("--max-test", type=int, help="row: score only the first N test cases (a check of the pipeline: "
                                                 "written to runs/nnunet/check_<dataset>.json, not to the rows)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--no-report", action="store_true", help="save the rows but leave RESULTS.md as it is")
    args = ap.parse_args()
    if args.table_only or args.command is None:
        rebuild_report()
        return
    for key in args.datasets:
        if args.command == "convert":
            convert(key)
        elif args.command == "plan":
            plan(key)
        else:
            row = smoke(key, args.iters or 6) if args.command == "smoke" else full_row(
                key, args.minutes, args.epochs, not args.no_mirroring, args.max_test, args.iters or ITERS_PER_EPOCH,
                args.run)
            print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)
            if args.max_test:
                (NNUNET / f"check_{key}.json").write_text(json.dumps(row, indent=2) + "\n")
            else:
                save(row)
    if args.command in ("smoke", "row") and not args.no_report:
        rebuild_report()


if __name__ == "__main__":
    main()
