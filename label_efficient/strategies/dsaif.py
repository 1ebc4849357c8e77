"""DSAIF: dual structure-aware image filterings with mutual supervision (Gu et al., MedIA 2024, arXiv 2312.07264).

Per step, with two independently initialised networks f₁, f₂:
  1. Per sample: with p = 1 − p_filter both views are the raw image; otherwise A = Max-tree filtered and
     B = Min-tree filtered, or the families swapped (p = ½ each). Only a filtered pair is augmented, as the
     official code does inside its filter (``tree_process_3D_higra_final``, one call per view): each view on its
     own is gamma-contrasted with p = ½ (γ ~ U(0.5, 1.5), drawn per view, in its min-max range), and view B is
     rotated by k·90°, k ~ U{0…3} (semi.py draws the angle in the filtered branch only; raw pairs keep k = 0).
  2. f₁ sees view A, f₂ sees view B; each network runs one pass on the labelled and another on the unlabelled
     images (main3D.py), so BN normalises them with their own batch statistics; f₂'s outputs are rotated back by
     −k·90°.
  3. ŷ₁ = argmax f₁(A_u), ŷ₂ = argmax f₂(B_u) (detached, no threshold).
  4. L = [L_s(1) + λ(t)·CE(f₁(A_u), ŷ₂)] + [L_s(2) + λ(t)·CE(f₂(B_u), ŷ₁)],  L_s = ½(CE + Dice),
     λ(t) = λ_max·exp(−5(1 − t/T)²) (sigmoid ramp-up, reaching λ_max at T).
The tree filters (area < 50 pruned, then sibling-less nodes removed; ``transforms.tree_filter``) are computed once
per image by the data pipeline (``image_transform``) and delivered as channels [raw, max, min] (``TreeViews``).
The ramp is expressed as a fraction of the run (spec: full at 6k of 15k iterations = 0.4), smooth where the official
ramp is a staircase (``sigmoid_rampup(iter // 150, 40)``, main3D.py 195: constant over each 150 iterations; same
start and end). Optional Bézier intensity remap (the paper-era pipeline): ``bezier_p``.

Departures:

* **The filter runs on the whole image (volume), the official one on each training crop** (semi.py 149–153 crops,
  225–252 filters): a connected filter does not commute with cropping (areas and siblings are those of the crop
  there; on a 40² toy, 64 of a 20² crop's pixels differ), so in 3D our views are the volume's filtered structure
  seen through the crop. Kept so that the trees are built once per case instead of once per crop and step (a
  1M-voxel tree per view per step on the CPU). 2D slices are not cropped: there only the augmentation's
  interpolated ±20° rotation, applied after the filter, separates the two orders.
* Gamma is applied to the cached filtered views, where the official code applies it before the uint8 quantisation
  and the filter (the filter commutes with monotone maps, so they differ only by quantisation; the quantisation
  floors as the official ``astype(np.uint8)``, see ``transforms.tree_filter``), and its curve spans each crop's own
  min–max where the official one spans the volume's (semi.py 212–220): equal when the crop holds both extremes.
* The rotation plane is the first square pair of spatial axes, and f₂'s output is rotated back in the same plane.
  The official LA branch rotates its crop in the (X, Y) plane (semi.py 232–233 transposes before
  ``np.rot90(axes=(1, 2))``) as we do, but rotates f₂'s output back with torchvision in the last two axes, (Y, Z)
  (main3D.py 183, 187): a bug we do not copy (its Pancreas branch, 96³ without the transpose, is consistent).
  The official 2D path never rotates (its angle is drawn under ``random() > 1``, dead code):
  ``rotate_view_b: false`` reproduces it, we keep the 3D code's rotation in 2D too.
* The official code keeps each network's best checkpoint on its test list and reports both (main3D.py 242–262);
  ours predicts with ``predict_with`` (net1 by default) and selects on val like every strategy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import ce_dice, sigmoid_rampup, supervised_loss
from ..transforms.rotate import rotate_quarter, rotation_dims
from ..transforms.tree_filter import TreeViews
from ..utils import class_map, mean_probs_as_logits
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .ema import reinitialised
from .requirements import Requirements


def in_unit_range(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an intensity map ``fn`` defined on [0, 1] to ``x``, per sample and channel, keeping its range."""
    dims = tuple(range(2, x.ndim))
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8)
    return lo + scale * fn((x - lo) / scale)


def bezier_remap(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random monotone cubic Bézier intensity curve on [0, 1] per sample (Models Genesis-style remap)."""
    n = x.shape[0]
    p1, p2 = torch.rand(n, 2, generator=generator), torch.rand(n, 2, generator=generator)
    t = torch.linspace(0, 1, 256)
    bx = 3 * (1 - t) ** 2 * t * p1[:, :1] + 3 * (1 - t) * t**2 * p2[:, :1] + t**3  # (n, 256), monotone in t
    by = 3 * (1 - t) ** 2 * t * p1[:, 1:] + 3 * (1 - t) * t**2 * p2[:, 1:] + t**3
    by = torch.cummax(by, dim=1).values  # keep the curve monotone: it must not swap bright and dark
    out = torch.empty_like(x)
    flat = x.reshape(n, -1)
    for i in range(n):
        idx = torch.searchsorted(bx[i].contiguous().to(x.device), flat[i].contiguous()).clamp(0, 255)
        out[i] = by[i].to(x.device)[idx].reshape(x.shape[1:])
    return out


class DSAIFConfig(StrategyConfig):
    area_threshold: int = 50  #: tree nodes with fewer pixels/voxels are pruned
    p_filter: float = 0.5  #: probability that a sample gets the filtered (rather than raw) pair of views
    lambda_max: float = 1.0  #: λ_max of the cross pseudo-label loss
    rampup_fraction: float = 0.4  #: λ reaches λ_max at this fraction of the stage (6k of 15k iterations)
    gamma_p: float = 0.5  #: probability of gamma contrast, γ ~ U(gamma_range)
    gamma_range: tuple[float, float] = (0.5, 1.5)
    rotate_view_b: bool = True  #: rotate view B by k·90° and undo it before the losses
    bezier_p: float = 0.0  #: probability of the optional monotone Bézier intensity remap (paper-era pipeline)
    predict_with: str = "net1"  #: net1 | net2 | mean (the official code evaluates each network separately)


@register_strategy("dsaif")
class DSAIF(Strategy):
    """Two networks on Max-/Min-tree filtered views supervise each other with hard pseudo labels."""

    Config = DSAIFConfig
    requires = Requirements(streams=('labeled', 'unlabeled'))

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        if self.config.predict_with not in ("net1", "net2", "mean"):
            raise ValueError(f"predict_with must be net1, net2 or mean, got {self.config.predict_with!r}")
        self.model2 = reinitialised(model)
        self.loss_fn = ce_dice()

    def image_transform(self):
        return TreeViews(self.config.area_threshold)

    def lam(self, step: int) -> float:
        c = self.config
        return c.lambda_max * sigmoid_rampup(step, c.rampup_fraction * max(self.total_steps, 1))

    def trainable_parameters(self):
        return [p for p in list(self.model.parameters()) + list(self.model2.parameters()) if p.requires_grad]

    def make_views(self, x: torch.Tensor):
        """Split [raw | max | min] channels into (A, B, tag) per sample; tag 0 raw, 1 max/min, 2 min/max."""
        c = self.config
        if x.shape[1] % 3:
            raise ValueError(f"DSAIF expects [raw, max, min] channel triples from its image_transform, got "
                             f"{x.shape[1]} channels")
        raw, mx, mn = x.chunk(3, dim=1)
        n = x.shape[0]
        bshape = (n,) + (1,) * (x.ndim - 1)
        filtered = torch.rand(n, device=x.device) < c.p_filter
        max_first = torch.rand(n, device=x.device) < 0.5
        tag = torch.where(filtered, torch.where(max_first, 1, 2), 0)
        a = torch.where((tag == 1).view(bshape), mx, torch.where((tag == 2).view(bshape), mn, raw))
        b = torch.where((tag == 1).view(bshape), mn, torch.where((tag == 2).view(bshape), mx, raw))
        def gamma():  # per view; only a filtered pair is contrasted (the official filter function draws it)
            g = torch.empty(n, device=x.device).uniform_(*c.gamma_range)
            on = (torch.rand(n, device=x.device) < c.gamma_p) & filtered
            return torch.where(on, g, torch.ones_like(g)).view(bshape)

        gamma_a, gamma_b = gamma(), gamma()
        bezier = c.bezier_p > 0 and bool(torch.rand(()) < c.bezier_p)
        remap = lambda g: (lambda u: bezier_remap(u.clamp(0, 1) ** g) if bezier else u.clamp(0, 1) ** g)
        return in_unit_range(remap(gamma_a), a), in_unit_range(remap(gamma_b), b), tag

    def view_b_turns(self, shape: torch.Size, tag: torch.Tensor) -> torch.Tensor:
        """Quarter turns k of view B per sample: k ~ U{0…3} for a filtered pair, 0 for a raw one (half turns only
        where the rotation plane is not square)."""
        k = torch.randint(0, 4, (shape[0],), device=tag.device)
        k = torch.where((tag > 0) & self.config.rotate_view_b, k, torch.zeros_like(k))
        dims = rotation_dims(tuple(shape[2:]))
        return k if shape[dims[0]] == shape[dims[1]] else (k % 2) * 2

    def training_step(self, batch, step):
        lab, unl = batch["labeled"], batch["unlabeled"]
        n_l = lab["image"].shape[0]
        a, b, tag = self.make_views(torch.cat([lab["image"], unl["image"]]))
        k = self.view_b_turns(a.shape, tag)
        dims = rotation_dims(tuple(a.shape[2:]))
        b = rotate_quarter(b, k, dims)
        # one pass per network for the labelled and one for the unlabelled images (official: BN statistics apart)
        logits1 = torch.cat([self.model(a[:n_l]), self.model(a[n_l:])])
        logits2 = rotate_quarter(torch.cat([self.model2(b[:n_l]), self.model2(b[n_l:])]), -k % 4, dims)  # common frame
        loss_s1 = supervised_loss(self.loss_fn, logits1[:n_l], lab["label"])
        loss_s2 = supervised_loss(self.loss_fn, logits2[:n_l], lab["label"])
        y1, y2 = class_map(logits1[n_l:].detach()), class_map(logits2[n_l:].detach())
        cps1 = F.cross_entropy(logits1[n_l:], y2)
        cps2 = F.cross_entropy(logits2[n_l:], y1)
        lam = self.lam(step)
        loss = loss_s1 + lam * cps1 + loss_s2 + lam * cps2
        logs = {"loss_s1": loss_s1.detach(), "loss_s2": loss_s2.detach(), "loss_cps1": cps1.detach(),
                "loss_cps2": cps2.detach(), "lambda": lam, "filtered_frac": (tag > 0).float().mean()}
        return StepOutput(loss, logs)

    @torch.no_grad()
    def predict(self, x):
        if self.config.predict_with == "net1":
            return self.model(x)
        if self.config.predict_with == "net2":
            return self.model2(x)
        return mean_probs_as_logits([self.model(x).softmax(1), self.model2(x).softmax(1)])
