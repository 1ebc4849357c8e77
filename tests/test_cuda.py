"""On a CUDA GPU (``scripts/gpu_check.sh`` runs ``pytest -m cuda``; skipped without one): a recipe trains on the GPU
with ``precision: auto`` resolved from the device (bf16-mixed on a bf16 GPU) and records it, the device and its
peak memory in metrics.json; a BCP step under that precision on CUDA gives a finite loss and finite gradients."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe
from label_efficient.precision import resolve_precision
from label_efficient.recipe import parse_recipe
from label_efficient.runner import run_recipe

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _expected() -> str:
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def test_auto_precision_follows_the_gpu():
    assert resolve_precision("auto", "gpu") == resolve_precision("auto", "auto") == _expected()
    assert resolve_precision("auto", "cpu", flags=set()) == "32-true"  # CPU asked for on a GPU host
    if torch.cuda.get_device_capability(0) >= (8, 0):  # Ampere and newer (A100, H100, H200) run bf16
        assert _expected() == "bf16-mixed"


def test_supervised_recipe_on_the_gpu_records_precision_device_and_memory(image_folder, tmp_path):
    raw = tiny_recipe(image_folder, steps=7, val_every=3)
    raw["trainer"].update({"accelerator": "gpu", "precision": "auto"})
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    p = saved["provenance"]
    assert p["precision"] == _expected() and p["precision_requested"] == "auto"
    assert p["device"]["type"] == "cuda" and p["device"]["name"] == torch.cuda.get_device_name(0)
    assert p["versions"]["torch_cuda"] == torch.version.cuda and p["peak_cuda_allocated_mb"] > 0
    assert 0 <= m["mean_dice"] <= 1 and 0 <= saved["last_checkpoint"]["mean_dice"] <= 1


def test_bcp_step_on_cuda_gives_a_finite_loss():
    from label_efficient.backbones import build_backbone
    from label_efficient.strategies import build_strategy

    from test_strategies import disc_batch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    strategy = build_strategy("bcp", build_backbone("basic_unet", 2, 1, 3).to(dev), 3)
    strategy.setup(total_steps=2)
    strategy.train()
    on = lambda b: {k: v.to(dev) for k, v in b.items()}  # noqa: E731
    batch = {"labeled": on(disc_batch(4, 1)), "unlabeled": on(disc_batch(4, 2, False))}
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        out = strategy.training_step(batch, 0)
    assert out.loss.is_cuda and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in strategy.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
