"""Fill in the precision of rows made before rows recorded it, from the git history of their results file.

    python benchmarks/infer_precision.py            # write ``precision`` + ``precision_from`` into such rows
    python benchmarks/infer_precision.py --dry-run  # print what it would write

A row without ``precision`` is found in the history of its file: the oldest commit that added one of its values
(``"mean_dice": 0.2408``, the first of :data:`KEYS` whose text is unique in the file). The commit's date (UTC) names
the host that ran it (:data:`HOSTS`, the hosts the sessions of those dates recorded in RESULTS.md's header), and
that host's ``precision: auto`` gives the precision, unless the row names fp32 itself (``*_fp32`` variants trained
at ``32-true``). The row then carries ``precision`` and ``precision_from`` (``inferred: <commit> <date>, <host>``);
tables mark such cells with † (:func:`common.precision_cell`). Rows whose value is not unique, or not in the
history, are left as they are (``n/r``).
"""
from __future__ import annotations

import argparse
import json
import subprocess

from common import RESULTS_DIR, ROOT, load_json, write_json

#: first day (UTC, inclusive) → the host the rows of that day ran on and what ``precision: auto`` picked there
HOSTS = [("2026-11-01", "AMD EPYC, AVX2 without native bf16", "32-true"),
         ("2026-12-01", "Intel Xeon, AVX-512 BF16", "bf16-mixed"),
         ("2026-12-02", "AMD EPYC, AVX-512 BF16", "bf16-mixed")]
#: the values that identify a row in its file's history, in order of preference
KEYS = ("mean_dice", "target_mean_dice", "source_mean_dice", "dice", "hd95", "train_seconds")


def _rows(data) -> list:
    return data if isinstance(data, list) else data.get("rows", []) if isinstance(data, dict) else []


def _needle(row: dict, text: str) -> str | None:
    for k in KEYS:
        if isinstance(row.get(k), (int, float)):
            s = f'"{k}": {json.dumps(row[k])}'
            if text.count(s) == 1:
                return s
    return None


def _first_commit(path, needle: str) -> tuple[str, str] | None:
    out = subprocess.run(["git", "log", "--format=%h %ad", "--date=format-local:%Y-%m-%d", "-S", needle, "--",
                          str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True,
                         env={"TZ": "UTC", "PATH": "/usr/bin:/bin"}, check=True).stdout.split("\n")
    lines = [ln for ln in out if ln.strip()]
    return tuple(lines[-1].split()) if lines else None


def infer(row: dict, commit: str, day: str) -> dict:
    host, auto = next((h, p) for start, h, p in reversed(HOSTS) if day >= start)
    names = " ".join(str(row.get(k, "")) for k in ("strategy", "method", "variant"))
    precision = "32-true" if "fp32" in names else auto
    return {"precision": precision, "precision_from": f"inferred: commit {commit} {day}, {host}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    for path in sorted(RESULTS_DIR.glob("*.json")):
        text, data = path.read_text(), load_json(path, [])
        changed = 0
        for row in _rows(data):
            if not isinstance(row, dict) or row.get("precision"):
                continue
            needle = _needle(row, text)
            found = needle and _first_commit(path, needle)
            if found:
                row.update(infer(row, *found))
                changed += 1
        print(f"{path.name}: {changed} rows given an inferred precision")
        if changed and not args.dry_run:
            write_json(path, data)


if __name__ == "__main__":
    main()
