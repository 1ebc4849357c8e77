"""The one soft Dice of the strategies' Dice losses: each variant's parameters give its formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from label_efficient.losses import dice_loss, masked_dice_loss, noise_weighted_dice, soft_dice, weighted_dice


def _inputs():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 3, 8, 8, generator=g).softmax(1)
    onehot = F.one_hot(torch.randint(3, (2, 8, 8), generator=g), 3).movedim(-1, 1).float()
    return probs, onehot, torch.rand(2, 1, 8, 8, generator=g)


def test_soft_dice_variants_follow_their_formulas():
    p, y, w = _inputs()
    dims, s = (0, 2, 3), 1e-5
    plain = (2 * (p * y).sum(dims) + s) / (p.sum(dims) + y.sum(dims) + s)
    assert torch.allclose(soft_dice(p, y), plain)
    assert torch.allclose(soft_dice(p, y, joint_sum=True), plain)  # the same sum, one reduction
    squared = (2 * (p * y * w).sum(dims) + s) / ((p**2 * w).sum(dims) + (y**2 * w).sum(dims) + s)
    assert torch.allclose(soft_dice(p, y, w, squared=True), squared)
    q = p * y  # masked: only the pixels labelled k count for class k
    masked = (2 * (q * y).sum(dims) + 1) / (y.sum(dims) + (q * q).sum(dims) + 1)
    assert torch.allclose(soft_dice(p, y, smooth=1.0, squared=True, masked=True), masked)
    assert torch.allclose(dice_loss(p, y, include_background=False), 1 - plain[1:].mean())
    assert torch.allclose(masked_dice_loss(p, y, 1.0), (1 - masked).mean())


def test_dice_loss_wrappers_agree_with_soft_dice():
    p, y, w = _inputs()
    logits = p.log()
    labels = y.argmax(1)
    assert torch.allclose(weighted_dice(logits, labels, w[:, 0]), dice_loss(p, y, w, squared=True), atol=1e-6)
    wk = w.expand_as(p)
    assert torch.allclose(noise_weighted_dice(p, y, wk), 1 - soft_dice(p, y, wk)[1:].mean(), atol=1e-6)
