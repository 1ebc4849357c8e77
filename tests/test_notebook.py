"""The quickstart notebook is executed on tiny settings so it never rots."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import requires_shared

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@requires_shared("acdc")
def test_quickstart_notebook_runs(monkeypatch):
    monkeypatch.setenv("QUICKSTART_STEPS", "8")
    monkeypatch.setenv("QUICKSTART_SIZE", "64")
    monkeypatch.setenv("QUICKSTART_TEST_VOLUMES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "136 labelled slices from 7 patients" in outputs
    assert "mean Dice" in outputs


@requires_shared("acdc")
def test_pretrain_then_finetune_notebook_runs(monkeypatch):
    monkeypatch.setenv("PRETRAIN_STEPS", "3")
    monkeypatch.setenv("PRETRAIN_SIZE", "48")
    monkeypatch.setenv("PRETRAIN_TEST_VOLUMES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = NOTEBOOK.parent / "pretrain_then_finetune.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "hands over: ['encoder']" in outputs and "hands over: ['encoder', 'decoder:3']" in outputs
    assert "pretrained: mean Dice" in outputs and "random: mean Dice" in outputs
    assert "CUTS:" in outputs and "oracle cluster" in outputs
