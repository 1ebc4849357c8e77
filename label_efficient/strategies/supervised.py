"""Supervised baseline on the labelled stream only: ½(CE + Dice), restricted to the annotated voxels of a sparse
annotation (``label_mask``)."""
from __future__ import annotations

from ..losses import ce_dice, supervised_loss
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements


@register_strategy("supervised")
class Supervised(Strategy):
    """L = ½(CE(f(x), y) + Dice(f(x), y)) on labelled images; the lower bound of every comparison."""

    requires = Requirements(streams=('labeled',), labels='sparse')

    class Config(StrategyConfig):
        pass

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        self.loss_fn = ce_dice()

    def training_step(self, batch, step):
        lab = batch["labeled"]
        loss = supervised_loss(self.loss_fn, self.model(lab["image"]), lab["label"], lab.get("label_mask"))
        return StepOutput(loss, {"loss_sup": loss.detach()})
