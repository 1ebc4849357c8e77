"""DeSCO on LA against supervised baselines with the same annotation: results/la_desco.json + RESULTS.md.

    python benchmarks/la_desco.py [--rows desco:1337 supervised_sparse:1337 supervised_dense:1337] [--jobs 1]

Rows (all: the same 5 labelled volumes, the LA protocol's 3D U-Net with dropout 0.1, the same steps and SGD):
- ``desco``: ``recipes/la_desco.yaml`` (one axial + one coronal slice per labelled volume, 11 unlabelled volumes);
- ``supervised_sparse``: ``supervised`` on the same two slices per volume only (loss restricted by ``label_mask``);
- ``supervised_dense``: ``supervised`` on the 5 volumes fully annotated (the annotation DeSCO saves).
The propagated labels of the first DeSCO run are copied into later seeds' runs (they depend on the data only).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from acdc_cpu import load_rows, run_recipe_process, save_rows  # noqa: E402

RESULTS = HERE / "results" / "la_desco.json"
RECIPE = HERE.parent / "recipes" / "la_desco.yaml"


def recipe(row: str) -> dict:
    r = yaml.safe_load(RECIPE.read_text())
    st = r["stages"][0]
    if row != "desco":
        r["stages"] = [{"strategy": "supervised", "steps": st["steps"], "val_every": st["val_every"],
                        "batch_size": {"labeled": 2}, "optimizer": st["optimizer"]}]
        if row == "supervised_dense":
            del r["data"]["annotation"]
    return r


def run(row: str, runs: Path) -> dict:
    name, seed = row.split(":")
    r = {**recipe(name), "seed": int(seed), "name": f"la_desco_{name}"}
    out = runs / f"{name}_s{seed}"
    cached = sorted(runs.glob("desco_s*/stage0_desco/targets"))
    if name == "desco" and cached and not (out / "stage0_desco" / "targets").exists():
        shutil.copytree(cached[0], out / "stage0_desco" / "targets")
    m = run_recipe_process(r, out)
    return {"strategy": name, "labeled": "count_5", "seed": int(seed), "mean_dice": round(m["mean_dice"], 4),
            "hd95": round(m["mean_hd95"], 2), "per_class_dice": {k: round(v, 4) for k, v in m["per_class"]["dice"].items()},
            "steps": sum(s["steps"] for s in m["stages"]), "train_seconds": round(m["train_seconds"], 1),
            "peak_rss_mb": round(m["peak_rss_mb"], 1), "threads": 1,
            "annotated_slices": 10 if name != "supervised_dense" else None}


def table(rows: list[dict]) -> str:
    import statistics

    lines = ["| row | seed | mean Dice | HD95 (vox) | steps | train s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['seed']} | {r['mean_dice']:.4f} | {r['hd95']:.2f} | {r['steps']} | "
              f"{r['train_seconds']:.0f} |" for r in rows]
    by = {}
    for r in rows:
        by.setdefault(r["strategy"], {})[r["seed"]] = r["mean_dice"]
    sparse = by.get("supervised_sparse", {})
    for name, seeds in by.items():
        common = [s for s in seeds if s in sparse]
        if name != "supervised_sparse" and common:
            diffs = [seeds[s] - sparse[s] for s in common]
            sd = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
            lines.append(f"| {name} − supervised_sparse, seeds {common} | | {statistics.mean(diffs):+.4f}{sd} | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=[f"{n}:{s}" for s in (1337, 1338)
                                                   for n in ("desco", "supervised_sparse", "supervised_dense")])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", default=str(HERE / "runs" / "la_desco"))
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda r: run(r, runs), args.rows):
            print(json.dumps(row), flush=True)
            save_rows([row], RESULTS)
    from acdc_cpu import write_markdown

    write_markdown(load_rows())


if __name__ == "__main__":
    main()
