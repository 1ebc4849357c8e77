"""trainer.precision: auto picks bf16 only where the device runs it natively; an explicit setting wins."""
import pytest
import torch

from label_efficient import precision as P
from label_efficient.recipe import parse_recipe

BASE = {"data": {"dataset": "acdc", "image_size": [64, 64]}, "stages": [{"strategy": "supervised", "steps": 10}]}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_with_and_without_native_bf16(no_cuda):
    assert P.resolve_precision("auto", "auto", flags={"avx2", "fma"}) == "32-true"  # e.g. AMD EPYC (AVX2)
    assert P.resolve_precision("auto", "auto", flags={"avx512f", "avx512_bf16"}) == "bf16-mixed"
    assert P.resolve_precision("auto", "cpu", flags={"amx_bf16", "amx_tile"}) == "bf16-mixed"
    assert P.resolve_precision("auto", "mps", flags={"avx512_bf16"}) == "32-true"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_with_and_without_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert P.resolve_precision("auto", "auto", flags=set()) == expected
    assert P.resolve_precision("auto", "gpu", flags=set()) == expected
    assert P.resolve_precision("auto", "cpu", flags=set()) == "32-true"  # CPU asked for on a GPU host


def test_explicit_precision_wins(no_cuda):
    assert P.resolve_precision("bf16-mixed", "auto", flags=set()) == "bf16-mixed"
    assert P.resolve_precision("32-true", "auto", flags={"avx512_bf16"}) == "32-true"
    assert parse_recipe(BASE).trainer.precision == "auto"
    assert parse_recipe(BASE, ["trainer.precision=bf16-mixed"]).trainer.precision == "bf16-mixed"


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n\n")
    assert P.cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}
    assert not P.cpu_has_native_bf16(P.cpu_flags(info))
    assert P.cpu_flags(tmp_path / "missing") == set()


def test_no_shipped_recipe_hard_codes_precision():
    from pathlib import Path

    from label_efficient.recipe import load_recipe

    for path in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"):
        assert load_recipe(path).trainer.precision == "auto", path


def test_doctor_prints_device_precision_and_speeds(capsys, no_cuda):
    from label_efficient.cli import main

    assert main(["doctor", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and "precision: auto -> " in out and "fp32:" in out and "bf16 autocast:" in out
