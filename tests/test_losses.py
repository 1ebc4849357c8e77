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


def test_losses_under_cpu_bf16_autocast_are_computed_in_fp32():
    """CPU autocast leaves softmax in bf16 (CUDA's runs it in fp32); the supervised and region-weighted losses
    upcast the logits, so under bf16 autocast they equal the fp32 loss of the same bf16 logits."""
    from label_efficient.losses import ce_dice, supervised_loss, weighted_dice

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    x, y = torch.randn(2, 1, 20, 20), torch.randint(0, 4, (2, 20, 20))
    w = (torch.rand(2, 20, 20) > 0.3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        got = [supervised_loss(ce_dice(), logits, y), supervised_loss(ce_dice(), logits, y, w),
               weighted_dice(logits, y, w)]
    ref = [supervised_loss(ce_dice(), logits.float(), y), supervised_loss(ce_dice(), logits.float(), y, w),
           weighted_dice(logits.float(), y, w)]
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32 and torch.allclose(g, r, rtol=1e-6, atol=0)
