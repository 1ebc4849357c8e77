"""Exponential moving average of a network (mean teacher)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` to be updated by :func:`ema_update`."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: bool = True) -> None:
    """θ_T ← α·θ_T + (1−α)·θ_S, in place (Tarvainen & Valpola 2017, eq. in §2).

    With ``buffers`` the floating BN statistics are averaged too and integer buffers
    (``num_batches_tracked``) copied, as BCP's ACDC code does with the full ``state_dict``.
    """
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    if buffers:
        for t, s in zip(teacher.buffers(), student.buffers()):
            if t.dtype.is_floating_point:
                t.mul_(decay).add_(s, alpha=1.0 - decay)
            else:
                t.copy_(s)
