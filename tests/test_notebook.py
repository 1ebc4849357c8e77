"""The notebooks are executed on tiny settings so they never rot."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from conftest import requires_shared

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, monkeypatch, **env: str) -> str:
    """Execute ``notebooks/<name>`` with ``env`` set (one thread, no display); the text of its outputs."""
    for key, value in {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **env}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@requires_shared("acdc")
def test_quickstart_notebook_runs(monkeypatch):
    outputs = run_notebook("quickstart.ipynb", monkeypatch, QUICKSTART_STEPS="8", QUICKSTART_SIZE="64",
                           QUICKSTART_TEST_VOLUMES="2")
    assert "136 labelled slices from 7 patients" in outputs
    assert "mean Dice" in outputs


@requires_shared("acdc")
def test_pretrain_then_finetune_notebook_runs(monkeypatch):
    outputs = run_notebook("pretrain_then_finetune.ipynb", monkeypatch, PRETRAIN_STEPS="3", PRETRAIN_SIZE="48",
                           PRETRAIN_TEST_VOLUMES="2")
    assert "hands over: ['encoder']" in outputs and "hands over: ['encoder', 'decoder:3']" in outputs
    assert "pretrained: mean Dice" in outputs and "random: mean Dice" in outputs
    assert "CUTS:" in outputs and "oracle cluster" in outputs


@requires_shared("acdc")
def test_domain_adaptation_notebook_runs(monkeypatch):
    outputs = run_notebook("domain_adaptation.ipynb", monkeypatch, DA_SOURCE_STEPS="6", DA_ADAPT_STEPS="3",
                           DA_SIZE="32", DA_TEST_VOLUMES="1")
    assert "labelled source slices" in outputs and "on the target scanner" in outputs
    assert "OOD warning on target test slices" in outputs and "BN-SFDA: mean Dice" in outputs
    assert "flip consistency on unlabelled target val images: source model 0." in outputs
