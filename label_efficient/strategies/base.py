"""The strategy contract.

A strategy owns its networks (student, teacher, extra heads), its losses and its per-step logic;
it never owns the training loop. Any loop drives it the same way::

    strategy.setup(total_steps)
    for step, batch in enumerate(loader):
        out = strategy.training_step(batch, step)      # StepOutput(loss, logs)
        optimizer.zero_grad(); out.loss.backward(); optimizer.step()
        strategy.after_optimizer_step(step)            # e.g. EMA teacher update
    logits = strategy.predict(x)                       # what evaluation calls

A batch is ``{"labeled": {"image", "label"}, "unlabeled": {"image"}}``; the unlabelled part never
carries a label (``check_batch`` enforces it).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import numpy as np

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..registry import Registry


class StrategyConfig(BaseModel):
    """Typed defaults of a strategy; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class StepOutput(NamedTuple):
    loss: torch.Tensor
    logs: dict[str, float]


class LabelLeakError(RuntimeError):
    """A label reached a strategy through a stream that must be unlabelled."""


class Strategy(nn.Module):
    """Base class; subclasses set ``Config`` and implement :meth:`training_step`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: streams the strategy consumes; the runner builds exactly these
    needs_labeled: ClassVar[bool] = True
    needs_unlabeled: ClassVar[bool] = False
    #: label-free (self-/unsupervised) stage: every train image arrives unlabelled, whatever the label budget, no
    #: mask is read, and the stage runs a fixed number of steps (no validation; its last checkpoint passes on)
    label_free: ClassVar[bool] = False
    #: source-free adaptation: receives a trained model and unlabelled target images only, never labels
    source_free: ClassVar[bool] = False

    def __init__(self, model: nn.Module, num_classes: int, config: StrategyConfig | Mapping[str, Any] | None = None,
                 **overrides: Any):
        super().__init__()
        if isinstance(config, StrategyConfig):
            config = config.model_dump()
        self.config = self.Config.model_validate({**dict(config or {}), **overrides})
        self.model = model
        self.num_classes = num_classes
        self.total_steps = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, total_steps: int) -> None:
        """Called once at the start of a stage with its number of optimizer steps."""
        self.total_steps = total_steps

    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step (EMA updates go here). Default: nothing to do."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called at the end of every epoch (a fixed number of steps). Default: nothing to do."""

    def image_transform(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """Optional CPU transform of each training image ``(C, *S) -> (C', *S)``, applied once per image by the
        data pipeline (cached, before augmentation), e.g. DSAIF's tree-filtered views. Default: none."""
        return None

    def stream_options(self) -> dict[str, dict[str, Any]]:
        """Per-stream sampling options for the data pipeline, e.g. ``{"unlabeled": {"partitions": 4,
        "volumes": 5}}`` (volume-partition sampling, see ``data.loaders.Stream``). Default: random batches."""
        return {}

    def handover_parts(self) -> list[str] | None:
        """The parts of the network this stage trained and passes to the next stage (``encoder``, ``decoder:l``…,
        see ``backbones.taps.part_modules``); the rest of the next stage's network keeps its own initialisation.
        Default ``None``: the whole network."""
        return None

    # -- parameters and inference ----------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """Parameters the optimizer updates (default: the student's), or torch parameter groups (dicts with
        ``params`` and per-group options such as ``betas``) when the paper sets options per network part."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch ``x`` (N, C, *spatial); called in eval mode."""
        return self.model(x)

    def export_model(self) -> nn.Module:
        """The plain network whose weights pass to the next stage."""
        return self.model

    def export_inference(self) -> nn.Module:
        """The module ``model.pt`` holds and ``label-efficient predict`` runs: by default :meth:`export_model`; a
        strategy whose :meth:`predict` is more than one network (an ensemble) returns a module doing the same, with a
        ``bundle_spec()`` saying how to rebuild it from the backbone (see ``backbones.rotated_heads``)."""
        return self.export_model()

    # -- checks ----------------------------------------------------------------------------------
    def check_batch(self, batch: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        if self.needs_labeled and "labeled" not in batch:
            raise KeyError(f"strategy '{self.name}' needs a 'labeled' stream; batch has {sorted(batch)}")
        if self.needs_unlabeled and "unlabeled" not in batch:
            raise KeyError(f"strategy '{self.name}' needs an 'unlabeled' stream; batch has {sorted(batch)}")
        if "label" in batch.get("unlabeled", {}):
            raise LabelLeakError("the unlabelled stream carries a 'label': labels must never reach unlabelled data")
        if self.source_free and "labeled" in batch:
            raise LabelLeakError(f"'{self.name}' is source-free: it takes unlabelled target images only, but the batch "
                                 "has a 'labeled' stream (source data or target labels)")


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str):
    """Class decorator: register a :class:`Strategy` subclass under ``name``."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        return STRATEGIES.register(name, cls)

    return add


def build_strategy(name: str, model: nn.Module, num_classes: int, config: Mapping[str, Any] | None = None) -> Strategy:
    return STRATEGIES.get(name)(model, num_classes, config)
