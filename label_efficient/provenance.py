"""Where and how a run ran: what ``metrics.json`` records under ``"provenance"`` and benchmark rows copy.

A number is only comparable with another one made at the same precision, on a comparable device, with the same
library versions and code. :func:`collect` gathers, for the process that writes the results:

* ``precision``: the Lightning precision the run trained at (``auto`` resolved; passed in by the runner, else
  resolved from the recipe's ``trainer`` on this host as the runner does; ``precision_from`` says which) and
  ``precision_requested``;
* ``device``: ``cpu`` or ``cuda``, the CUDA device name, capability and bf16 support when the model sits on a GPU;
* ``cpu``: model name, the feature flags that decide speed (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``,
  ``amx_tile``), torch's CPU capability, threads and cores;
* ``versions``: Python, torch (and its CUDA build), MONAI, Lightning, NumPy, label-efficient;
* ``git``: the commit of the package's checkout and whether its tracked files differ from it (``None`` outside a
  git checkout, e.g. an installed wheel);
* ``wall_seconds``, ``peak_rss_mb`` (this process, from ``getrusage``; data-loader workers not included),
  ``peak_cuda_allocated_mb`` / ``peak_cuda_reserved_mb`` (torch's peaks; ``None`` without CUDA).

The static parts (versions, git, CPU) are computed once per process. Nothing here initialises CUDA: a CPU run stays
a CPU run.
"""
from __future__ import annotations

import functools
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

#: the CPU feature flags that decide the speed (and ``auto`` precision) of a CPU run
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
#: distribution names of the libraries whose versions are recorded
LIBRARIES = {"torch": "torch", "monai": "monai", "lightning": "pytorch-lightning", "numpy": "numpy",
             "label_efficient": "label-efficient"}
PACKAGE_DIR = Path(__file__).resolve().parent
#: the fields that differ between two runs of the same recipe on the same host (a resumed run's included)
VOLATILE = ("wall_seconds", "peak_rss_mb", "peak_cuda_allocated_mb", "peak_cuda_reserved_mb")


def package_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), **{k: package_version(d) for k, d in LIBRARIES.items()}}
    out["torch"] = torch.__version__  # the build actually imported (e.g. 2.13.0+cpu)
    out["torch_cuda"] = torch.version.cuda
    return out


def _git(*args: str, cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def git_state(package_dir: Path = PACKAGE_DIR) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding the package's own source files; ``None`` when the
    package is not in one (an installed copy under a site-packages folder inside some other checkout is not)."""
    top = _git("rev-parse", "--show-toplevel", cwd=package_dir)
    if top is None:
        return None
    rel = os.path.relpath(package_dir, top)
    if rel.startswith("..") or _git("ls-files", "--error-unmatch", f"{rel}/__init__.py", cwd=Path(top)) is None:
        return None  # the folder is in a work tree but its files are not tracked there
    commit = _git("rev-parse", "HEAD", cwd=Path(top))
    if commit is None:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", rel, cwd=Path(top))
    return {"commit": commit, "dirty": bool(changed) if changed is not None else None}


def git_commit() -> str | None:
    state = git_state()
    return None if state is None else state["commit"]


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    import torch

    from .precision import cpu_flags

    flags = cpu_flags()
    return {"model": _cpu_model(), "flags": {f: f in flags for f in SPEED_FLAGS},
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "machine": platform.machine(), "system": platform.system()}


def device_info(device=None) -> dict:
    """The device the model ran on (``device``: a torch device or its string; ``None``: CPU)."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return {"type": device.type, "name": None}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"type": "cuda", "name": props.name, "index": index, "capability": f"{props.major}.{props.minor}",
            "memory_mb": round(props.total_memory / 2**20), "bf16": bool(torch.cuda.is_bf16_supported()),
            "count": torch.cuda.device_count()}


def peak_memory(device=None) -> dict:
    """Peak resident memory of this process (MB; data-loader workers not included: a forked child's peak counts
    the parent's pages it shares) and, on CUDA, torch's peak allocated and reserved memory since the process
    started (or since ``torch.cuda.reset_peak_memory_stats``)."""
    import torch

    kb = 1024 if sys.platform != "darwin" else 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 1),
           "peak_cuda_allocated_mb": None, "peak_cuda_reserved_mb": None}
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_initialized():
        out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
    return out


def collect(precision: str | None = None, *, requested: str | None = None, accelerator: str = "auto",
            device=None, t_start: float | None = None, wall_seconds: float | None = None) -> dict:
    """The provenance block of one run (see the module docstring).

    ``precision``: the precision the run trained at (``precision_from``: ``given``); ``None`` resolves
    ``requested`` (default ``auto``) for ``accelerator`` on this host, as the runner does. ``device``: where the model
    is (its CUDA name and peak CUDA memory are recorded when it is a GPU). ``wall_seconds`` or ``t_start``
    (``time.time()`` at the start) give the wall time."""
    from .precision import resolve_precision

    if precision is None:
        precision, source = resolve_precision(requested or "auto", accelerator), "resolved on this host"
    else:
        source = "given"
    if wall_seconds is None and t_start is not None:
        wall_seconds = time.time() - t_start
    git = git_state()
    return {"precision": precision, "precision_requested": requested, "precision_from": source,
            "device": device_info(device), "cpu": cpu_info(), "versions": versions(),
            "git_commit": None if git is None else git["commit"], "git_dirty": None if git is None else git["dirty"],
            "wall_seconds": None if wall_seconds is None else round(wall_seconds, 2), **peak_memory(device)}


def for_recipe(recipe, precision: str | None = None, device=None, t_start: float | None = None,
               wall_seconds: float | None = None) -> dict:
    """:func:`collect` for a parsed recipe (its requested precision and accelerator)."""
    tr = recipe.trainer
    return collect(precision, requested=tr.precision, accelerator=tr.accelerator, device=device, t_start=t_start,
                   wall_seconds=wall_seconds)

