"""benchmarks/: RESULTS.md is rebuilt from the stored rows alone (fast, deterministic, no torch, no dataset), the
committed RESULTS.md is what the rows give, and the scripts import only ``benchmarks/common.py`` (never each other)
and never edit ``sys.path``. Parsed with ``ast``: nothing here runs a benchmark."""
from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))
NAMES = {p.stem for p in SCRIPTS}
REPORT = BENCH / "report.py"


def _report(*args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``benchmarks/report.py ARGS`` in a fresh interpreter; ``block``: modules made unimportable there."""
    if not block:
        return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True, timeout=120)
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({list(block)!r})); sys.path.insert(0, {str(BENCH)!r}); "
            f"sys.argv = [{str(REPORT)!r}, *{list(args)!r}]; runpy.run_path({str(REPORT)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module, level) of every import statement, and of ``__import__`` / ``import_module`` calls with a
    literal name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append(((node.module or "").split(".")[0], node.level))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                out.append((node.args[0].value.split(".")[0], 0))
    return out


def test_report_rebuilds_from_the_rows_in_seconds_and_deterministically(tmp_path):
    t0 = time.perf_counter()
    first = _report("--out", str(tmp_path / "a.md"))
    elapsed = time.perf_counter() - t0
    assert first.returncode == 0, first.stderr
    second = _report("--out", str(tmp_path / "b.md"))
    assert second.returncode == 0, second.stderr
    a, b = (tmp_path / "a.md").read_text(), (tmp_path / "b.md").read_text()
    assert a == b
    assert a.startswith("# Benchmarks\n") and a.count("\n## ") >= 10
    assert elapsed < 15, f"report took {elapsed:.1f} s"


def test_report_needs_neither_torch_nor_the_package(tmp_path):
    """Blocking torch, Lightning, MONAI and label_efficient (datasets, training) changes nothing."""
    blocked = _report("--out", str(tmp_path / "blocked.md"),
                      block=("torch", "pytorch_lightning", "monai", "label_efficient"))
    assert blocked.returncode == 0, blocked.stderr
    plain = _report("--out", str(tmp_path / "plain.md"))
    assert plain.returncode == 0, plain.stderr
    assert (tmp_path / "blocked.md").read_text() == (tmp_path / "plain.md").read_text()


def test_committed_results_md_is_what_the_rows_give():
    check = _report("--check")
    assert check.returncode == 0, check.stderr or check.stdout


def test_no_benchmark_script_imports_another_or_edits_sys_path():
    problems = []
    for path in SCRIPTS:
        tree = ast.parse(path.read_text(), str(path))
        # report.py assembles the scripts' sections, so it alone imports them; every other file only ``common``
        forbidden = {"report"} if path.stem == "report" else NAMES - {"common"}
        for module, level in _imports(tree):
            if level:
                problems.append(f"{path.name}: relative import")
            elif module in forbidden or module == "benchmarks":
                problems.append(f"{path.name}: imports {module}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                problems.append(f"{path.name}:{node.lineno}: sys.path")
            if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
                problems.append(f"{path.name}:{node.lineno}: from sys import path")
    assert not problems, "\n".join(problems)


def test_every_script_with_a_section_is_assembled():
    """A script that writes a RESULTS.md section (``section`` and ``load_results``) is one of report.py's SECTIONS,
    imported by name, and report.py itself is no section."""
    imported = {m for m, _ in _imports(ast.parse(REPORT.read_text()))}
    with_section = set()
    for path in SCRIPTS:
        defs = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        if {"section", "load_results"} <= defs:
            with_section.add(path.stem)
    assert with_section, "no script defines section() and load_results()"
    assert "report" not in with_section and "common" not in with_section
    assert with_section <= imported, f"not assembled by report.py: {sorted(with_section - imported)}"


def test_official_code_edits_apply_once_or_refuse(tmp_path, monkeypatch):
    """common.apply_edits (the parity scripts' edits of an official code): each edit must match exactly once in the
    file as it stands and in the shipped text; the CPU stand-ins module is written beside the code."""
    import pytest

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    (tmp_path / "train.py").write_text("x = 1\nimport torch\nx = 1\n")
    once = common.edit_list([("train.py", "import torch\n", "import torch\ntorch.set_num_threads(1)\n", "one thread")])
    common.apply_edits(tmp_path, once, {"train.py": "x = 1\nimport torch\nx = 1\n"})
    assert (tmp_path / "train.py").read_text() == "x = 1\nimport torch\ntorch.set_num_threads(1)\nx = 1\n"
    standins = tmp_path / "_cpu_standins.py"
    namespace: dict = {}
    exec(standins.read_text(), namespace)
    assert namespace["transforms"].Compose([lambda s: s + 1, lambda s: 2 * s])(1) == 4
    with pytest.raises(SystemExit, match="matches 2 times"):
        common.apply_edits(tmp_path, common.edit_list([("train.py", "x = 1\n", "x = 2\n", "")]))
    with pytest.raises(SystemExit, match="shipped file: 0"):
        common.apply_edits(tmp_path, common.edit_list([("train.py", "set_num_threads", "set_num_threads", "")]),
                           {"train.py": "x = 1\n"})
