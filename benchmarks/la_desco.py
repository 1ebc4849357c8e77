"""DeSCO on LA against supervised baselines with the same annotation: results/la_desco.json + RESULTS.md.

    python benchmarks/la_desco.py [--rows desco:1337 supervised_sparse:1337 supervised_dense:1337] [--jobs 1]

Rows (all: the same 5 labelled volumes, the LA protocol's 3D U-Net with dropout 0.1, the same steps and SGD):
- ``desco``: ``recipes/la_desco.yaml`` (one axial + one coronal slice per labelled volume, 11 unlabelled volumes);
- ``supervised_sparse``: ``supervised`` on the same two slices per volume only (loss restricted by ``label_mask``);
- ``supervised_dense``: ``supervised`` on the 5 volumes fully annotated (the annotation DeSCO saves).
The propagated labels of the first DeSCO run are copied into later seeds' runs (they depend on the data only).
Run it as a script (it imports only ``benchmarks/common.py``); ``section(rows)`` is its part of RESULTS.md.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import yaml
from common import (ROOT, RESULTS_DIR, RUNS_DIR, load_json, load_rows, md_table, paired_differences, rebuild_report,
                    run_recipe_process, run_rows, save_rows, summarise)

RESULTS = RESULTS_DIR / "la_desco.json"
RECIPE = ROOT / "recipes" / "la_desco.yaml"
#: the desco rows before DeSCO took a batch per network (recovered from git, the command in the file)
SUPERSEDED = RESULTS_DIR / "superseded_rows.json"


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
    return {"strategy": name, "labeled": "count_5", "seed": int(seed), **summarise(m), "steps": sum(s["steps"] for s in m["stages"]), "train_seconds": round(m["train_seconds"], 1),
            "peak_rss_mb": round(m["peak_rss_mb"], 1), "threads": 1,
            "annotated_slices": 10 if name != "supervised_dense" else None}


#: LA's isotropic voxel spacing in mm (HD95 in voxels × this = mm)
LA_MM = 0.625


def table(rows: list[dict]) -> str:
    lines = [[r["strategy"], r["seed"], f"{r['mean_dice']:.4f}", f"{r['hd95']:.2f}", f"{r['hd95'] * LA_MM:.2f}", r["steps"],
              f"{r['train_seconds']:.0f}"] for r in rows]
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        by.setdefault(r["strategy"], {})[r["seed"]] = r["mean_dice"]
    sparse = by.get("supervised_sparse", {})
    for name in by:
        rs = [r for r in rows if r["strategy"] == name and r["seed"] in sparse]
        if name != "supervised_sparse" and rs:
            diffs = paired_differences(rs, sparse, key=lambda r: r["seed"])
            sd = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
            lines.append([f"{name} − supervised_sparse, seeds {[r['seed'] for r in rs]}", "",
                          f"{statistics.mean(diffs):+.4f}{sd}", "", "", "", ""])
    return md_table(["row", "seed", "mean Dice", "HD95 (vox)", "HD95 (mm)", "steps", "train s"], lines)


def load_results() -> dict:
    return {"rows": load_rows(RESULTS), "superseded": load_json(SUPERSEDED, {}).get("la_desco")}


def section(rows: dict) -> str:
    if not rows["rows"]:
        return ""
    old, before = rows["superseded"], ""
    if old:
        before = (" (before, both networks shared one 1 + 1 batch: "
                  + " / ".join(f"{r['mean_dice']:.4f}" for r in sorted(old["rows"], key=lambda r: r["seed"]))
                  + f"; `{old['command']}`)")
    return "\n".join([
        "## DeSCO: two orthogonal slices per volume (LA 3D)", "",
        "Regenerate: `python benchmarks/la_desco.py`. `recipes/la_desco.yaml`: 5 labelled volumes of the LA "
        "subset, each with one axial and one coronal annotated slice (middle slices; the rest of the label is "
        "erased before training), 11 unlabelled; ANTs SyNRA propagation; 3D U-Net 16…128 with dropout 0.1, "
        "80×80×48 crops, SGD 0.01 (Net1 ×0.1 at 5/12 and 10/12 of the run), last checkpoint, Dice/HD95 (voxels) "
        "on the 8 test volumes. `supervised_sparse`: the same 10 slices only (loss on `label_mask`); "
        "`supervised_dense`: the 5 volumes fully annotated. Same steps for every row. DeSCO takes a 2 + 2 batch "
        "and gives each network its own half (the official code's loader per network); the `desco` rows were "
        f"re-made with it on 2026-12-01{before}.", "", table(rows["rows"]), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=[f"{n}:{s}" for s in (1337, 1338)
                                                   for n in ("desco", "supervised_sparse", "supervised_dense")])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--runs", default=str(RUNS_DIR / "la_desco"))
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    run_rows(args.rows, args.jobs, lambda r: run(r, runs), lambda row: save_rows([row], RESULTS))
    rebuild_report()


if __name__ == "__main__":
    main()
