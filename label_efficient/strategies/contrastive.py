"""Global + local contrastive pre-training (Chaitanya et al., NeurIPS 2020, arXiv 2006.10511).

Label-free stages run in order, then any strategy fine-tunes from them (stage 3, e.g. ``supervised`` or ``bcp``):

``contrastive_global`` (G^D, global_loss_exp_no=2), per step:
  1. set 1, set 2: m volumes each, one random slice from each of S partitions (``Stream(partitions=S)``)
  2. x̃ = aug(x): random crop (≈100/192 of the side, offset in [10, 70)/192) resized back, brightness ±0.3,
     contrast ×[0.7, 1.3], clipped to [0, 1.5]                                           (on device, kornia)
  3. z = g1(e(x)) for [set 1 | x̃ set 1 | set 2 | x̃ set 2]; e = the backbone's encoder, g1 = FC1024-ReLU-FC128
  4. every original image anchors 4 positive pairs with the next original image of its partition, both ways: a
     set-1 image i with the set-2 image j at its position, (i, ĩ), (i, j), (j, j̃), (ĩ, j̃); a set-2 image j with the
     set-1 image i′ of the next volume slot (cyclically), (j, j̃), (j, i′), (i′, ĩ′), (j̃, ĩ′) (the official loop,
     models.py global_loss_exp_no=2, anchors the set-2 originals too: 16 directed terms per 4 images of a
     partition and volume slot); negatives: every image of another partition (same-partition images leave the
     denominator)
  5. ℓ(a, p) = −log e^{s(a,p)/τ} / (e^{s(a,p)/τ} + Σ_{n∈Neg(a)} e^{s(a,n)/τ}), s = cosine, τ = 0.1     (paper eq. 2)

``contrastive_local`` (L, local_loss_exp_no=0), per step, encoder weights frozen; its BN normalises with batch
statistics and updates its running statistics, as the official stage 2 (``train_phase: True`` for the whole net):
  1. two views of each slice differing only in brightness/contrast (no geometry: positions correspond)
  2. f = g2(d_l(e(x))): the first l decoder blocks, then 1×1 conv-BN-ReLU-1×1 conv, both convolutions bias-free
  3. 13 fixed 3×3 regions (corners, edge midpoints, centre, quarter points), each flattened through one shared
     bias-free dense layer to 128-d; positive = the same region in the other view, negatives = all other
     regions of both views; ℓ with τ = 0.1, symmetric, averaged over regions and images     (paper eq. 3)

Departures, each for a stated reason: g1 reads the last encoder block average-pooled to a 4×4 grid (the official
code flattens it whole, so its head size is tied to the input size); the local negatives are all other regions, as
the paper states, instead of the official code's 5 hand-picked neighbours (the spec marks them incidental); the
global loss is the mean of the ℓ terms (the official sum/(4·batch) is a constant factor); l counts our backbone's
decoder blocks (basic_unet has 4 where the official network has 5), so the default l = 3 puts the local loss on a
½-resolution map (64² for 128²) and leaves 1 of 4 decoder blocks random, where the paper's l = 3 is a ¼-resolution
map (48² for 192²) leaving 2 of 5: ``decoder_blocks: 2`` matches the paper's resolution (the RESULTS rows use 3).
The backbone's own dropout (basic_unet: encoder 0.05…0.5) stays active while pre-training, the frozen encoder of
stage 2 included (the official encoder has none): one network runs all stages of a recipe; set
``backbone.kwargs.dropout: 0`` to pre-train without it. The official ``stitch_batch_global_loss_gd`` stops one
block early (``>=``), so its last volume slot holds zero images that anchor and count as negatives: a bug we do not
copy (every slot holds real slices).
Stage 3 is whatever fine-tuning strategy the recipe names; ``supervised`` trains ½(CE + Dice), not the official
Dice including background.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.transform import crop_and_resize
from pydantic import Field
from torch import nn

from ..backbones import blocks, forward_until, out_channels
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements


def intensity_jitter(x: torch.Tensor, brightness: float, contrast: tuple[float, float], clip: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image: x + b, b ~ U(−brightness, brightness), then (x − mean)·c + mean, c ~ U(contrast), clipped to
    [0, clip] (TF ``random_brightness`` / ``random_contrast`` as the official code)."""
    n, dims = len(x), (1,) * (x.ndim - 1)
    b = (torch.rand(n, *dims, device=x.device, generator=generator) * 2 - 1) * brightness
    c = torch.empty(n, *dims, device=x.device).uniform_(*contrast, generator=generator)
    x = x + b
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, clip)


def random_crop_resize(x: torch.Tensor, side: float, offset: tuple[float, float],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A crop of ``side``·H × ``side``·W at a random offset in ``offset``·(H, W) per axis, resized back to H × W."""
    n, _, h, w = x.shape
    lo, hi = offset
    start = lo + torch.rand(n, 2, device=x.device, generator=generator) * (hi - lo)   # (x, y) fractions
    hi_xy = (start + side).clamp(max=1.0)
    size = torch.tensor([w - 1, h - 1], device=x.device, dtype=x.dtype)
    x0, y0 = (start * size).unbind(1)
    x1, y1 = (hi_xy * size).unbind(1)
    boxes = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1),
                         torch.stack([x1, y1], 1), torch.stack([x0, y1], 1)], 1)
    return crop_and_resize(x, boxes, (h, w))


def contrastive_terms(sim: torch.Tensor, anchors: torch.Tensor, positives: torch.Tensor,
                      negatives: torch.Tensor) -> torch.Tensor:
    """ℓ(a, p) = −log e^{sim[a,p]} / (e^{sim[a,p]} + Σ_{n: negatives[a,n]} e^{sim[a,n]}) for each pair (a, p);
    ``sim`` is already divided by τ."""
    pos = sim[anchors, positives]
    neg = sim[anchors].masked_fill(~negatives[anchors], float("-inf")).logsumexp(dim=1)
    return torch.logaddexp(pos, neg) - pos


def global_pairs(n: int, partitions: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed positive pairs of G^D in the layout [set 1 | aug set 1 | set 2 | aug set 2], n images per block, each
    set volume-major (n/``partitions`` volume slots × ``partitions``), as the official loop: set-1 image i anchors
    (i, ĩ), (i, j), (j, j̃), (ĩ, j̃) with j the set-2 image at i's position; set-2 image j anchors (j, j̃), (j, i′),
    (i′, ĩ′), (j̃, ĩ′) with i′ the set-1 image of the same partition in the next volume slot (cyclically); each pair
    both ways. 16n pairs."""
    k = torch.arange(n, device=device)
    nxt = (k + partitions) % n  # i′: the next volume slot of set 1, same partition
    a = torch.cat([k, k, k + 2 * n, k + n, k + 2 * n, k + 2 * n, nxt, k + 3 * n])
    p = torch.cat([k + n, k + 2 * n, k + 3 * n, k + 3 * n, k + 3 * n, nxt, nxt + n, nxt + n])
    return torch.cat([a, p]), torch.cat([p, a])


def global_loss(z: torch.Tensor, partition: torch.Tensor, temperature: float) -> torch.Tensor:
    """G^D (paper eq. 2) for embeddings ``z`` (4n, d) laid out [set 1 | aug 1 | set 2 | aug 2] and the partition
    index (4n,) of each row (set 1 volume-major, partitions 0…S−1 per volume); the mean over the 16n directed
    positive pairs of :func:`global_pairs`."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.t() / temperature
    n = len(z) // 4
    anchors, positives = global_pairs(n, len(partition[:n].unique()), z.device)
    return contrastive_terms(sim, anchors, positives, partition[:, None] != partition[None, :]).mean()


def region_corners(height: int, width: int, size: int = 3) -> list[tuple[int, int]]:
    """Top-left corners of the 13 fixed ``size``² regions: 4 corners, 4 edge midpoints, the centre, 4 quarter points."""
    if min(height, width) < 4 * size // 3 + size:
        raise ValueError(f"a {height}×{width} decoder map is too small for 13 separate {size}×{size} regions")
    ys = [0, (height - size) // 4, (height - size) // 2, 3 * (height - size) // 4, height - size]
    xs = [0, (width - size) // 4, (width - size) // 2, 3 * (width - size) // 4, width - size]
    border = [(ys[0], xs[0]), (ys[0], xs[4]), (ys[4], xs[0]), (ys[4], xs[4]),
              (ys[0], xs[2]), (ys[2], xs[0]), (ys[4], xs[2]), (ys[2], xs[4])]
    return border + [(ys[2], xs[2]), (ys[1], xs[1]), (ys[1], xs[3]), (ys[3], xs[1]), (ys[3], xs[3])]


def local_loss(r1: torch.Tensor, r2: torch.Tensor, temperature: float) -> torch.Tensor:
    """L (paper eq. 3) for region embeddings (N, R, d) of two aligned views: anchor region r of one view, positive
    the same region of the other view, negatives every other region of both views; symmetric, mean over N·R·2."""
    n, r, _ = r1.shape
    z = F.normalize(torch.cat([r1, r2], 1).float(), dim=2)        # (N, 2R, d): [view 1 regions | view 2 regions]
    sim = z @ z.transpose(1, 2) / temperature
    idx = torch.arange(2 * r, device=z.device)
    partner = (idx + r) % (2 * r)
    neg = (idx[:, None] != idx[None, :]) & (partner[:, None] != idx[None, :])
    terms = [contrastive_terms(s, idx, partner, neg) for s in sim]
    return torch.stack(terms).mean()


class GlobalHead(nn.Module):
    """g1: the last encoder block average-pooled to ``grid``², flattened, FC ``hidden`` + ReLU, FC ``dim`` (no biases)."""

    def __init__(self, channels: int, grid: int = 4, hidden: int = 1024, dim: int = 128):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.mlp = nn.Sequential(nn.Linear(channels * grid * grid, hidden, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, dim, bias=False))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(feature).flatten(1))


class LocalHead(nn.Module):
    """g2 (bias-free 1×1 conv-BN-ReLU-1×1 conv, as the official ``seg_c1_a``/``seg_c1_b``) on the decoder map, then
    the shared bias-free dense layer per 3×3 region."""

    def __init__(self, channels: int, region: int = 3, dim: int = 128):
        super().__init__()
        self.region = region
        self.g2 = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False))
        self.dense = nn.Linear(channels * region * region, dim, bias=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Region embeddings (N, 13, dim)."""
        f = self.g2(feature)
        s = self.region
        crops = [f[:, :, y:y + s, x:x + s].flatten(1) for y, x in region_corners(*f.shape[-2:], s)]
        return self.dense(torch.stack(crops, 1))


class _Intensity(StrategyConfig):
    temperature: float = Field(0.1, gt=0)
    brightness: float = Field(0.3, ge=0)
    contrast: tuple[float, float] = (0.7, 1.3)
    clip: float = 1.5  #: augmented intensities are clipped to [0, clip] (images are in [0, 1])
    dim: int = Field(128, gt=0)


def _two_dimensional(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"'{name}' pre-trains 2D networks on slices (N, C, H, W); got a batch of shape {tuple(x.shape)}")


@register_strategy("contrastive_global")
class ContrastiveGlobal(Strategy):
    """Stage 1: the encoder and g1 learn G^D on unlabelled slices sampled by volume partition (see module doc)."""

    # intensity: brightness ±0.3 and the [0, 1.5] clip
    # spatial_dims: 2D slices and their partitions
    requires = Requirements(streams=('unlabeled',), labels='none', role='pretrainer', intensity='unit',
                            spatial_dims=(2,))

    class Config(_Intensity):
        partitions: int = Field(4, ge=2)  #: S
        volumes: int = Field(5, ge=1)  #: m; a batch holds 2·m·S slices
        crop_side: float = Field(100 / 192, gt=0, le=1)
        crop_offset: tuple[float, float] = (10 / 192, 70 / 192)
        grid: int = Field(4, ge=1)
        hidden: int = Field(1024, gt=0)

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        self.encoder_out = blocks(model, "encoder")[-1]
        c = self.config
        self.head = GlobalHead(out_channels(model, self.encoder_out), c.grid, c.hidden, c.dim)

    def stream_options(self):
        return {"unlabeled": {"partitions": self.config.partitions, "volumes": self.config.volumes}}

    def handover_parts(self):
        return ["encoder"]

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self.head.parameters())

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = random_crop_resize(x, c.crop_side, c.crop_offset)
        return intensity_jitter(x, c.brightness, c.contrast, c.clip)

    def training_step(self, batch, step):
        u = batch["unlabeled"]
        x, part = u["image"], u.get("partition")
        _two_dimensional(x, self.name)
        if part is None or len(x) % 2:
            raise KeyError("contrastive_global needs volume-partition batches: 'unlabeled' must carry 'partition' and "
                           "hold set 1 then set 2 (data.Stream(partitions=S, volumes=m) builds them)")
        set1, set2 = x.chunk(2)
        with torch.no_grad():
            views = torch.cat([set1, self.augment(set1), set2, self.augment(set2)])
        p1, p2 = part.chunk(2)
        z = self.head(forward_until(self.model, views, self.encoder_out))
        loss = global_loss(z, torch.cat([p1, p1, p2, p2]).to(z.device), self.config.temperature)
        return StepOutput(loss, {"loss_global": loss.detach()})


@register_strategy("contrastive_local")
class ContrastiveLocal(Strategy):
    """Stage 2: the encoder (from stage 1) is frozen; the first l decoder blocks and g2 learn L (see module doc)."""

    # intensity: brightness ±0.3 and the [0, 1.5] clip
    # spatial_dims: 2D slices and their partitions
    requires = Requirements(streams=('unlabeled',), labels='none', role='pretrainer', intensity='unit',
                            spatial_dims=(2,))

    class Config(_Intensity):
        decoder_blocks: int = Field(3, ge=1)  #: l
        region: int = Field(3, ge=1)

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        decoder = blocks(model, "decoder")
        if self.config.decoder_blocks > len(decoder):
            raise ValueError(f"decoder_blocks={self.config.decoder_blocks}, but {type(model).__name__} has "
                             f"{len(decoder)} decoder blocks")
        self.decoder_out = decoder[self.config.decoder_blocks - 1]
        self.encoder = [model.get_submodule(n) for n in blocks(model, "encoder")]
        for block in self.encoder:
            block.requires_grad_(False)
        self.head = LocalHead(out_channels(model, self.decoder_out), self.config.region, self.config.dim)

    def handover_parts(self):
        return ["encoder", f"decoder:{self.config.decoder_blocks}"]

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self.head.parameters())

    def training_step(self, batch, step):
        x = batch["unlabeled"]["image"]
        _two_dimensional(x, self.name)
        c = self.config
        with torch.no_grad():
            views = torch.cat([intensity_jitter(x, c.brightness, c.contrast, c.clip) for _ in range(2)])
        r = self.head(forward_until(self.model, views, self.decoder_out))
        r1, r2 = r.chunk(2)
        loss = local_loss(r1, r2, c.temperature)
        return StepOutput(loss, {"loss_local": loss.detach()})
