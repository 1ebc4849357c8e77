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
carries a label (``check_batch`` enforces it). With a sparse annotation the labelled part also carries
``label_mask`` (1 = annotated voxel), and a strategy's :meth:`Strategy.target_transform` maps by name.

A strategy with several networks updated in turn (GAN generator/discriminator, co-trained networks) names its
optimizers in ``optimizers`` and steps them itself, in order, with :meth:`Strategy.optimizer_step`; the loop only
builds them (one per name, ``trainable_parameters()`` returns ``{name: params}``) and binds them::

    strategy.bind_optimizers({name: torch.optim.SGD(p, lr=0.01) for name, p in strategy.trainable_parameters().items()})
    for step, batch in enumerate(loader):
        out = strategy.training_step(batch, step)      # steps every optimizer once, in order
        strategy.after_optimizer_step(step)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple

import numpy as np

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import UserError
from ..backbones.taps import input_channels, input_dims
from ..registry import Registry
from .requirements import LabelLeakError, Requirements, check_batch  # noqa: F401  (LabelLeakError re-exported)


class StrategyConfig(BaseModel):
    """Typed defaults of a strategy; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class StepOutput(NamedTuple):
    loss: torch.Tensor
    logs: dict[str, float]


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Strategy(nn.Module):
    """Base class; subclasses set ``Config`` and implement :meth:`training_step`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: what the strategy needs from the loop (streams, labels, role, …), read by ``label_efficient.planning``
    requires: ClassVar[Requirements] = Requirements()

    def __init_subclass__(cls, **kwargs):
        """Every ``training_step`` checks its batch first (:func:`~.requirements.check_batch`), in any loop."""
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_checks_batch", False):
            @functools.wraps(step)
            def checked(self, batch, *args, **kw):
                check_batch(self.name, self.requires, batch)
                return step(self, batch, *args, **kw)

            checked._checks_batch = True
            cls.training_step = checked

    def __init__(self, model: nn.Module, num_classes: int, config: StrategyConfig | Mapping[str, Any] | None = None,
                 *, in_channels: int | None = None, spatial_dims: int | None = None, **overrides: Any):
        """``in_channels`` / ``spatial_dims``: the images' channels and dimensionality (the runner passes the
        dataset's; when not given they are read from the backbone's first convolution)."""
        super().__init__()
        if isinstance(config, StrategyConfig):
            config = config.model_dump()
        self.config = self.Config.model_validate({**dict(config or {}), **overrides})
        self.model = model
        self.num_classes = num_classes
        self.in_channels = in_channels if in_channels is not None else input_channels(model, required=False)
        self.spatial_dims = spatial_dims if spatial_dims is not None else input_dims(model)
        self.total_steps = 0
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._backward: Callable[[torch.Tensor], None] = torch.Tensor.backward

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, total_steps: int) -> None:
        """Called once at the start of a stage with its number of optimizer steps."""
        self.total_steps = total_steps

    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> StepOutput:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step (EMA updates go here). Default: nothing to do."""

    def image_transform(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """Optional CPU transform of each training image ``(C, *S) -> (C', *S)``, applied once per image by the
        data pipeline (cached, before augmentation), e.g. DSAIF's tree-filtered views. Default: none."""
        return None

    def target_transform(self) -> Callable[[np.ndarray, np.ndarray, np.ndarray, str], dict[str, np.ndarray]] | None:
        """Optional per-case training targets of labelled cases: ``(image (C, *S), label (*S), label_mask (*S),
        case id) -> {name: map (*S)}``, computed once per case before training (cached on disk in the stage folder)
        and carried in the labelled batch under ``name``, augmented like the label (e.g. DeSCO's registration-
        propagated labels and distance-to-annotated-slice maps). Targets that change on a schedule are computed in
        :meth:`training_step` from these maps and the step (DeSCO's weights s^d). Default: none."""
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

    # -- parameters and optimizers ---------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter] | list[dict] | dict[str, Iterable[nn.Parameter]]:
        """Parameters the optimizer updates (default: the student's), or torch parameter groups (dicts with
        ``params`` and per-group options such as ``betas``) when the paper sets options per network part; a strategy
        with named ``optimizers`` returns ``{name: parameters}``."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def bind_optimizers(self, optimizers: Mapping[str, Any], backward: Callable[[torch.Tensor], None] | None = None):
        """Give a strategy with named ``optimizers`` the optimizers it steps (``backward``: how to back-propagate,
        e.g. Lightning's ``manual_backward`` for mixed precision and DDP; default ``loss.backward()``)."""
        missing = sorted(set(self.requires.optimizers) - set(optimizers))
        if missing:
            raise KeyError(f"strategy '{self.name}' steps optimizers {list(self.requires.optimizers)}; missing {missing}")
        self._optimizers = dict(optimizers)
        self._backward = backward or torch.Tensor.backward

    def optimizer_idle(self, name: str) -> None:
        """A step of optimizer ``name`` that changes nothing (every gradient is ``None``, which torch optimizers skip):
        for a strategy whose phases train only some of its networks, as the loop expects each optimizer stepped once
        per training step. Its learning-rate schedule still advances."""
        opt = self._bound(name)
        opt.zero_grad(set_to_none=True)
        opt.step()

    def _bound(self, name: str) -> torch.optim.Optimizer:
        if name not in self._optimizers:
            raise RuntimeError(f"optimizer '{name}' of strategy '{self.name}' is not bound: call bind_optimizers()")
        return self._optimizers[name]

    def optimizer_step(self, name: str, loss: torch.Tensor) -> None:
        """zero_grad → backward(loss) → step of optimizer ``name``; a non-finite loss stops before any update."""
        opt = self._bound(name)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss of optimizer '{name}' is {loss.item()} (strategy '{self.name}'); "
                                     "no update was made; the last good checkpoint is kept")
        opt.zero_grad(set_to_none=True)
        self._backward(loss)
        opt.step()

    def validation_loss(self, batch: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """The training objective on held-out images, for ``select: val_loss`` (lower is better): ``batch`` is
        ``{"unlabeled": {"image": (N, C, *S)}}``, one val volume's slices (2D) or the volume (3D), never a label.
        No update and no state change; called without gradients under a fixed seed, so sampled terms (anchors,
        noise) repeat across validations. Implemented by strategies whose paper selects on it."""
        raise NotImplementedError(f"strategy '{self.name}' has no validation loss")

    @classmethod
    def has_validation_loss(cls) -> bool:
        return cls.validation_loss is not Strategy.validation_loss

    def generate(self, image: torch.Tensor, label: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """A generator (``requires.role == "generator"``) after training: ``n`` new images of a labelled case whose
        label stays exact — image ``(C, *S)``, label ``(*S)`` -> ``(n, C, *S)``; with ``requires.generates_volumes`` a
        2D volume's slices ``(Z, C, H, W)``, ``(Z, H, W)`` -> ``(n, Z, C, H, W)``. Written for later stages by the
        runner (``data.synthetic``)."""
        raise NotImplementedError(f"strategy '{self.name}' generates no pairs (its role is {self.requires.role!r})")

    # -- inference -------------------------------------------------------------------------------

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
        """Refuse a batch this strategy must not see (run before every ``training_step``)."""
        check_batch(self.name, self.requires, batch)


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str):
    """Class decorator: register a :class:`Strategy` subclass under ``name``."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        return STRATEGIES.register(name, cls)

    return add


def build_strategy(name: str, model: nn.Module, num_classes: int, config: Mapping[str, Any] | None = None) -> Strategy:
    return STRATEGIES.get(name)(model, num_classes, config)
