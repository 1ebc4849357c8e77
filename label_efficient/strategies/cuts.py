"""CUTS: multigranular unsupervised segmentation (Liu et al., MICCAI 2024, arXiv 2209.11359).

Stage 1 (``cuts``, label-free), per step, images scaled to [−1, 1]:
  1. z = f(x): an embedding per pixel (the backbone's last full-resolution feature map, tap ``decoder``;
     ``cuts_cnn`` is the paper's 4 × conv5×5 network that never downsamples)
  2. per image, S anchors at least P//2 from the border; each anchor's positive: the first of up to 20 random
     pixels within ±P whose P×P patch has SSIM > 0.5 with the anchor's (data range: the anchor patch's own
     max − min, as the official ``range_aware_ssim``), else the diagonal neighbour
  3. L_NCE: NT-Xent over the 2S rows [z_a; z_p] of each image (positive = the partner, negatives = all other
     rows), τ = 0.1
  4. L_recon: an MLP (L → C·P² → LeakyReLU → C·P²) predicts the anchor's P×P×C image patch from z_a; MSE
  5. L = λ·L_NCE + (1 − λ)·L_recon, λ = 0.001
Checkpoint: ``select: val_loss`` keeps the step of lowest L on the val images (the official rule; no mask read);
the stage's default (``auto``) is its last step.
Stage 2 (:meth:`CUTS.segment`, per image): diffusion condensation of the L2-normalised pixel embeddings gives label
maps from fine to coarse (``transforms.condensation``).

Choosing a segmentation from the hierarchy. The paper picks the cluster (and, for "best one", the granularity)
*with the ground truth*; we report that as the oracle and add a label-free rule: the level with the highest
silhouette among those with 2…``max_clusters`` clusters, and as foreground the cluster covering 1–60 % of the
image whose pixels lie closest to the image centre on average (a centre prior; our choice, stated as such). The
official code's label-free "persistent" map, one map from the whole hierarchy, is
``transforms.condensation.persistent_label(levels)``; the centre prior applies to it the same way.

Departures: the anchors are re-drawn at every step (the official sampler re-seeds on each call, fixing them for
the whole run); the fallback positive is a distinct pixel (the official one aliases the anchor, z_a = z_p);
condensation runs on embeddings average-pooled to at most ``condense_size``² pixels and its labels are upsampled
(exact pairwise affinities on 10⁴–10⁵ pixels do not fit a CPU budget); the per-patch SSIM of a multi-channel
image uses one window over all channels (the official skimage call averages per-channel SSIMs); the hierarchy
is our own diffusion condensation, not multiscale PHATE, with more levels (``transforms.condensation`` says how
and what it costs at parity; stage 1 matches the official one, ``benchmarks/parity_cuts.py``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..backbones import FeatureTap, get_head
from ..transforms.condensation import diffusion_condensation, silhouette
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements


def patch_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | torch.Tensor | None = None) -> torch.Tensor:
    """SSIM of patch pairs (…, C, P, P) from each patch's own mean, variance and covariance (one window).

    As the official ``range_aware_ssim`` (skimage ``structural_similarity``, whose default 7×7 window is cut to the
    5×5 patch, so one window): the data range is the *first* (anchor) patch's own max − min, 1 where that patch is
    flat, and the (co)variances are the sample ones (÷ (N − 1)). ``data_range`` overrides the range."""
    dims = (-3, -2, -1)
    if data_range is None:
        data_range = a.amax(dims) - a.amin(dims)
        data_range = torch.where(data_range > 0, data_range, torch.ones_like(data_range))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    count = a.shape[-3] * a.shape[-2] * a.shape[-1]
    ma, mb = a.mean(dims), b.mean(dims)
    va, vb = a.var(dims, unbiased=True), b.var(dims, unbiased=True)
    cov = ((a - ma[..., None, None, None]) * (b - mb[..., None, None, None])).sum(dims) / (count - 1)
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def patches_at(x: torch.Tensor, yx: torch.Tensor, size: int) -> torch.Tensor:
    """The size×size patches of images ``x`` (N, C, H, W) centred at ``yx`` (N, K, 2) → (N, K, C, size, size)."""
    r = size // 2
    off = torch.arange(-r, r + 1, device=x.device)
    ys = (yx[..., 0, None] + off)[..., :, None].expand(*yx.shape[:2], size, size)
    xs = (yx[..., 1, None] + off)[..., None, :].expand(*yx.shape[:2], size, size)
    n = torch.arange(len(x), device=x.device)[:, None, None, None]
    return x.permute(0, 2, 3, 1)[n, ys, xs].permute(0, 1, 4, 2, 3)


def sample_pairs(x: torch.Tensor, anchors: int, patch: int, tries: int = 20, threshold: float = 0.5,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and positive pixel coordinates (N, S, 2) per image (CUTS patch sampler, see module doc)."""
    n, _, h, w = x.shape
    r = patch // 2
    if h < patch + 2 or w < patch + 2:
        raise ValueError(f"CUTS needs images larger than its {patch}×{patch} patches (+1 pixel of room); got {h}×{w}")
    dev = x.device
    lo, hi = torch.tensor([r, r], device=dev), torch.tensor([h - r - 1, w - r - 1], device=dev)
    a = lo + (torch.rand(n, anchors, 2, device=dev, generator=generator) * (hi - lo + 1)).long()
    cand = a[:, :, None] + torch.randint(-patch, patch + 1, (n, anchors, tries, 2), device=dev, generator=generator)
    cand = torch.maximum(torch.minimum(cand, hi), lo)
    pa = patches_at(x, a, patch)[:, :, None]
    pc = patches_at(x, cand.flatten(1, 2), patch).unflatten(1, (anchors, tries))
    ok = (patch_ssim(pa, pc) > threshold) & (cand != a[:, :, None]).any(-1)
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full_like(ok[..., 0], -1, dtype=torch.long))
    diagonal = torch.where(a < hi, a + 1, a - 1)  # a distinct neighbour, never the anchor itself
    chosen = cand.gather(2, first.clamp_min(0)[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    return a, torch.where((first >= 0)[..., None], chosen, diagonal)


def nt_xent(za: torch.Tensor, zp: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent per image over the 2S rows [z_a; z_p] (N, S, L): positive = the partner row, negatives = every other
    row; mean over rows and images."""
    z = F.normalize(torch.cat([za, zp], 1).float(), dim=-1)
    s = za.shape[1]
    sim = (z @ z.transpose(1, 2) / temperature).masked_fill(torch.eye(2 * s, dtype=torch.bool, device=z.device), -1e9)
    partner = (torch.arange(2 * s, device=z.device) + s) % (2 * s)
    return F.cross_entropy(sim.flatten(0, 1), partner.repeat(len(z)))


@register_strategy("cuts")
class CUTS(Strategy):
    """Stage 1 of CUTS (see module doc): intra-image patch contrast + patch reconstruction, no labels."""

    # intensity: x·2 − 1 to [-1, 1], as the paper
    # spatial_dims: 2D networks and 2D pairs
    requires = Requirements(streams=('unlabeled',), labels='none', role='pretrainer', intensity='unit',
                            spatial_dims=(2,))

    class Config(StrategyConfig):
        lambda_contrastive: float = Field(0.001, ge=0, le=1)  #: λ
        patch: int = Field(5, ge=3)  #: P (odd)
        anchors: int = Field(8, ge=2)  #: S
        tries: int = Field(20, ge=1)
        ssim_threshold: float = 0.5
        temperature: float = Field(0.1, gt=0)
        condense_size: int = Field(48, ge=8)  #: stage 2 runs on embeddings pooled to at most this many pixels a side
        max_clusters: int = Field(10, ge=2)

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        if self.config.patch % 2 == 0:
            raise ValueError(f"cuts: patch must be odd, got {self.config.patch}")
        self.tap = FeatureTap(model)
        latent = get_head(model).in_channels
        channels = self.in_channels
        out = channels * self.config.patch ** 2
        self.recon = nn.Sequential(nn.Linear(latent, out), nn.LeakyReLU(), nn.Linear(out, out))

    def trainable_parameters(self):
        return super().trainable_parameters() + list(self.recon.parameters())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings (N, L, H, W) of images already scaled to [−1, 1] (as the paper)."""
        with self.tap:
            self.model(x)
            z = self.tap["decoder"]
        if z.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"cuts needs a full-resolution embedding; the backbone's decoder map is {tuple(z.shape)}")
        return z

    def training_step(self, batch, step):
        x = batch["unlabeled"]["image"] * 2 - 1
        c = self.config
        a, p = sample_pairs(x, c.anchors, c.patch, c.tries, c.ssim_threshold)
        z = self.embed(x)
        n = torch.arange(len(x), device=x.device)[:, None]
        emb = z.permute(0, 2, 3, 1)
        za, zp = emb[n, a[..., 0], a[..., 1]], emb[n, p[..., 0], p[..., 1]]
        loss_nce = nt_xent(za, zp, c.temperature)
        target = patches_at(x, a, c.patch).flatten(2)
        loss_recon = F.mse_loss(self.recon(za), target)
        loss = c.lambda_contrastive * loss_nce + (1 - c.lambda_contrastive) * loss_recon
        return StepOutput(loss, {"loss_nce": loss_nce.detach(), "loss_recon": loss_recon.detach()})

    @torch.no_grad()
    def validation_loss(self, batch):
        """L on held-out images: the official code keeps the checkpoint of lowest val loss (``select: val_loss``)."""
        return self.training_step(batch, -1).loss

    # -- stage 2 ------------------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, image: torch.Tensor) -> tuple[list[np.ndarray], int]:
        """Label maps (H, W) of one image (C, H, W) in [0, 1] at every condensation level, fine → coarse, and the
        index of the label-free level: the highest silhouette among levels with 2…``max_clusters`` clusters."""
        h, w = image.shape[-2:]
        z = self.embed(image[None] * 2 - 1)
        factor = max(1, int(np.ceil(max(h, w) / self.config.condense_size)))
        z = F.avg_pool2d(z, factor, ceil_mode=True) if factor > 1 else z
        gh, gw = z.shape[-2:]
        points = z[0].flatten(1).t().cpu()
        levels = diffusion_condensation(points)
        scores = [(silhouette(points, lab), i) for i, lab in enumerate(levels)
                  if 2 <= len(np.unique(lab)) <= self.config.max_clusters]
        chosen = max(scores)[1] if scores else len(levels) - 1
        up = lambda lab: F.interpolate(torch.from_numpy(lab.reshape(gh, gw)).float()[None, None], size=(h, w),
                                       mode="nearest")[0, 0].long().numpy()
        return [up(lab) for lab in levels], chosen


def centre_cluster(labels: np.ndarray, min_area: float = 0.01, max_area: float = 0.6) -> np.ndarray:
    """Label-free foreground: the cluster covering ``min_area``…``max_area`` of the image whose pixels are closest
    to the image centre on average (a centre prior); all-background if no cluster qualifies."""
    h, w = labels.shape
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w)
    best, best_d = None, np.inf
    for k in np.unique(labels):
        m = labels == k
        if min_area <= m.mean() <= max_area and dist[m].mean() < best_d:
            best, best_d = k, dist[m].mean()
    return labels == best if best is not None else np.zeros_like(labels, bool)


def oracle_cluster(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The paper's ``label_hint_seg`` (uses the ground truth): the cluster holding the most foreground pixels."""
    ids, counts = np.unique(labels[truth > 0], return_counts=True)
    return labels == ids[counts.argmax()] if len(ids) else np.zeros_like(labels, bool)
