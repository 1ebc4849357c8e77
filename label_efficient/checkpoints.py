"""Checkpoint and bundle I/O: stage checkpoints (Lightning), ``model.pt`` bundles, weight hand-over between stages.

Every file is written atomically (a kill never leaves half a file under its final name) and read weights-only
through :func:`~label_efficient.utils.torch_load`; weights saved for another backbone, class count or
dimensionality are refused with a message naming both.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .backbones import build_backbone, load_parts
from .backbones.rotated_heads import rebuild as rebuild_inference
from .errors import CheckpointError
from .ood import OODDetector
from .recipe import Recipe
from .strategies import STRATEGIES
from .utils import atomic_torch_save, torch_load

if TYPE_CHECKING:
    from .context import DataContext

log = logging.getLogger("label_efficient")
BUNDLE_FORMAT = "label_efficient.model/1"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


class CheckpointMismatchError(CheckpointError):
    """Weights saved for another backbone, class count or dimensionality."""


def check_meta(saved: dict, expected: dict, what: str) -> None:
    """Refuse weights saved for another backbone, class count or dimensionality, with a clear message."""
    for key in ("backbone", "spatial_dims", "in_channels", "num_classes"):
        if key in saved and key in expected and saved[key] != expected[key]:
            raise CheckpointMismatchError(
                f"{what} was saved with {key}={saved[key]!r} but this run has {key}={expected[key]!r}"
            )


def load_state(module: torch.nn.Module, state: dict, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise CheckpointMismatchError(f"{what} does not fit this network: {' '.join(first)}") from None


def strategy_keys(state_dict: dict) -> dict:
    """The strategy's own entries of a StrategyModule state dict, without their ``strategy.`` prefix."""
    return {k[len("strategy."):]: v for k, v in state_dict.items() if k.startswith("strategy.")}


def strategy_state(ckpt_path: Path) -> dict:
    return strategy_keys(torch_load(ckpt_path)["state_dict"])


def _load_parts(model: torch.nn.Module, state: dict, parts: list[str], stage: str) -> None:
    """Load only ``parts`` of ``state`` (a pre-training stage's encoder / decoder blocks); the rest keeps its init.
    No parts (a generating stage that trained its own network): nothing passes on."""
    if not parts:
        log.info("stage '%s' keeps its own initialisation: the previous stage hands over no weights", stage)
        return
    try:
        n = load_parts(model, state, parts)
    except ValueError as e:
        raise CheckpointMismatchError(f"stage '{stage}': the weights handed over: {e}") from e
    log.info("stage '%s' starts from parts %s of the previous stage (%d tensors); the rest keeps its initialisation",
             stage, parts, n)


def init_weights(model: torch.nn.Module, init: str, previous: dict | None, meta: dict, stage: str) -> None:
    if init == "none" or (init.startswith("previous") and previous is None):
        return
    if init in ("previous_best", "previous_last"):
        state = previous["best" if init == "previous_best" else "last"]
        if previous.get("parts") is not None:
            return _load_parts(model, state, previous["parts"], stage)
    else:
        blob = torch_load(init, f"stage '{stage}': init checkpoint")
        path = Path(init)
        check_meta(blob.get("label_efficient", blob.get("meta", {})), meta, str(path))
        state = blob["state_dict"]
        if blob.get("parts") is not None:  # a pre-training bundle: only its trained parts pass on
            return _load_parts(model, state, blob["parts"], stage)
        if blob.get("wrapper"):  # an ensemble's model.pt: start from its plain network
            wrapped = rebuild_inference(copy.deepcopy(model), blob["wrapper"])
            load_state(wrapped, state, str(path))
            state = wrapped.plain_network().state_dict()
        if any(k.startswith("strategy.model.") for k in state):  # a Lightning checkpoint
            state = {k[len("strategy.model."):]: v for k, v in state.items() if k.startswith("strategy.model.")}
    load_state(model, state, f"stage '{stage}' init '{init}'")


def load_for_evaluation(recipe: Recipe, ctx: "DataContext", path: str | Path) -> torch.nn.Module:
    """A ``model.pt`` bundle, or the test-time network of a stage checkpoint (``last.ckpt``/``best.ckpt``): that
    stage's strategy rebuilt from ``recipe`` and restored, then ``export_inference()`` (e.g. UPL-SFDA's head
    ensemble), in eval mode."""
    if str(path).endswith(".ckpt"):
        blob = torch_load(path, "checkpoint")
        saved = blob.get("label_efficient", {})
        check_meta(saved, {"backbone": recipe.backbone.name, **ctx.meta}, str(path))
        stages = {st.name or st.strategy: st for st in recipe.stages}
        if saved.get("stage") not in stages:
            raise CheckpointError(f"{path} is a checkpoint of stage '{saved.get('stage')}', which recipe '{recipe.name}' "
                             f"does not have (its stages: {list(stages)}): pass the recipe that wrote it")
        stage = stages[saved["stage"]]  # the stage's strategy, rebuilt: its test-time network (e.g. an ensemble)
        strategy = STRATEGIES.get(stage.strategy)(build_model(recipe, ctx.spec), ctx.spec.num_classes, stage.config,
                                                  in_channels=ctx.spec.in_channels, spatial_dims=ctx.spec.spatial_dims)
        load_state(strategy, strategy_keys(blob["state_dict"]), str(path))
        return strategy.export_inference().eval()
    return load_bundle(path)[0]


def save_bundle(path: Path, model: torch.nn.Module, recipe: Recipe, ctx: "DataContext",
                detector: OODDetector | None = None, parts: list[str] | None = None) -> None:
    """Self-contained inference bundle: backbone spec, preprocessing, weights and the OOD detector
    (loadable weights-only); ``parts``: what a stage initialised from it takes (None: the whole network)."""
    atomic_torch_save({
        "parts": parts,
        "ood": detector.state_dict() if detector is not None else None,
        "format": BUNDLE_FORMAT,
        "meta": {"backbone": recipe.backbone.name, **ctx.meta},
        "backbone": {"name": recipe.backbone.name, "kwargs": recipe.backbone.kwargs,
                     "tap_points": recipe.backbone.tap_points},
        "data": {"image_size": ctx.cfg.image_size, "patch_size": ctx.cfg.patch_size, "intensity": ctx.spec.intensity,
                 "format": ctx.spec.format, "class_names": ctx.spec.class_names, "spacing": ctx.cfg.spacing,
                 "orientation": ctx.store.orientation, "normalize": ctx.cfg.normalize,
                 "intensity_stats": ctx.store.intensity_stats, "sw_overlap": recipe.evaluation.sw_overlap},
        "wrapper": model.bundle_spec() if hasattr(model, "bundle_spec") else None,
        "state_dict": model.state_dict(),
    }, path)


def load_bundle(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load ``model.pt`` (weights only) and rebuild its network (or the strategy's inference ensemble)."""
    blob = torch_load(path, "model")
    if blob.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path} is not a label-efficient model bundle (format {blob.get('format')!r}); pass "
                              "the model.pt of a run")
    m, b = blob["meta"], blob["backbone"]
    model = build_backbone(b["name"], m["spatial_dims"], m["in_channels"], m["num_classes"],
                           tap_points=b["tap_points"], **b["kwargs"])
    model = rebuild_inference(model, blob.get("wrapper"))
    load_state(model, blob["state_dict"], str(path))
    return model.eval(), blob


def build_model(recipe: Recipe, spec) -> torch.nn.Module:
    """The recipe's backbone for a dataset (channels-last in 2D when the trainer asks for it)."""
    from .utils import use_channels_last

    b = recipe.backbone
    model = build_backbone(b.name, spec.spatial_dims, spec.in_channels, spec.num_classes, tap_points=b.tap_points,
                           **b.kwargs)
    return use_channels_last(model) if recipe.trainer.channels_last and spec.spatial_dims == 2 else model
