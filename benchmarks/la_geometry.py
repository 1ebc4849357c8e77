"""Geometry invariance on LA: the same recipe on the shared LA volumes and on a copy in which half of the volumes are
resampled to 1.0 × 1.0 × 2.5 mm and stored in another orientation (x flipped, y and z swapped), every affine
correct — the same anatomy in millimetres, on other voxel grids.

Usage: ``python benchmarks/la_geometry.py [--rows original:1337 modified:1337 ...]`` (resumable, one thread each).

The recipe resamples every volume to 0.625 mm isotropic (``data.spacing``) in RAS (``data.orientation``) once per
case, trains 400 supervised steps on 4 labelled volumes (``labeled_4``) and scores each test volume on its own
native grid (predictions mapped back), HD95 in mm. The modified copy lives under ``benchmarks/runs/`` (not in the
repository; rebuilt when missing).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np

from common import RESULTS_DIR, RUNS_DIR, md_table, merge_rows, load_rows, mean_sd, resolved_precision, run_recipe_process

RESULTS = RESULTS_DIR / "la_geometry.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "la_heart"
COPY = RUNS_DIR / "la_geometry_data"
NEW_SPACING = (1.0, 1.0, 2.5)
TRAINER = {"precision": "auto", "progress_bar": False, "log_every": 50}
STEPS = 400
ROWS = ("original:1337", "modified:1337", "original:1338", "modified:1338")


def _modify(image_path: Path, label_path: Path, out_image: Path, out_label: Path) -> dict:
    """Resample (image trilinear, label nearest) to NEW_SPACING, then flip x and swap y/z; affines kept correct."""
    import nibabel as nib
    from scipy.ndimage import zoom

    img, lab = nib.load(str(image_path)), nib.load(str(label_path))
    spacing = np.asarray(img.header.get_zooms()[:3], dtype=float)
    factors = spacing / np.asarray(NEW_SPACING)
    data = zoom(np.asarray(img.dataobj, dtype=np.float32), factors, order=1)
    mask = zoom(np.asarray(lab.dataobj, dtype=np.uint8), factors, order=0)
    true_spacing = spacing * np.asarray(img.shape[:3]) / np.asarray(data.shape)  # the same field of view
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] @ np.diag(true_spacing / spacing)
    # flip x: voxel i -> n-1-i, so the origin moves to the old last voxel
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    data, mask, affine = data[::-1], mask[::-1], affine @ flip
    # swap y and z (voxel axes permuted, world unchanged)
    perm = np.eye(4)[[0, 2, 1, 3]]
    data, mask, affine = data.transpose(0, 2, 1), mask.transpose(0, 2, 1), affine @ perm
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(out_image))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask), affine), str(out_label))
    return {"axcodes": "".join(nib.aff2axcodes(affine)), "shape": list(data.shape)}


def build_copy() -> Path:
    """The modified LA copy: every other case (by split order) modified, the rest linked unchanged."""
    done = COPY / "split.csv"
    if done.is_file():
        return COPY
    tmp = COPY.with_name(COPY.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    rows = list(csv.DictReader(open(SHARED / "split.csv")))
    for k, r in enumerate(rows):
        name = f"{r['case']}.nii.gz"
        src_i, src_l = SHARED / "imagesTr" / name, SHARED / "labelsTr" / name
        if k % 2:
            _modify(src_i, src_l, tmp / "imagesTr" / name, tmp / "labelsTr" / name)
        else:
            (tmp / "imagesTr" / name).symlink_to(src_i)
            (tmp / "labelsTr" / name).symlink_to(src_l)
    shutil.copy(SHARED / "split.csv", tmp / "split.csv")
    tmp.rename(COPY)
    return COPY


def recipe(data: str, seed: int) -> dict:
    root = str(SHARED if data == "original" else build_copy())
    return {"name": f"la_geometry_{data}", "seed": seed,
            "data": {"dataset": "la_heart", "root": root, "patch_size": [96, 96, 64], "budget": {"flag": "labeled_4"},
                     "val_split": None, "spacing": [0.625, 0.625, 0.625], "orientation": "RAS"},
            "backbone": {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128], "num_res_units": 0}},
            "trainer": TRAINER, "evaluation": {"metrics": ["dice", "hd95"], "overlays": 0},
            "stages": [{"strategy": "supervised", "steps": STEPS, "val_every": 100, "batch_size": {"labeled": 2},
                        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"}}]}


def run(row: str) -> dict:
    data, seed = row.split(":")
    t0 = time.time()
    m = run_recipe_process(recipe(data, int(seed)), RUNS_DIR / "la_geometry" / f"{data}_s{seed}")
    return {"data": data, "seed": int(seed), "steps": STEPS, "mean_dice": round(m["mean_dice"], 4),
            "hd95_mm": round(m["mean_hd95"], 2),
            "per_case_dice": {k: round(next(iter(v["dice"].values())), 4) for k, v in m["cases"].items()},
            "train_seconds": round(m["train_seconds"], 1), "wall_seconds": round(time.time() - t0, 1),
            "precision": resolved_precision(TRAINER), "threads": 1}


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    body = [[r["data"], r["seed"], f"{r['mean_dice']:.4f}", f"{r['hd95_mm']:.2f}", r["precision"]]
            for r in sorted(rows, key=lambda r: (r["seed"], r["data"]))]
    by = {d: [r for r in rows if r["data"] == d] for d in ("original", "modified")}
    summary = ""
    if all(by.values()):
        summary = "".join(f"\n- {d}: Dice {mean_sd([r['mean_dice'] for r in rs])}, HD95 "
                          f"{mean_sd([r['hd95_mm'] for r in rs], '.2f')} mm over {len(rs)} seed(s)"
                          for d, rs in by.items())
    return ("## Geometry invariance (LA, other voxel grids and orientations)\n\n"
            f"`python benchmarks/la_geometry.py`: the same supervised recipe ({rows[0]['steps']} steps, `labeled_4`, "
            "`data.spacing` 0.625 mm isotropic, `orientation: RAS`) on the shared LA volumes and on a copy whose "
            f"odd-numbered volumes are resampled to {' × '.join(f'{s:g}' for s in NEW_SPACING)} mm and stored with x "
            "flipped and y/z swapped (correct affines). Each test volume is scored on its own grid, HD95 in mm.\n\n"
            + md_table(["volumes", "seed", "test Dice", "HD95 (mm)", "precision"], body) + "\n" + summary + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    args = ap.parse_args()
    for row in args.rows:
        merge_rows(RESULTS, [run(row)], key=lambda r: (r["data"], r["seed"]))
        print(row, "done", flush=True)


if __name__ == "__main__":
    main()
