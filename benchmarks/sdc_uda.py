"""SDC-UDA on a SIMULATED modality shift of ACDC: rows to results/sdc_uda.json.

    python benchmarks/sdc_uda.py [--seeds 1337 1338] [--rows source_only sdc_uda oracle]
    python benchmarks/sdc_uda.py --table-only

The shift is simulated (dataset ``simulated_shift``, ``label_efficient/data/shift.py``): half of the patients of
every ACDC split (seed 0) form the "target scanner" (gamma 0.6, contrast inversion, per-volume linear bias field ±30 %,
Gaussian blur σ = 1 px at 64²); the other half is the labelled source. All rows are tested on the 20 target test
volumes (Dice, HD95 per class, mean over RV/MYO/LV), with the same 2D U-Net and a fixed step count (no row selects a
model on target labels, except that the oracle is trained on them):

* ``source_only``: supervised on the labelled source, applied to the target;
* ``sdc_uda``: translation (2.5D generator, intra- + inter-slice attention) → teacher on the translated source →
  self-training rounds on refined target pseudo labels (``recipes/acdc_sdc_uda.yaml``, schedules below);
* ``oracle``: supervised on the labelled *target* train split (upper bound).

CPU-sized: 64², generator 16/32 channels with 1 transformer block, ``TRANSLATE_STEPS`` GAN steps (the paper: 256², 4
blocks, 100k iterations, i.e. ~100× more); segmenters ``SEG_STEPS`` steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from acdc_cpu import run_recipe_process  # noqa: E402

RESULTS = HERE / "results" / "sdc_uda.json"
RUNS = HERE / "runs" / "sdc_uda"
RECIPE = HERE.parent / "recipes" / "acdc_sdc_uda.yaml"
TRANSLATE_STEPS, SEG_STEPS, SELF_TRAIN_STEPS = 1000, 1500, 1000
TRAINER = {"precision": "auto", "progress_bar": False, "log_every": 50}


def sdc_uda_recipe() -> dict:
    r = yaml.safe_load(RECIPE.read_text())
    r["stages"][0]["steps"], r["stages"][1]["steps"], r["stages"][2]["steps"] = (TRANSLATE_STEPS, SEG_STEPS,
                                                                                   SELF_TRAIN_STEPS)
    r["trainer"] = TRAINER
    r["evaluation"] = {"metrics": ["dice", "hd95"], "overlays": 2}
    return r


def supervised_recipe(labeled_domain: str) -> dict:
    """The SDC-UDA recipe's data, backbone and teacher optimiser, trained on one domain's labels."""
    base = sdc_uda_recipe()
    teacher = copy.deepcopy(base["stages"][1])
    teacher.pop("data"), teacher.pop("init")
    data = {**base["data"], "labeled_domain": labeled_domain}
    if labeled_domain == "target":  # the oracle: target labels, fixed step count like every other row
        data.pop("labeled_domain")
    return {**base, "data": data, "stages": [teacher]}


ROWS = {"source_only": lambda: supervised_recipe("source"), "sdc_uda": sdc_uda_recipe,
        "oracle": lambda: supervised_recipe("target")}


def run(row: str, seed: int) -> dict:
    m = run_recipe_process({**ROWS[row](), "seed": seed}, RUNS / f"{row}_s{seed}")
    return {"row": row, "seed": seed, "mean_dice": round(m["mean_dice"], 4), "hd95": round(m["mean_hd95"], 2),
            "per_class_dice": {k: round(v, 4) for k, v in m["per_class"]["dice"].items()},
            "stages": [{"stage": s["stage"], "steps": s["steps"], "seconds": round(s["seconds"], 1)} for s in m["stages"]],
            "train_seconds": round(m["train_seconds"], 1), "test_volumes": len(m["cases"]), "threads": 1,
            "shift": "simulated (simulated_shift on acdc, seed 0)"}


def table(rows: list[dict]) -> str:
    import numpy as np

    out = ["| row | seeds | Dice (mean ± s.d.) | HD95 | RV | MYO | LV | train s / seed |", "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        rs = [r for r in rows if r["row"] == name]
        if not rs:
            continue
        d = np.array([r["mean_dice"] for r in rs])
        pc = {k: np.mean([r["per_class_dice"][k] for r in rs]) for k in rs[0]["per_class_dice"]}
        out.append(f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {d.mean():.3f} ± {d.std():.3f} | "
                   f"{np.mean([r['hd95'] for r in rs]):.1f} | " + " | ".join(f"{v:.3f}" for v in pc.values())
                   + f" | {np.mean([r['train_seconds'] for r in rs]):.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    if not args.table_only:
        for seed in args.seeds:
            for row in args.rows:
                rows = [r for r in rows if (r["row"], r["seed"]) != (row, seed)] + [run(row, seed)]
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(rows, indent=1))
                print(f"{row} seed {seed}: Dice {rows[-1]['mean_dice']}", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
