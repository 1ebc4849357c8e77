"""One mechanism for strategies to reach inside any backbone: named features, the head, BN layers.

A *tap point* maps an alias to a module name (as in ``model.named_modules()``):

- ``bottleneck``: the *output* of that module is recorded (deepest encoder feature);
- ``head``: the final classifier; the *input* of that module is recorded as ``decoder``
  (the last decoder feature map) and the module itself can be cloned or replaced;
- ``encoder_1 … encoder_K`` (shallow → deep) and ``decoder_1 … decoder_K`` (deep → shallow): the blocks, for
  strategies that train or hand over parts of a network (contrastive pre-training: the encoder, the first l
  decoder blocks). A *part* is ``encoder``, ``decoder``, ``decoder:l`` (the first l blocks) or any alias.

Zoo models carry ``model.tap_points``; user models pass the names explicitly.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import did_you_mean


def resolve_tap_points(model: nn.Module, points: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tap points of ``model``: explicit ``points`` win over ``model.tap_points``; names are checked."""
    found = dict(getattr(model, "tap_points", {}) or {})
    found.update(points or {})
    names = dict(model.named_modules())
    for alias, name in found.items():
        if name not in names:
            raise KeyError(
                f"tap point '{alias}' names module '{name}', which {type(model).__name__} does not have."
                f"{did_you_mean(name, names)}"
            )
    return found


class FeatureTap:
    """Records named intermediate tensors of a model during its forward pass (forward hooks).

    >>> with FeatureTap(model) as tap:
    ...     logits = model(x)
    ...     z = tap["bottleneck"]; f = tap["decoder"]
    """

    def __init__(self, model: nn.Module, points: Mapping[str, str] | None = None, detach: bool = False):
        self.model = model
        self.points = resolve_tap_points(model, points)
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _store(self, alias: str, value):
        if isinstance(value, (tuple, list)):
            value = value[0]
        self.features[alias] = value.detach() if self.detach else value

    def __enter__(self) -> "FeatureTap":
        for alias, name in self.points.items():
            module = self.model.get_submodule(name)
            if alias == "head":
                self._handles.append(module.register_forward_pre_hook(lambda m, args: self._store("decoder", args)))
            else:
                self._handles.append(module.register_forward_hook(lambda m, a, out, al=alias: self._store(al, out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __getitem__(self, alias: str) -> torch.Tensor:
        if alias not in self.features:
            raise KeyError(f"no feature '{alias}' recorded; recorded: {sorted(self.features)} (tap points {self.points})")
        return self.features[alias]


def blocks(model: nn.Module, kind: str, points: Mapping[str, str] | None = None) -> list[str]:
    """Module names of the numbered tap points ``<kind>_1, <kind>_2, …`` in order; an error if there are none."""
    pts = resolve_tap_points(model, points)
    names = []
    while f"{kind}_{len(names) + 1}" in pts:
        names.append(pts[f"{kind}_{len(names) + 1}"])
    if not names:
        raise KeyError(f"{type(model).__name__} declares no '{kind}_1', '{kind}_2', … tap points (its blocks); use a "
                       f"zoo backbone that has them (e.g. basic_unet) or pass tap_points for your model")
    return names


def part_modules(model: nn.Module, parts: Sequence[str], points: Mapping[str, str] | None = None) -> list[str]:
    """Module names of ``parts``: ``encoder``, ``decoder``, ``decoder:l`` (its first l blocks) or a tap alias."""
    out = []
    for part in parts:
        kind, _, count = part.partition(":")
        if kind in ("encoder", "decoder"):
            names = blocks(model, kind, points)
            if count and not 1 <= int(count) <= len(names):
                raise ValueError(f"part '{part}': {type(model).__name__} has {len(names)} {kind} blocks")
            out += names[: int(count)] if count else names
        else:
            pts = resolve_tap_points(model, points)
            if part not in pts:
                raise KeyError(f"unknown part '{part}'.{did_you_mean(part, pts)} Parts: encoder, decoder, decoder:l, "
                               f"or a tap point {sorted(pts)}")
            out.append(pts[part])
    return out


def load_parts(model: nn.Module, state: Mapping[str, torch.Tensor], parts: Sequence[str],
               points: Mapping[str, str] | None = None) -> int:
    """Load the entries of ``state`` under the modules of ``parts`` (``encoder``, ``decoder:l``, …) into ``model``;
    everything else keeps its own weights. Returns the number of tensors loaded; a ``ValueError`` names the layers
    that do not fit (another backbone)."""
    prefixes = tuple(f"{name}." for name in part_modules(model, parts, points))
    kept = {k: v for k, v in state.items() if k.startswith(prefixes)}
    own = model.state_dict()
    bad = [k for k, v in kept.items() if k not in own or own[k].shape != v.shape]
    if not kept or bad:
        raise ValueError(f"parts {list(parts)} do not fit this network (layers {bad[:3] or 'none found'}); use the "
                         "same backbone and settings for both")
    model.load_state_dict(kept, strict=False)
    return len(kept)


class _Reached(Exception):
    """Raised by :func:`forward_until`'s hook to stop a forward pass once the wanted module has run."""


def forward_until(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The output of module ``name`` for input ``x``, without running the rest of ``model`` (e.g. the encoder alone:
    ``forward_until(net, x, blocks(net, "encoder")[-1])``). Gradients flow as in a full forward."""
    found: dict[str, torch.Tensor] = {}

    def stop(module, args, out):
        found["out"] = out[0] if isinstance(out, (tuple, list)) else out
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(stop)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "out" not in found:
        raise RuntimeError(f"module '{name}' did not run in {type(model).__name__}'s forward pass")
    return found["out"]


def out_channels(model: nn.Module, name: str) -> int:
    """Channels of the feature map module ``name`` outputs (its last convolution's output channels)."""
    convs = [m for m in model.get_submodule(name).modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"module '{name}' has no convolution to read its output channels from")
    return convs[-1].out_channels


def input_channels(model: nn.Module, hint: str = "", required: bool = True) -> int | None:
    """Image channels a backbone takes: the input channels of its first (not transposed) convolution, for strategies
    that build networks of their own on the same images (they are not told the channels). ``hint``: what the caller
    can set instead, added to the error."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed), None)
    if conv is None:
        if not required:
            return None
        raise ValueError(f"cannot read the input channels of backbone {type(model).__name__}: it has no convolution"
                         + (f"; {hint}" if hint else ""))
    return conv.in_channels


def input_dims(model: nn.Module) -> int | None:
    """Spatial dimensionality of a backbone's input, from its first convolution (None without one)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed), None)
    return None if conv is None else len(conv.kernel_size)


def get_head(model: nn.Module, points: Mapping[str, str] | None = None) -> nn.Module:
    """The output head of ``model`` (tap point ``head``)."""
    pts = resolve_tap_points(model, points)
    if "head" not in pts:
        raise KeyError(f"{type(model).__name__} declares no 'head' tap point; pass points={{'head': '<module name>'}}")
    return model.get_submodule(pts["head"])


def set_head(model: nn.Module, new_head: nn.Module, points: Mapping[str, str] | None = None) -> None:
    """Replace the output head of ``model`` in place (e.g. with a multi-head ensemble)."""
    model.set_submodule(resolve_tap_points(model, points)["head"], new_head)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All batch-norm layers of ``model`` as (name, module)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
