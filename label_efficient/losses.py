"""Segmentation losses shared by strategies.

``ce_dice`` is ½(CE + Dice) with MONAI's ``DiceCELoss``. The *region-weighted* variants are for
strategies whose spec restricts a loss to a pixel region (BCP's mixed targets, UPL-SFDA's masked
Dice), which MONAI's losses do not take.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def ce_dice(num_classes: int) -> DiceCELoss:
    """½(CE + soft Dice); Dice over all classes including background, squared denominators, batch-summed."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=True, squared_pred=True, batch=True,
                      lambda_dice=0.5, lambda_ce=0.5, smooth_nr=1e-5, smooth_dr=1e-5)


def supervised_loss(loss_fn: DiceCELoss, logits: torch.Tensor, label: torch.Tensor,
                    label_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a MONAI Dice/CE loss to logits (N, C, ...) and an integer label map (N, ...). With a sparse annotation's
    ``label_mask`` (N, ...), the same ½(CE + squared Dice) restricted to the annotated voxels: unmarked voxels get
    exactly zero gradient, and a mask marking nothing gives a zero loss (no NaN)."""
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


def weighted_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, squared: bool = True,
                  smooth: float = 1e-5, include_background: bool = True) -> torch.Tensor:
    """1 − mean over classes (from class 1 without background) of the Dice restricted to ``weight`` (batch-summed;
    squared denominators)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    w = weight.unsqueeze(1).to(probs.dtype)
    dims = [0] + list(range(2, probs.ndim))
    inter = (probs * onehot * w).sum(dims)
    p, y = (probs**2, onehot**2) if squared else (probs, onehot)
    denom = (p * w).sum(dims) + (y * w).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1 - (dice if include_background else dice[1:]).mean()


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(−5(1 − t)²) with t = step/length clipped to [0, 1] (Laine & Aila 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
