"""LA 3D rows on a short CPU protocol (supervised vs BCP at ``labeled_4``): results/la_cpu[_v2].json + RESULTS.md.

    python benchmarks/la_cpu.py --protocol v2 [--rows supervised:labeled_4 bcp:labeled_4] [--jobs 1]
    python benchmarks/la_cpu.py --protocol v1 --rows bcp_from_supervised:labeled_4   # the superseded protocol

v1 (80×80×48 crops, AdamW 3e-3 poly, 600 steps) left BCP below supervised; v2 takes the BCP LA code's settings that
fit this CPU: its 112×112×80 crop and SGD 0.01 (momentum 0.9) at a constant rate, 1200 steps (BCP: 1/3 copy-paste
pre-training, 2/3 self-training). Its VNet at that crop costs ~15 s per step on one core, so the network stays the
small 3D U-Net.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from acdc_cpu import load_rows, run_row, save_rows, write_markdown  # noqa: E402

RESULTS = {"v1": HERE / "results" / "la_cpu.json", "v2": HERE / "results" / "la_cpu_v2.json"}
PROTOCOL_V1 = {
    "seed": 1337,
    "patch_size": [80, 80, 48],
    "backbone": {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128], "num_res_units": 0}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 25},
    "steps": 600,
    "batch_size": {"labeled": 2, "unlabeled": 2},
    "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"},
    "pretrain_share": 4,  #: ``bcp`` pre-trains for steps // pretrain_share, then self-trains for the rest
}
PROTOCOL_V2 = {**PROTOCOL_V1, "patch_size": [112, 112, 80], "steps": 1200, "pretrain_share": 3,
               "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "schedule": "constant"}}
PROTOCOLS = {"v1": PROTOCOL_V1, "v2": PROTOCOL_V2}
PROTOCOL = PROTOCOL_V2


def recipe(strategy: str, labeled: str, p: dict = PROTOCOL) -> dict:
    common = {"val_every": 100, "batch_size": p["batch_size"], "optimizer": p["optimizer"]}
    if strategy in ("bcp", "bcp_full_pretrain"):  # LA settings of the BCP code: EMA of parameters only, linear Dice
        # bcp: 1/4 of the protocol's steps pre-train, 3/4 self-train (same total as supervised: 600). bcp_full_pretrain:
        # the teacher first trains for the supervised baseline's whole schedule (600), then 600 self-training steps
        # (compare with supervised:labeled_4:1337:1200, the same 1200 steps)
        pre = p["steps"] // p["pretrain_share"] if strategy == "bcp" else p["steps"]
        self_steps = p["steps"] - pre if strategy == "bcp" else p["steps"]
        stages = [{"strategy": "bcp_pretrain", "steps": pre, **common, "config": {"squared_dice": False}},
                  {"strategy": "bcp", "steps": self_steps, "init": "previous_last", **common,
                   "config": {"ema_buffers": False, "squared_dice": False}}]
    elif strategy in ("bcp_from_supervised", "bcp_from_supervised_no_lcc"):
        # the teacher is the supervised baseline's model (600 plain steps); no_lcc: pseudo labels are not cut to their
        # largest component (a small crop often shows the atrium in several pieces)
        cfg = {"ema_buffers": False, "squared_dice": False, "largest_component": not strategy.endswith("no_lcc")}
        stages = [{"strategy": "supervised", "steps": p["steps"], **common},
                  {"strategy": "bcp", "steps": p["steps"], "init": "previous_last", **common, "config": cfg}]
    else:
        stages = [{"strategy": strategy, "steps": p["steps"], **common}]
    return {"name": f"la_cpu_{strategy}_{labeled}", "seed": p["seed"], "backbone": p["backbone"], "trainer": p["trainer"],
            "data": {"dataset": "la_heart", "patch_size": p["patch_size"], "budget": {"flag": labeled}, "val_split": None},
            "evaluation": {"metrics": ["dice", "hd95"], "overlays": 2}, "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", nargs="*", default=["supervised:labeled_4", "bcp:labeled_4"])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v2")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", default=None, help="default runs/la (v1), runs/la_v2 (v2)")
    args = ap.parse_args()
    p = PROTOCOLS[args.protocol]
    runs = Path(args.runs or HERE / "runs" / ("la" if args.protocol == "v1" else f"la_{args.protocol}"))
    runs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda r: run_row(r, runs, lambda s, b: recipe(s, b, p), p), args.rows):
            print(json.dumps(row), flush=True)
            save_rows([row], RESULTS[args.protocol])
    write_markdown(load_rows())


if __name__ == "__main__":
    main()
