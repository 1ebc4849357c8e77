"""Copies of the student network: the frozen EMA teacher (mean teacher; every strategy with an EMA copy) and a
re-initialised twin (co-training strategies)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (every parameter ``requires_grad=False``) to be updated by :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def reinitialised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every layer re-initialised (``reset_parameters``, in module order): an independent
    second network of the same architecture (DeSCO's Net2, DSAIF's f₂)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return twin


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: bool = True, lerp: bool = False) -> None:
    """θ_T ← α·θ_T + (1−α)·θ_S, in place (Tarvainen & Valpola 2017, eq. in §2).

    With ``buffers`` the floating BN statistics are averaged too and integer buffers
    (``num_batches_tracked``) copied, as BCP's ACDC code does with the full ``state_dict``; without, the parameters
    only (SSL4MIS's ``update_ema_variables``). ``lerp``: the same average computed as ``θ_T.lerp_(θ_S, 1 − α)``
    instead of ``θ_T·α + θ_S·(1 − α)``; the two round differently in the last bit, so each strategy keeps the form
    its results were produced with (SDC-UDA's generators and AugPaint's denoiser: ``lerp``).
    """
    def average(t: torch.Tensor, s: torch.Tensor) -> None:
        if lerp:
            t.lerp_(s, 1.0 - decay)
        else:
            t.mul_(decay).add_(s, alpha=1.0 - decay)

    for t, s in zip(teacher.parameters(), student.parameters()):
        average(t, s.detach())
    if buffers:
        for t, s in zip(teacher.buffers(), student.buffers()):
            if t.dtype.is_floating_point:
                average(t, s)
            else:
                t.copy_(s)
