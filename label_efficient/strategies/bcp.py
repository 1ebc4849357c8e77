"""BCP: bidirectional copy-paste in a mean teacher (Bai et al., CVPR 2023, arXiv 2305.00673).

Stage 1 (``bcp_pretrain``): copy-paste among labelled pairs, x = a⊙M + b⊙(1−M), target mixed the same way.
Stage 2 (``bcp``), per step, with the EMA teacher T initialised from the best stage-1 student:
  1. ŷ_u, ŷ_v = LCC(argmax T(u)), LCC(argmax T(v))                       (pseudo labels, no grad)
  2. X_in  = u⊙M + a⊙(1−M),  Y_in  = ŷ_u⊙M + y_a⊙(1−M)                  (labelled crop in unlabelled image)
     X_out = b⊙M + v⊙(1−M),  Y_out = y_b⊙M + ŷ_v⊙(1−M)                  (unlabelled crop in labelled image)
  3. L = L_in + L_out, each ℓ = ½(CE_R + Dice_R) per region R ∈ {M, 1−M}, pseudo-labelled region weighted α
  4. SGD step, then θ_T ← 0.99 θ_T + 0.01 θ_S
M is 1 outside one random box and 0 inside; each box side is β = 2/3 of the image side; one M per step serves both
mixes. As in the official code the student sees the two mixes in two passes (BN statistics per mix) and the
teacher predicts in train mode (dropout and batch statistics on; ``teacher_eval_mode: true`` turns them off).
Departure: the Dice is batch-summed for 2D and 3D alike (the official LA Dice is per sample with a linear
denominator: set ``squared_dice: false`` for its denominator).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import dice_loss
from ..transforms.components import log_cleaning, largest_component_labels
from ..utils import class_map
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements
from .ema import ema_update, make_teacher


def box_mask(spatial_shape: tuple[int, ...], beta: float, device=None, generator: torch.Generator | None = None):
    """M: 1 outside a random box whose side along each axis is ⌊β·side⌋, 0 inside (BCP ``context_mask``)."""
    mask = torch.ones(spatial_shape, device=device)
    box = []
    for side in spatial_shape:
        length = int(side * beta)
        start = int(torch.randint(0, side - length + 1, (1,), generator=generator))
        box.append(slice(start, start + length))
    mask[tuple(box)] = 0
    return mask


def copy_paste(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outside⊙M + inside⊙(1−M)`` for images (N, C, *S) or label maps (N, *S); M is (*S)."""
    m = mask if outside.ndim == mask.ndim + 1 else mask.unsqueeze(0)
    return torch.where(m.bool(), outside, inside)


def region_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, w_outside: float, w_inside: float,
                squared: bool = True) -> torch.Tensor:
    """½[w_out·(CE_M + Dice_M) + w_in·(CE_{1−M} + Dice_{1−M})] — BCP's ``mix_loss``, the values of ``weighted_ce`` +
    ``weighted_dice`` per region. M is one map for the whole batch, so every sum is taken over the batch first, then
    over M as the product with M, and over 1−M as the total minus that: one CE, softmax and one-hot, and one
    full-size product per Dice sum, for both regions. In fp32 whatever the logits' dtype (bf16 sums would keep
    three significant digits)."""
    logits = logits.float()
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    m = mask.to(probs.dtype).flatten()
    # per class and pixel, summed over the batch: Σ p·y, Σ p^a, Σ y (y^a = y for a one-hot y)
    maps = torch.stack([(probs * onehot).sum(0), (probs**2 if squared else probs).sum(0), onehot.sum(0)]).flatten(2)
    ce = F.cross_entropy(logits, target, reduction="none").sum(0).flatten()
    in_m = ((maps * m).sum(-1), (ce * m).sum(), m.sum() * target.shape[0])  # not @, which autocast runs in bf16
    in_rest = (maps.sum(-1) - in_m[0], ce.sum() - in_m[1], target.numel() - in_m[2])
    loss = 0.0
    for (dice_sums, ce_sum, pixels), w in ((in_m, w_outside), (in_rest, w_inside)):
        inter, p, y = dice_sums
        dice = (2 * inter + 1e-5) / (p + y + 1e-5)
        loss = loss + w * (ce_sum / pixels.clamp_min(1e-8) + 1 - dice.mean())
    return loss / 2


def _halves(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    if n < 2 or n % 2:
        raise ValueError(f"BCP splits the {what} batch into two halves: its size must be even and ≥ 2, got {n}")
    return x[: n // 2], x[n // 2 :]


class BCPConfig(StrategyConfig):
    beta: float = 2 / 3  #: box side as a fraction of each image side (area 4/9 in 2D, 8/27 in 3D)
    u_weight: float = 0.5  #: α, weight of pseudo-labelled pixels
    ema_decay: float = 0.99
    ema_buffers: bool = True  #: average BN statistics too (ACDC code); the LA code averages parameters only
    largest_component: bool = True  #: clean teacher pseudo labels by the largest connected component per class
    squared_dice: bool = True  #: Σp²+Σy² denominators (ACDC); false for the linear LA Dice
    teacher_eval_mode: bool = False  #: official code: the teacher stays in train mode


@register_strategy("bcp_pretrain")
class BCPPretrain(Strategy):
    """BCP stage 1: copy-paste between labelled pairs; both regions weight 1."""

    Config = BCPConfig

    def training_step(self, batch, step):
        c = self.config
        (a, b), (ya, yb) = _halves(batch["labeled"]["image"], "labelled"), _halves(batch["labeled"]["label"], "labelled")
        mask = box_mask(tuple(a.shape[2:]), c.beta, a.device)
        x, y = copy_paste(a, b, mask), copy_paste(ya, yb, mask)
        loss = region_loss(self.model(x), y, mask, 1.0, 1.0, c.squared_dice)
        return StepOutput(loss, {"loss_mix": loss.detach()})


@register_strategy("bcp")
class BCP(Strategy):
    """BCP stage 2: bidirectional copy-paste self-training with an EMA teacher."""

    Config = BCPConfig
    requires = Requirements(streams=('labeled', 'unlabeled'))

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        self.teacher = make_teacher(model)  # = the pre-trained student the stage was initialised with

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        log_cleaning("bcp", self.config.largest_component)

    @torch.no_grad()
    def pseudo_label(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.train(not self.config.teacher_eval_mode)
        labels = class_map(self.teacher(x))
        return largest_component_labels(labels, self.num_classes) if self.config.largest_component else labels

    def training_step(self, batch, step):
        c = self.config
        (a, b), (ya, yb) = _halves(batch["labeled"]["image"], "labelled"), _halves(batch["labeled"]["label"], "labelled")
        u, v = _halves(batch["unlabeled"]["image"], "unlabelled")
        if u.shape[0] != a.shape[0]:
            raise ValueError(f"BCP pairs labelled and unlabelled halves: batch sizes must match, got "
                             f"{2 * a.shape[0]} labelled and {2 * u.shape[0]} unlabelled")
        yu, yv = self.pseudo_label(u), self.pseudo_label(v)
        mask = box_mask(tuple(a.shape[2:]), c.beta, a.device)
        x_in, y_in = copy_paste(u, a, mask), copy_paste(yu, ya, mask)
        x_out, y_out = copy_paste(b, v, mask), copy_paste(yb, yv, mask)
        loss_in = region_loss(self.model(x_in), y_in, mask, c.u_weight, 1.0, c.squared_dice)
        loss_out = region_loss(self.model(x_out), y_out, mask, 1.0, c.u_weight, c.squared_dice)
        loss = loss_in + loss_out
        return StepOutput(loss, {"loss_in": loss_in.detach(), "loss_out": loss_out.detach()})

    def after_optimizer_step(self, step):
        ema_update(self.teacher, self.model, self.config.ema_decay, buffers=self.config.ema_buffers)
