"""Segmentation losses shared by strategies.

``ce_dice`` is ½(CE + Dice) with MONAI's ``DiceCELoss``. The *region-weighted* variants are for
strategies whose spec restricts a loss to a pixel region (BCP's mixed targets, UPL-SFDA's masked
Dice), which MONAI's losses do not take. Every Dice *loss* of the strategies is :func:`soft_dice` with its differences
as parameters (metric Dice is ``label_efficient.evaluation``'s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def ce_dice() -> DiceCELoss:
    """½(CE + soft Dice); Dice over all classes including background, squared denominators, batch-summed (the class
    count is the logits' channels: the labels are one-hot encoded to it)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, squared_pred=True, batch=True,
                      lambda_dice=0.5, lambda_ce=0.5, smooth_nr=1e-5, smooth_dr=1e-5)


def supervised_loss(loss_fn: DiceCELoss, logits: torch.Tensor, label: torch.Tensor,
                    label_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a MONAI Dice/CE loss to logits (N, C, ...) and an integer label map (N, ...). With a sparse annotation's
    ``label_mask`` (N, ...), the same ½(CE + squared Dice) restricted to the annotated voxels: unmarked voxels get
    exactly zero gradient, and a mask marking nothing gives a zero loss (no NaN). In fp32 whatever the logits' dtype:
    CPU autocast leaves softmax in bf16, where CUDA's runs it in fp32."""
    logits = logits.float()
    if label_mask is None:
        return loss_fn(logits, label.unsqueeze(1))
    return 0.5 * (weighted_ce(logits, label, label_mask) + weighted_dice(logits, label, label_mask))


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the pixels of ``weight`` (its sum), each pixel scaled by its weight."""
    ce = F.cross_entropy(logits, target, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1e-8)


def sample_weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """−Σ W·log p_y / Σ W per sample, averaged over the batch (DeSCO's ``wce``); a sample without weight adds 0."""
    ce = F.cross_entropy(logits, target, reduction="none").flatten(1)
    w = weight.flatten(1).to(ce.dtype)
    return ((ce * w).sum(1) / w.sum(1).clamp_min(1e-8)).mean()


def soft_dice(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *, smooth: float = 1e-5,
              squared: bool = False, masked: bool = False, joint_sum: bool = False) -> torch.Tensor:
    """The soft Dice of every class (K,), batch-summed: (2Σ w·p·y + s) / (Σ w·p^a + Σ w·y^a + s), sums over every
    axis but 1. ``probs`` and ``target`` (one-hot or binary masks) (N, K, *S); ``weight`` broadcasting to them
    ((N, 1, *S) or (N, K, *S)), or None. The differences between the strategies' Dice losses, as parameters:

    * ``smooth``: s, on numerator and denominator;
    * ``squared``: a = 2 (V-Net denominators, SSL4MIS/BCP), else a = 1;
    * ``masked``: p ← p ⊙ y first, so only the pixels labelled k count for class k (UPL-SFDA's twice-forward
      supervision);
    * ``joint_sum``: the denominator as one reduction Σ w·(p^a + y^a) instead of Σ w·p^a + Σ w·y^a: equal but for
      rounding, the form of CycleGAN-PL's noise-weighted Dice and VAE reconstruction, kept so that results do not move.
    """
    if masked:
        probs = probs * target
    dims = [0] + list(range(2, probs.ndim))
    inter = probs * target if weight is None else probs * target * weight
    p, y = (probs**2, target**2) if squared else (probs, target)
    if joint_sum:
        denom = (p + y if weight is None else weight * (p + y)).sum(dims)
    elif weight is None:
        denom = p.sum(dims) + y.sum(dims)
    else:
        denom = (p * weight).sum(dims) + (y * weight).sum(dims)
    return (2 * inter.sum(dims) + smooth) / (denom + smooth)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, *,
              include_background: bool = True, **options) -> torch.Tensor:
    """1 − the mean over classes (from class 1 without background) of :func:`soft_dice` (``options``: its keywords)."""
    dice = soft_dice(probs, target, weight, **options)
    return 1 - (dice if include_background else dice[1:]).mean()


def weighted_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, squared: bool = True,
                  smooth: float = 1e-5, include_background: bool = True) -> torch.Tensor:
    """Dice loss of logits (N, C, *S) and an integer label map (N, *S) restricted to the pixel weights ``weight``
    (N, *S) (batch-summed; squared denominators by default): BCP's regions, sparse annotations, DeSCO's W_k. In fp32."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    return dice_loss(probs, onehot, weight.unsqueeze(1).to(probs.dtype), include_background=include_background,
                     squared=squared, smooth=smooth)


def noise_weighted_dice(probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        smooth: float = 1e-5) -> torch.Tensor:
    """CycleGAN-PL's L_NWD = 1 − (2Σ w p y + ε) / (Σ w (p + y) + ε), batch-summed per foreground class, averaged over
    classes; ``probs``, ``target`` (one-hot), ``weight``: (N, K, *S)."""
    p, y, w = probs[:, 1:], target[:, 1:].to(probs.dtype), weight[:, 1:].to(probs.dtype)
    return dice_loss(p, y, w, smooth=smooth, joint_sum=True)


def masked_dice_loss(probs: torch.Tensor, pseudo: torch.Tensor, smooth: float = 1e-4) -> torch.Tensor:
    """Mean over classes of 1 − (2Σ q·Y + s)/(ΣY + Σq² + s), q = p ⊙ Y (UPL-SFDA ``DiceLoss`` on masked output; the
    mean of the per-class losses, as the official code, not 1 − the mean Dice)."""
    return (1 - soft_dice(probs, pseudo, smooth=smooth, squared=True, masked=True)).mean()


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(−5(1 − t)²) with t = step/length clipped to [0, 1] (Laine & Aila 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
