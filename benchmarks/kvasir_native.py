"""Kvasir at its native resolution (2D patches + sliding window) against the same training on resized images.

Usage: ``python benchmarks/kvasir_native.py [--rows NAME ...] [--seed S]``; rows are resumable, one thread each.

Rows (same labelled images, steps, optimizer, network and seed; test Dice and HD95 at each image's own size):
- ``resized``: every image resized to 128² (the shipped polyp recipes' size), predicted at 128², resized back;
- ``native``: 128² patches cut from the images at their own size (half of them centred on polyp pixels), sliding
  window (overlap 0.5) over the whole image; ``native256``: the same with 256² patches (4× the pixels per step: a
  polyp covers ~15 % of a ~620×530 frame, so a 128² patch often sees only part of it);
and the same two for BCP (its pre-training then self-training stage). Each row records its train seconds and
wall seconds so the same steps can be read against the same wall-clock.
"""
from __future__ import annotations

import argparse
import time

from common import RESULTS_DIR, RUNS_DIR, md_table, merge_rows, load_rows, resolved_precision, run_recipe_process

RESULTS = RESULTS_DIR / "kvasir_native.json"
LABELLED, STEPS, BATCH = 50, 600, 8
TRAINER = {"precision": "auto", "progress_bar": False, "log_every": 50}
OPT = {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"}
ROWS = ("supervised:resized", "supervised:native", "bcp:resized", "bcp:native", "supervised:native256")
#: the training image (resized) or patch (native) size of each mode
PATCH = {"resized": [128, 128], "native": [128, 128], "native256": [256, 256]}


def recipe(strategy: str, mode: str, seed: int) -> dict:
    data = {"dataset": "polyp_kvasir_cvc", "domain": "kvasir", "budget": {"count": LABELLED, "seed": seed},
            "max_unlabeled": 200, "max_val_cases": 20, "max_test_cases": 100}
    patch = PATCH[mode]
    data.update({"image_size": patch} if mode == "resized" else {"patch_size": patch, "foreground_ratio": 0.5})
    stage = {"steps": STEPS, "val_every": 200, "optimizer": OPT}
    if strategy == "supervised":
        stages = [{**stage, "strategy": "supervised", "batch_size": {"labeled": BATCH}}]
    else:  # BCP: a third of the steps pre-training on copy-paste of labelled images, then self-training
        half = {"labeled": BATCH // 2, "unlabeled": BATCH // 2}
        stages = [{**stage, "name": "pretrain", "strategy": "bcp_pretrain", "steps": STEPS // 3, "batch_size": half},
                  {**stage, "name": "selftrain", "strategy": "bcp", "steps": 2 * STEPS // 3, "batch_size": half,
                   "config": {"largest_component": True}}]
    return {"name": f"kvasir_{strategy}_{mode}", "seed": seed, "data": data, "trainer": TRAINER,
            "backbone": {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128, 256], "num_res_units": 0}},
            "evaluation": {"metrics": ["dice", "hd95"], "overlays": 2}, "stages": stages}


def run(row: str, seed: int) -> dict:
    strategy, mode = row.split(":")
    r = recipe(strategy, mode, seed)
    t0 = time.time()
    m = run_recipe_process(r, RUNS_DIR / "kvasir_native" / f"{strategy}_{mode}_s{seed}")
    return {"strategy": strategy, "mode": mode, "seed": seed, "labeled": LABELLED, "steps": STEPS,
            "mean_dice": round(m["mean_dice"], 4), "hd95_px": round(m["mean_hd95"], 2),
            "train_seconds": round(m["train_seconds"], 1), "wall_seconds": round(time.time() - t0, 1),
            "peak_rss_mb": round(m["peak_rss_mb"], 1), "precision": resolved_precision(TRAINER), "threads": 1,
            "test_images": len(m["cases"])}


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = ["strategy", "images", "seed", "test Dice", "HD95 (px, native)", "train s", "wall s", "peak RSS MB",
            "precision"]
    what = lambda r: (f"native, {PATCH[r['mode']][0]}² patches" if r["mode"] != "resized"
                      else f"resized to {PATCH['resized'][0]}²")
    body = [[r["strategy"], what(r), r["seed"],
             f"{r['mean_dice']:.4f}", f"{r['hd95_px']:.1f}", f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}",
             f"{r['peak_rss_mb']:.0f}", r["precision"]] for r in sorted(rows, key=lambda r: (r["strategy"], r["seed"],
                                                                                               r["mode"]))]
    n = rows[0]
    return ("## Kvasir at native resolution (2D patches) against resized images\n\n"
            f"`python benchmarks/kvasir_native.py`: {n['labeled']} labelled Kvasir images, {n['steps']} steps, the same "
            "network, optimizer and seed; test images scored at their own size "
            f"({n['test_images']} test images). Rows ran one thread each, sometimes two at a time, so train and wall "
            "seconds compare rows of one table only roughly.\n\n" + md_table(head, body) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    for row in args.rows:
        merge_rows(RESULTS, [run(row, args.seed)], key=lambda r: (r["strategy"], r["mode"], r["seed"]))
        print(row, "done", flush=True)


if __name__ == "__main__":
    main()
