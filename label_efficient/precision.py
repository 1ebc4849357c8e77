"""Numeric precision chosen from what the device runs natively (``trainer.precision: auto``).

bf16 autocast is +25–45 % on a CPU with AVX-512 BF16 or AMX, but 13–17× *slower* than fp32 on a CPU without
them (measured on an AMD EPYC with AVX2: U-Net step 1.6 s vs 0.12 s), so no recipe should hard-code it:

========================================  ==============
device                                    ``auto`` gives
========================================  ==============
CUDA GPU with bf16 (Ampere and newer)     ``bf16-mixed``
older CUDA GPU                            ``16-mixed``
CPU with ``avx512_bf16`` or ``amx_bf16``  ``bf16-mixed``
any other CPU (or MPS)                    ``32-true``
========================================  ==============
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("label_efficient")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where there is no ``/proc/cpuinfo``, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    return any(f in (cpu_flags() if flags is None else flags) for f in CPU_BF16_FLAGS)


def uses_cuda(accelerator: str = "auto") -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str = "auto", accelerator: str = "auto", flags: set[str] | None = None) -> str:
    """A Lightning precision string: an explicit ``precision`` is kept; ``auto`` follows the table above."""
    if precision != "auto":
        return precision
    if uses_cuda(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("auto", "cpu") and cpu_has_native_bf16(flags):
        return "bf16-mixed"
    return "32-true"


def describe_device(accelerator: str = "auto") -> str:
    if uses_cuda(accelerator):
        return f"cuda ({torch.cuda.get_device_name(0)})"
    cap = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"cpu ({cap}, {bf16}, {torch.get_num_threads()} threads)"


def log_choice(precision: str, accelerator: str = "auto") -> str:
    """Resolve ``precision`` and log the choice once, with the device it was made for."""
    chosen = resolve_precision(precision, accelerator)
    how = "chosen automatically" if precision == "auto" else "set by the recipe"
    log.info("precision %s (%s) on %s", chosen, how, describe_device(accelerator))
    return chosen


def step_rate(dtype: torch.dtype | None, steps: int = 5, size: int = 96, batch: int = 4, device: str = "cpu") -> float:
    """Steps/s of a small U-Net forward + backward + AdamW step, under autocast to ``dtype`` (``None``: fp32)."""
    from .backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone("unet", 2, 1, 4).to(device)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 4, (batch, size, size), device=device)

    def one():
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    one()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t)
