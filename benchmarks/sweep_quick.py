"""The label-budget sweep of the quick recipe (``label-efficient sweep``): results/sweep_acdc_quick.md/.png.

    python benchmarks/sweep_quick.py    # runs the sweep below (hours on 2 cores), then copies its table and figure

The sweep writes its own markdown table (``sweep.md``) and learning curve; they are kept as
``results/sweep_acdc_quick.md`` and ``.png``, and ``section(rows)`` quotes that table as it stands. Run it as a script
(it imports only ``benchmarks/common.py``).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess

from common import RESULTS_DIR, ROOT

TABLE, FIGURE = RESULTS_DIR / "sweep_acdc_quick.md", RESULTS_DIR / "sweep_acdc_quick.png"
COMMAND = ["label-efficient", "sweep", "recipes/acdc_quick.yaml", "--strategies", "supervised,mean_teacher",
           "--budgets", "1,3,7,14,all", "--seeds", "2", "--out", "runs/quick_sweep"]


def load_results() -> str | None:
    return TABLE.read_text() if TABLE.exists() else None


def section(rows: str | None) -> str:
    if rows is None:
        return ""
    return "\n".join([
        "## Label-budget sweep (`label-efficient sweep`, quick recipe)", "",
        f"`{' '.join(COMMAND)}` (then copy `sweep.md` and `learning_curve.png` to "
        "`benchmarks/results/sweep_acdc_quick.*`: `python benchmarks/sweep_quick.py` does both): the README's quick "
        "recipe as it was then (96² MONAI U-Net 16…128, 600 AdamW steps; since 2026-12-01 it uses basic_unet and SGD), "
        "each cell selected on 6 val volumes and tested on the 40 test volumes. Budgets are `count: n` patients drawn "
        "by the seed (not the SSL4MIS `labeled_n` lists); mean teacher at `all` is skipped (no "
        "unlabelled data left). *Labels saved* interpolates supervised's curve linearly between its budgets "
        "(7 → 14 → 70 here), so it is coarse where the budgets are far apart.", "", rows.strip(), "",
        f"![learning curve](results/{FIGURE.name})", ""])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    subprocess.run(COMMAND, cwd=ROOT, check=True)
    out = ROOT / COMMAND[COMMAND.index("--out") + 1]
    shutil.copy(out / "sweep.md", TABLE)
    shutil.copy(out / "learning_curve.png", FIGURE)


if __name__ == "__main__":
    main()
