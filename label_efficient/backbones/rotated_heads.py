"""K rotated copies of a network's output head on one shared body (UPL-SFDA's test-time-augmented ensemble,
Wu et al., IEEE TMI 2023, §II-B): head k sees the input turned by r_k·90° and its softmax is turned back.

:class:`RotatedHeads` is a plain ``nn.Module`` so the ensemble a strategy trains is also what ``model.pt`` holds and
``label-efficient predict``/``evaluate`` run; it keeps the body's tap points (prefixed ``body.``) so the feature tap,
and with it the OOD detector, works on it as on the plain network.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..transforms.rotate import rotate_quarter, rotation_dims
from ..utils import mean_probs_as_logits
from .taps import get_head, resolve_tap_points, set_head


def rotated_head_probs(body: nn.Module, heads: Sequence[nn.Module], rotations: Sequence[int],
                       x: torch.Tensor) -> list[torch.Tensor]:
    """Softmax of every head on its rotated input, rotated back into the input frame (float32)."""
    dims = rotation_dims(tuple(x.shape[2:]))
    square = x.shape[dims[0]] == x.shape[dims[1]]
    out = []
    for head, r in zip(heads, rotations):
        r = r if square else (r % 2) * 2  # only half turns keep a non-square shape
        p = head(body(rotate_quarter(x, r, dims))).float().softmax(1)
        out.append(rotate_quarter(p, (-r) % 4, dims))
    return out


def ensemble_logits(body: nn.Module, heads: Sequence[nn.Module], rotations: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """Log of the heads' mean softmax: logits whose softmax and argmax are the ensemble's."""
    return mean_probs_as_logits(rotated_head_probs(body, heads, rotations, x))


def default_rotations(num_heads: int) -> list[int]:
    """r_k = (k + 1) mod 4: 90°, 180°, 270°, 0°, 90°, …"""
    return [(k + 1) % 4 for k in range(num_heads)]


def split_heads(model: nn.Module, num_heads: int) -> tuple[nn.Module, nn.ModuleList]:
    """Clone ``model``'s head ``num_heads`` times and replace it in place by the identity; returns (body, heads)."""
    head = get_head(model)
    heads = nn.ModuleList(copy.deepcopy(head) for _ in range(num_heads))
    set_head(model, nn.Identity())  # the body now returns the decoder features the heads share
    return model, heads


class RotatedHeads(nn.Module):
    """``body`` (a network whose head is the identity) with K ``heads`` at ``rotations``; ``forward`` returns the log
    of the heads' mean softmax, so softmax and argmax of its output are the ensemble's."""

    def __init__(self, body: nn.Module, heads: nn.ModuleList, rotations: Sequence[int]):
        super().__init__()
        if len(heads) != len(rotations):
            raise ValueError(f"{len(heads)} heads but {len(rotations)} rotations")
        self.body, self.heads, self.rotations = body, heads, [int(r) for r in rotations]
        self.tap_points = {a: f"body.{n}" for a, n in resolve_tap_points(body).items() if a != "head"}
        self.stride = getattr(body, "stride", 1)

    @classmethod
    def from_network(cls, model: nn.Module, rotations: Sequence[int]) -> "RotatedHeads":
        """Wrap a plain network, cloning its head once per rotation (used to rebuild a saved ensemble)."""
        return cls(*split_heads(model, len(rotations)), rotations)

    def plain_network(self) -> nn.Module:
        """A copy of the body with the unrotated head (r = 0) back in place: one ordinary network."""
        model = copy.deepcopy(self.body)
        set_head(model, copy.deepcopy(self.heads[self.rotations.index(0) if 0 in self.rotations else 0]))
        return model

    def bundle_spec(self) -> dict:
        """What :func:`label_efficient.runner.load_bundle` needs besides the weights to rebuild this module."""
        return {"name": "rotated_heads", "rotations": self.rotations}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(self.body, self.heads, self.rotations, x)


def rebuild(model: nn.Module, spec: dict | None) -> nn.Module:
    """The inference module a ``model.pt`` describes: ``model`` itself, or ``model`` wrapped as its ``bundle_spec``
    says (weights are loaded afterwards)."""
    if spec is None:
        return model
    if spec.get("name") != "rotated_heads":
        raise ValueError(f"unknown inference wrapper {spec.get('name')!r} in a model bundle")
    return RotatedHeads.from_network(model, spec["rotations"])
