"""benchmarks/speed.py: every strategy's raw loop, Lightning module and plain loop run on its own batches and give a
finite positive speed; its RESULTS.md section still reads the stored rows (which lack the newer fields)."""
from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def speed():
    """``benchmarks/speed.py`` as a module; its ``from common import …`` gets ``benchmarks/common.py`` (the
    scripts import it by name from their folder), without touching ``sys.path``."""
    saved = sys.modules.get("common")
    sys.modules["common"] = _load("common", BENCH / "common.py")
    try:
        yield _load("bench_speed", BENCH / "speed.py")
    finally:
        if saved is None:
            sys.modules.pop("common", None)
        else:
            sys.modules["common"] = saved


def _names() -> list[str]:
    import ast

    tree = ast.parse((BENCH / "speed.py").read_text())
    raw = next(n.value for n in tree.body if isinstance(n, ast.Assign)
               and getattr(n.targets[0], "id", None) == "RAW")
    return [k.value for k in raw.keys]


def test_every_strategy_file_has_a_raw_loop():
    from label_efficient.strategies import STRATEGIES

    assert set(_names()) == set(STRATEGIES) - {"bcp_pretrain"}  # BCP's stage 1: the supervised passes, mixed


@pytest.mark.slow
@pytest.mark.parametrize("name", _names())
def test_raw_lightning_and_plain_loop_run(speed, name):
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    data, desc = speed.data_for(name, 7, 64, 2)
    assert len(data) == 7 and desc
    assert speed.RAW[name].__doc__  # recorded in the row as raw_passes
    for its in (speed.RAW[name](data, 7), speed.lightning_loop(name, data, 7), speed.strategy_loop(name, data, 7)):
        assert math.isfinite(its) and its > 0, (name, its)


def test_section_reads_old_rows_and_lists_raw_passes(speed):
    old = {f: rows for f, rows in speed.load_results().items() if not any("raw_passes" in r for r in rows)}
    assert old and speed.section(old).startswith("## Step time")  # rows made before raw_passes was recorded
    assert "Raw loops" not in speed.section(old)
    row = {**next(r for rows in old.values() for r in rows), "strategy": "cuts", "batch_desc": "2 unlabelled",
           "raw_passes": "the embedding pass"}
    text = speed.section({"speed_new.json": [row]})
    assert "| 2 unlabelled |" in text and "- `cuts`: the embedding pass" in text
