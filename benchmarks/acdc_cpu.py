"""ACDC-CPU benchmark: every strategy on the same pinned protocol; rows to results/acdc_cpu.json.

    python benchmarks/acdc_cpu.py                      # all rows (hours on 2 cores), then RESULTS.md
    python benchmarks/acdc_cpu.py --rows supervised:labeled_3 mean_teacher:labeled_7 --jobs 2
    python benchmarks/acdc_cpu.py --rows supervised:labeled_7:1338 mean_teacher:labeled_7:1338   # another seed
    python benchmarks/acdc_cpu.py --rows supervised:labeled_7:1337:6000 mean_teacher:labeled_7:1337:6000  # longer
    python benchmarks/acdc_cpu.py --table-only         # RESULTS.md from the JSON rows (= python benchmarks/report.py)

Each row runs in its own process with one thread (``--jobs 2`` runs two at once on a 2-core machine). Run it as a
script, ``python benchmarks/acdc_cpu.py``: it imports only ``benchmarks/common.py``. ``section(rows)`` is its part of
RESULTS.md (the v2 and v1 tables, the seed spread, the official code beside ours, the pre-training ablation).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import (RESULTS_DIR, RUNS_DIR, load_json, load_rows, md_table, on_protocol, rebuild_report, result_table,
                    row_seed, run_row, run_rows, save_rows, seed_table)

RESULTS = RESULTS_DIR / "acdc_cpu.json"
RESULTS_V1 = RESULTS_DIR / "acdc_cpu_v1.json"  #: rows of the superseded protocol v1 (kept, shown apart)
#: the official BCP code's times and accuracy, measured by hand (the file names its commands)
OFFICIAL = RESULTS_DIR / "official_bcp.json"
#: rows made before a fix, shown beside the re-made ones (``acdc_cpu``: bf16 softmax in the losses)
SUPERSEDED = RESULTS_DIR / "superseded_rows.json"

#: The pinned protocol (v2, issue 9): the official BCP code's configuration scaled to this CPU: its U-Net
#: (``basic_unet``: max-pool, two convs per level, encoder dropout), SGD 0.01 with momentum 0.9 at a constant rate,
#: 12 labelled + 12 unlabelled slices at 128², 3000 steps, validation every 200 steps on all 20 val volumes.
#: Every row shares it; a strategy adds only its own stage layout and config.
PROTOCOL = {
    "seed": 1337,
    "data": {"dataset": "acdc", "image_size": [128, 128], "max_val_cases": None},
    "backbone": {"name": "basic_unet", "kwargs": {}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 50},
    "steps": 3000,
    "val_every": 200,
    "batch_size": {"labeled": 12, "unlabeled": 12},
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "schedule": "constant"},
}
#: The supervised ceiling (all 70 train patients) uses the same schedule.
CEILING_STEPS = PROTOCOL["steps"]
BUDGETS = {"labeled_3": {"flag": "labeled_3"}, "labeled_7": {"flag": "labeled_7"}, "all": {"all": True}}

#: Settings of protocol v1 (MONAI UNet without residual units, AdamW 3e-3 poly, batch 8 + 8), for the ablation.
V1_BACKBONE = {"name": "unet", "kwargs": {"channels": [16, 32, 64, 128, 256], "num_res_units": 0}}
V1_OPTIMIZER = {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001, "schedule": "poly"}
V1_BATCH = {"labeled": 8, "unlabeled": 8}

#: Named variants: a row name mapped to a registered strategy and what it changes from the protocol (``config``,
#: ``optimizer``, ``backbone``, ``batch_size``, ``trainer``), and the row its gap closed is measured from (``None``: none,
#: default ``supervised``). The ``bcp_pretrain_*`` rows are the ablation of the v1 → v2 gap: BCP's copy-paste
#: pre-training alone, with one v1 setting put back.
VARIANTS = {
    "bcp_pretrain_v1net": {"strategy": "bcp_pretrain", "backbone": V1_BACKBONE, "baseline": None},
    "bcp_pretrain_adamw": {"strategy": "bcp_pretrain", "optimizer": V1_OPTIMIZER, "baseline": None},
    "bcp_pretrain_b8": {"strategy": "bcp_pretrain", "batch_size": V1_BATCH, "baseline": None},
    "bcp_pretrain_v1": {"strategy": "bcp_pretrain", "backbone": V1_BACKBONE, "optimizer": V1_OPTIMIZER,
                        "batch_size": V1_BATCH, "baseline": None},
    "bcp_teacher_eval": {"strategy": "bcp", "config": {"teacher_eval_mode": True}},
    #: precision ablation: the protocol's ``precision: auto`` is bf16-mixed on a host with native bf16
    "bcp_pretrain_fp32": {"strategy": "bcp_pretrain", "trainer": {"precision": "32-true"}, "baseline": None},
}


def stages(strategy: str, steps: int) -> list[dict]:
    v = VARIANTS.get(strategy, {"strategy": strategy})
    common = {"val_every": PROTOCOL["val_every"], "batch_size": v.get("batch_size", PROTOCOL["batch_size"]),
              "optimizer": v.get("optimizer", PROTOCOL["optimizer"]), "config": v.get("config", {})}
    if v["strategy"] == "bcp":  # BCP: copy-paste pre-training (1/3 of the steps), then self-training from its best
        pre = steps // 3
        return [{**common, "strategy": "bcp_pretrain", "steps": pre},
                {**common, "strategy": "bcp", "steps": steps - pre, "init": "previous_best"}]
    return [{**common, "strategy": v["strategy"], "steps": steps}]


def recipe(strategy: str, labeled: str) -> dict:
    steps = CEILING_STEPS if (strategy == "supervised" and labeled == "all") else PROTOCOL["steps"]
    return {"name": f"acdc_cpu_{strategy}_{labeled}", "seed": PROTOCOL["seed"],
            "data": {**PROTOCOL["data"], "budget": BUDGETS[labeled]},
            "backbone": VARIANTS.get(strategy, {}).get("backbone", PROTOCOL["backbone"]),
            "trainer": {**PROTOCOL["trainer"], **VARIANTS.get(strategy, {}).get("trainer", {})},
            "stages": stages(strategy, steps)}


#: The full table: 3 seeds of supervised at 3 / 7 / all patients and of each semi-supervised strategy at 3 and 7.
SEEDS = (1337, 1338, 1339)
DEFAULT_ROWS = [f"supervised:{b}:{s}" for b in BUDGETS for s in SEEDS] + [
    f"{st}:{b}:{s}" for st in ("bcp", "mean_teacher", "dsaif") for b in ("labeled_3", "labeled_7") for s in SEEDS]


BASELINES = {name: v.get("baseline", "supervised") for name, v in VARIANTS.items()}


def load_results() -> dict:
    """The rows of this section: protocol v2 and v1, the official code's file and the speed rows it names."""
    official = load_json(OFFICIAL)
    names = [] if official is None else [f for r in official["rows"] for f in r.get("ours_speed_rows", [])]
    return {"v2": load_rows(RESULTS), "v1": load_rows(RESULTS_V1), "official": official,
            "speed": {f: load_rows(RESULTS_DIR / f) for f in names},
            "superseded": load_json(SUPERSEDED, {}).get("acdc_cpu")}


def _per_iter(row: dict, digits: int) -> tuple[str, str]:
    """Seconds per iteration, Lightning and raw network passes, of a speed row."""
    return f"{1 / row['lightning_its']:.{digits}f}", f"{1 / row['raw_its']:.{digits}f}"


def _ours(r: dict, speed: dict) -> str:
    """The 'ours' cell of an official-code row: from the speed rows it names (fp32 first, then ``precision: auto``)."""
    if "ours_speed_rows" not in r:
        return r["ours"]
    first, *rest = [next(x for x in speed[f] if x["strategy"] == "bcp") for f in r["ours_speed_rows"]]
    lt, raw = _per_iter(first, r["digits"])
    out = f"{lt} (Lightning; raw network passes alone {raw})"
    for x in rest:
        lt, raw = _per_iter(x, r["digits"])
        out += f"; {lt} at `precision: auto` ({x['precision']} on this host; raw {raw})"
    return out


def official_section(official: dict, speed: dict) -> list[str]:
    acc = official["official_accuracy"]
    rows = [[r["what"], f"{r['official_s_per_iter']:.{r['digits']}f} ({r['official_how']})", _ours(r, speed),
             r["ours_from"]] for r in official["rows"]]
    return ["### Beside the official BCP code", "",
            "The official code (DeepMed-Lab-ECNU/BCP, run outside this repository with CPU edits only: no `.cuda()`, "
            "no DataLoader workers, 128² patches, and a stand-in for torchvision's `Compose`, whose wheel did not match "
            "torch 2.13) on the same ACDC slices and split (its h5 format), run on this machine (its times and command: "
            "`benchmarks/results/official_bcp.json`; ours from the speed rows it names):", "",
            md_table(["what", "official", "ours", "how ours was measured"], rows), "",
            f"{official['note']} The official code's accuracy at {acc['labelled_patients']} patients "
            f"({acc['mean_dice']:.3f} Dice, {' + '.join(map(str, acc['iterations']))} iterations, {acc['minutes']} min) "
            f"is {acc['by']}.", ""]


def section(rows: dict) -> str:
    v2, v1 = rows["v2"], rows["v1"]
    md = []
    if v2:
        p = next(r["protocol"] for r in v2 if on_protocol(r))
        pre = p["steps"] // 3
        md += ["## ACDC-CPU protocol v2 (the official BCP configuration)", "",
               f"Regenerate: `python benchmarks/acdc_cpu.py` (rows in `results/acdc_cpu.json`). ACDC 2D slices resized "
               f"to {p['data']['image_size'][0]}², `basic_unet` (the SSL4MIS/BCP U-Net: max-pool, "
               "16…256 channels, encoder dropout 0.05…0.5), batch "
               f"{p['batch_size']['labeled']} labelled + {p['batch_size']['unlabeled']} unlabelled, SGD lr "
               f"{p['optimizer']['lr']} momentum {p['optimizer']['momentum']} weight decay {p['optimizer']['weight_decay']} "
               f"at a constant rate, {p['steps']} steps (BCP: {pre} copy-paste pre-training + "
               f"{p['steps'] - pre} self-training from the best pre-training checkpoint), validation every "
               f"{p['val_every']} steps on all 20 val volumes (model selection), precision auto. Test: per-volume mean "
               "Dice over RV/MYO/LV and HD95 in pixels on the 40 test volumes (predictions resized back to each slice's "
               "size). gap closed = (strategy − supervised, same labels) / (supervised all − supervised, same labels); "
               "empty where a row it needs is not run yet.", "",
               result_table([r for r in v2 if on_protocol(r)], baselines=BASELINES), ""]
        spread = seed_table(v2)
        if spread:
            md += ["Seed spread (`--rows strategy:budget:seed`): other seeds change the initialisation, the batch "
                   "order and the augmentation; the last column pairs each seed with supervised on that seed.", "",
                   spread, ""]
        if rows["official"]:
            md += official_section(rows["official"], rows["speed"])
        ablation = sorted((r for r in v2 if r["strategy"].startswith("bcp_pretrain")),
                          key=lambda r: r["strategy"] != "bcp_pretrain")  # the v2 stage first
        old = rows.get("superseded")
        before = [{**r, "strategy": f"{r['strategy']}, {old['label']}"} for r in old["rows"]] if old else []
        if ablation or before:
            cmd = " ".join(f"{r['strategy']}:{r['labeled']}:{row_seed(r)}:{r['steps']}" for r in ablation)
            md += ["### Ablation: BCP's copy-paste pre-training with one setting changed (the v1 → v2 gap, and "
                   "precision)", "",
                   "The pre-training stage builds the teacher that BCP's self-training starts from. `bcp_pretrain` is "
                   "the v2 stage; `_v1net` puts back the v1 network (MONAI UNet 16…256, no residual units, no dropout), "
                   "`_adamw` the v1 optimizer (AdamW 3e-3, poly), `_b8` the v1 batch (8 + 8), `_v1` all three; `_fp32` "
                   "keeps v2 but trains in fp32 where `precision: auto` chose bf16-mixed (this Xeon host has native "
                   "bf16). Same labels, seed and steps; test Dice of the stage's best val checkpoint. "
                   f"`python benchmarks/acdc_cpu.py --rows {cmd}`"
                   + (f". Rows marked *{old['label']}* were {old['why']} (`{old['command']}`)." if old else ""),
                   "", result_table(before + ablation, baselines=BASELINES), ""]
    if v1:
        p = v1[0]["protocol"]
        all_steps = next(r["steps"] for r in v1 if r["strategy"] == "supervised" and r["labeled"] == "all")
        md += ["## ACDC-CPU protocol v1 (superseded; not comparable with v2)", "",
               f"MONAI U-Net 16…256 without residual units, AdamW {p['optimizer']['lr']:g} {p['optimizer']['schedule']}, "
               f"batch {p['batch_size']['labeled']} + {p['batch_size']['unlabeled']}, bf16 autocast, {p['steps']} steps "
               f"(supervised-all {all_steps}), validation on {p['data']['max_val_cases']} val volumes. Kept for the "
               "record of issue 9's gap.", "", result_table([r for r in v1 if on_protocol(r)], baselines=BASELINES), ""]
    return "\n".join(md)


def with_ssl4mis(row: dict, runs: Path) -> dict:
    """The row with its run re-scored by the published ACDC test (``label-efficient evaluate --protocol ssl4mis``:
    each slice zoomed to the training size, argmax, zoomed back, medpy per volume), one thread."""
    folder = runs / row["run_folder"]
    out = folder / "metrics_ssl4mis.json"
    if not out.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "label_efficient.cli", "evaluate", str(folder), "--protocol", "ssl4mis",
                        "--output", str(out)], env=env, check=True, capture_output=True)
    m = json.loads(out.read_text())
    return {**row, "ssl4mis_mean_dice": round(m["mean_dice"], 4), "ssl4mis_hd95": round(m["mean_hd95"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, help="strategy:budget pairs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", default=str(RUNS_DIR / "acdc_v2"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        runs = Path(args.runs)
        runs.mkdir(parents=True, exist_ok=True)
        run_rows(args.rows, args.jobs, lambda r: with_ssl4mis(run_row(r, runs, recipe, PROTOCOL), runs),
                 lambda row: save_rows([row], RESULTS))
    rebuild_report()


if __name__ == "__main__":
    main()
