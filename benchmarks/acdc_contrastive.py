"""Contrastive pre-training → fine-tune vs random init on ACDC, same labels, steps and seeds:
results/acdc_contrastive.json + RESULTS.md.

    python benchmarks/acdc_contrastive.py                     # pre-train once, then every fine-tune row
    python benchmarks/acdc_contrastive.py --rows pretrained:count_1:1337 random:count_1:1337

Pre-training (``contrastive_global`` then ``contrastive_local``, label-free, all 70 train patients, no mask read)
runs once; every ``pretrained`` row fine-tunes from its model.pt, which hands over the encoder and the first
3 decoder blocks only (the rest starts random, as in the paper). A ``random`` row is the same supervised fine-tune
from random init. Budgets: ``count_n`` = n labelled patients (both frames), chosen by the row's seed. Each row runs
in a single-thread process, resumable. Run it as a script (it imports only ``benchmarks/common.py``);
``section(rows)`` is its part of RESULTS.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS_DIR, RUNS_DIR, load_rows, result_table, run_recipe_process, run_row, run_rows, save_rows, seed_table

RESULTS = RESULTS_DIR / "acdc_contrastive.json"
ADAM = {"name": "adam", "lr": 0.001, "weight_decay": 0.0, "schedule": "constant"}  # the spec's optimizer, all stages
#: CPU-sized: the spec runs 10k iterations per stage at 192²; here 128² and a few hundred steps per stage. m = 5 as
#: the spec (80 encoder passes a step): with m = 2 (24 negatives per anchor) G^D sat at its collapsed value ln 25 for
#: 200 steps in a probe, with m = 5 it left ln 61 after ~200 steps.
PROTOCOL = {
    "seed": 1337,
    "data": {"dataset": "acdc", "image_size": [128, 128], "max_val_cases": 10},
    "backbone": {"name": "basic_unet", "kwargs": {}},
    "trainer": {"precision": "auto", "progress_bar": False, "log_every": 50},
    "global": {"steps": 600, "config": {"partitions": 4, "volumes": 5, "temperature": 0.1}},
    "local": {"steps": 400, "batch": 8, "config": {"decoder_blocks": 3, "temperature": 0.1}},
    "finetune": {"steps": 400, "val_every": 100, "batch": 12},
}
SEEDS = (1337, 1338, 1339)
DEFAULT_ROWS = [f"{init}:count_{n}:{s}" for n in (1, 2, 8) for s in SEEDS for init in ("pretrained", "random")]


def pretrain_recipe() -> dict:
    p = PROTOCOL
    label_free = {"val_every": 100, "optimizer": ADAM, "data": {"augment": False}}
    return {"name": "acdc_contrastive_pretrain", "seed": p["seed"], "data": {**p["data"], "budget": {"all": True}},
            "backbone": p["backbone"], "trainer": p["trainer"],
            "stages": [{"strategy": "contrastive_global", "steps": p["global"]["steps"], "config": p["global"]["config"],
                        **label_free},
                       {"strategy": "contrastive_local", "init": "previous_last", "steps": p["local"]["steps"],
                        "batch_size": {"unlabeled": p["local"]["batch"]}, "config": p["local"]["config"],
                        **label_free}]}


def pretrain(runs: Path) -> Path:
    """Run (or resume) the label-free stages once; the path of their model.pt."""
    out = runs / "pretrain"
    if not (out / "model.pt").exists():
        run_recipe_process(pretrain_recipe(), out)
    return out / "model.pt"


def finetune_recipe(init: str, labeled: str, weights: Path) -> dict:
    p, ft = PROTOCOL, PROTOCOL["finetune"]
    stage = {"strategy": "supervised", "steps": ft["steps"], "val_every": ft["val_every"],
             "batch_size": {"labeled": ft["batch"]}, "optimizer": ADAM,
             "init": str(weights) if init == "pretrained" else "none"}
    return {"name": f"acdc_contrastive_{init}_{labeled}", "seed": p["seed"],
            "data": {**p["data"], "budget": {"count": int(labeled.split("_")[1])}},
            "backbone": p["backbone"], "trainer": p["trainer"], "stages": [stage]}


def load_results() -> list[dict]:
    return load_rows(RESULTS)


def section(rows: list[dict]) -> str:
    if not rows:
        return ""
    cp = rows[0]["protocol"]
    g, lo, ft = cp["global"], cp["local"], cp["finetune"]
    md = ["## Contrastive pre-training → fine-tune (ACDC)", "",
          "Regenerate: `python benchmarks/acdc_contrastive.py`. One label-free pre-training on all 70 train "
          f"patients (no mask read): `contrastive_global` {g['steps']} steps (S = {g['config']['partitions']}, "
          f"m = {g['config']['volumes']}), then `contrastive_local` {lo['steps']} steps (l = "
          f"{lo['config']['decoder_blocks']}, {lo['batch']} pairs), Adam 1e-3, {cp['data']['image_size'][0]}², "
          f"`basic_unet`. Each row fine-tunes with `supervised` for {ft['steps']} steps (Adam 1e-3, batch {ft['batch']}, "
          f"validation every {ft['val_every']} steps on {cp['data']['max_val_cases']} val volumes) from the pre-trained "
          "encoder + first 3 decoder blocks (`pretrained`) or from random init (`random`), same labelled patients "
          "(`count_n`, chosen by the seed), same seed. The spec trains 10k iterations per stage on a GPU.", "",
          result_table(rows), ""]
    pairs = seed_table(rows, baseline="random")
    if pairs:
        md += ["Seed mean (last column: pre-trained − random init, paired by seed):", "", pairs, ""]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, help="pretrained|random:count_n:seed")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", default=str(RUNS_DIR / "acdc_contrastive"))
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    weights = pretrain(runs)
    build = lambda init, labeled: finetune_recipe(init, labeled, weights)
    run_rows(args.rows, args.jobs, lambda r: run_row(r, runs, build, PROTOCOL), lambda row: save_rows([row], RESULTS))


if __name__ == "__main__":
    main()
