"""Provenance and both checkpoints scored: every run's metrics.json says at which precision, on which device, with
which library versions and code it ran, how long and how much memory it took, and scores the last stage's
``last.ckpt`` beside the selected checkpoint; benchmark rows copy both and every table shows the precision."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from label_efficient import provenance
from label_efficient.precision import resolve_precision
from label_efficient.recipe import parse_recipe
from label_efficient.runner import run_recipe

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _common():
    """``benchmarks/common.py`` as a module (the benchmark scripts import it by name from their folder)."""
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _evaluate(recipe: Path, model: Path, out: Path) -> dict:
    from label_efficient.cli import main

    assert main(["evaluate", str(recipe), "--model", str(model), "--split", "test", "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import write_image_folder

    import yaml

    root = write_image_folder(tmp_path_factory.mktemp("data") / "discs")
    folder = tmp_path_factory.mktemp("run")
    raw = tiny_recipe(root, steps=7, val_every=3)  # 7 % 3: last.ckpt holds step 7, best.ckpt a validated step
    (folder / "r.yaml").write_text(yaml.safe_dump(raw))
    returned = run_recipe(parse_recipe(raw), folder / "run")
    return folder / "r.yaml", folder / "run", returned


def test_metrics_json_records_precision_device_versions_commit_time_and_memory(tiny_run):
    _, out, returned = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    assert list(m)[0] == "mean_dice" and returned["provenance"] == m["provenance"]
    p = m["provenance"]
    assert p["precision"] == resolve_precision("auto", "cpu") and p["precision_requested"] == "auto"
    assert p["precision_from"] == "given" and p["evaluated_on"] == "cpu"  # the runner passes what it trained at
    assert p["precision"] in ("bf16-mixed", "32-true")  # CPU: bf16 only with native support
    assert p["device"] == {"type": "cpu", "name": None}
    assert set(p["cpu"]["flags"]) == set(provenance.SPEED_FLAGS) and p["cpu"]["capability"]
    import monai
    import pytorch_lightning

    v = p["versions"]
    assert v["torch"] == torch.__version__ and v["monai"] == monai.__version__
    assert v["lightning"] == pytorch_lightning.__version__ and v["label_efficient"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(provenance.__file__).parent, capture_output=True,
                          text=True)
    if head.returncode == 0:  # the tests run from a checkout
        assert p["git_commit"] == head.stdout.strip() and isinstance(p["git_dirty"], bool)
    assert p["wall_seconds"] >= m["wall_seconds"] > 0  # the provenance's wall time includes the test evaluation
    assert p["peak_rss_mb"] > 50 and p["peak_cuda_allocated_mb"] is None


def test_last_and_selected_checkpoints_are_both_scored(tiny_run, tmp_path):
    recipe, out, _ = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    last = m["last_checkpoint"]
    assert last["checkpoint"] == "last.ckpt" and last["selected"] == "best.ckpt" and not last["same_as_selected"]
    assert torch.load(out / "stage0_supervised" / "last.ckpt", weights_only=True)["global_step"] == 7
    # the same evaluation as `label-efficient evaluate` of each checkpoint; mean_dice stays the selected one's, and
    # model.pt (written after the last checkpoint was scored) holds the selected weights again
    best_ev = _evaluate(recipe, out / "stage0_supervised" / "best.ckpt", tmp_path / "best.json")
    bundle_ev = _evaluate(recipe, out / "model.pt", tmp_path / "bundle.json")
    last_ev = _evaluate(recipe, out / "stage0_supervised" / "last.ckpt", tmp_path / "last.json")
    assert m["mean_dice"] == pytest.approx(best_ev["mean_dice"], abs=1e-6) == bundle_ev["mean_dice"]
    assert last["mean_dice"] == pytest.approx(last_ev["mean_dice"], abs=1e-6)
    assert last["mean_hd95"] == pytest.approx(last_ev["mean_hd95"], abs=1e-6, nan_ok=True)
    assert set(last["per_class_dice"]) == {"class1", "class2"}


def test_a_stage_selecting_its_last_step_reports_the_same_scores_twice(image_folder, tmp_path):
    raw = tiny_recipe(image_folder, steps=4, val_every=2, select="last")
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    last = m["last_checkpoint"]
    assert last["same_as_selected"] and last["selected"] == "last.ckpt"
    assert last["mean_dice"] == m["mean_dice"] and last["mean_hd95"] == m["mean_hd95"]


def test_a_label_free_run_records_provenance_too(image_folder, tmp_path):
    raw = tiny_recipe(image_folder, strategy="cuts", steps=2, val_every=2, batch_size={"unlabeled": 2})
    raw["backbone"] = {"name": "cuts_cnn", "kwargs": {"features": [4, 8]}}
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    assert m["evaluated"] is False and "last_checkpoint" not in m
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["provenance"]["precision"] == resolve_precision("auto", "cpu")
    assert saved["provenance"]["versions"]["torch"] == torch.__version__


def test_precision_passed_in_wins_and_auto_resolves_for_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    given = provenance.collect("16-mixed", requested="auto")
    assert given["precision"] == "16-mixed" and given["precision_from"] == "given"
    resolved = provenance.collect(None, requested="32-true", accelerator="cpu", wall_seconds=1.234)
    assert resolved["precision"] == "32-true" and resolved["precision_from"] == "resolved on this host"
    assert resolved["wall_seconds"] == 1.23


def test_git_commit_only_for_a_tracked_checkout_of_the_package(tmp_path):
    pkg = tmp_path / "plain" / "label_efficient"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    assert provenance.git_state(pkg) is None  # not in a git checkout
    repo = tmp_path / "repo"
    inner = repo / ".venv" / "site-packages" / "label_efficient"
    inner.mkdir(parents=True)
    (inner / "__init__.py").write_text("")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, check=True)  # noqa: E731
    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git")
    (repo / "other.txt").write_text("x")
    git("add", "other.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    assert provenance.git_state(inner) is None  # an installed copy inside some other checkout is no commit of ours
    tracked = repo / "label_efficient"
    tracked.mkdir()
    (tracked / "__init__.py").write_text("")
    git("add", "label_efficient/__init__.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "pkg")
    state = provenance.git_state(tracked)
    assert state["commit"] == git("rev-parse", "HEAD").stdout.strip() and state["dirty"] is False
    (tracked / "__init__.py").write_text("# edited")
    provenance.git_state.cache_clear()
    assert provenance.git_state(tracked)["dirty"] is True


# --- benchmark rows -----------------------------------------------------------------------------------------------

def test_rows_copy_provenance_and_both_scores(tiny_run):
    common = _common()
    _, out, _ = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    row = common.summarise(m)
    assert row["mean_dice"] == round(m["mean_dice"], 4)
    assert row["last_mean_dice"] == round(m["last_checkpoint"]["mean_dice"], 4)
    assert row["last_hd95"] == round(m["last_checkpoint"]["mean_hd95"], 2)
    assert row["selected_checkpoint"] == "best.ckpt"
    prov = common.row_provenance(m)
    assert prov["precision"] == m["provenance"]["precision"] and prov["torch"] == torch.__version__
    assert prov["device"] == "cpu" and prov["git_commit"] == m["provenance"]["git_commit"]
    old = {k: v for k, v in m.items() if k not in ("provenance", "last_checkpoint")}  # a run before this change
    assert common.row_provenance(old) == {} and "last_mean_dice" not in common.summarise(old)


def test_every_result_table_shows_the_precision_and_n_r_for_rows_without_one():
    common = _common()
    row = {"strategy": "supervised", "labeled": "labeled_7", "mean_dice": 0.7, "hd95": 3.0, "steps": 10,
           "train_seconds": 5.0, "peak_rss_mb": 100.0, "per_class_dice": {"RV": 0.7}}
    old_only = common.result_table([row])
    assert "| precision |" in old_only.splitlines()[0] and old_only.splitlines()[2].endswith("| n/r |")
    mixed = common.result_table([row, {**row, "seed": 1338, "precision": "bf16-mixed"}])
    assert mixed.splitlines()[2].endswith("| n/r |") and mixed.splitlines()[3].endswith("| bf16-mixed |")
