"""SDC-UDA: slice-direction-continuous volumetric UDA (Shin, Kim et al., CVPR 2023; spec ``sdc_uda.md``).

Labelled source volumes, unlabelled target volumes (``data.labeled_domain: source``, ``data.domain: target``), no
target label is ever read. Three stages, in a recipe (``recipes/acdc_sdc_uda.yaml``) or a plain loop:

Stage 1, ``sdc_uda_translate`` (official code, tag C). Per step, one 3-slice slab a from the source and b from the
target (``Stream.slab``; each slab min–max scaled to [-1, 1]; the slab's slices are the generator's batch axis):
  1. G_AB, G_BA (:class:`~..networks.slice_transformer.SliceGenerator`, the official ``Generator_shallow``):
     per-slice CNN (7×7 conv, two 3×3 convs at full resolution, stride-2 conv) → overlapping patch embedding (k3, s2)
     → transformer blocks whose bias-free attention is *intra-slice* (over the positions of a slice, keys/values
     spatially reduced ×2) + *inter-slice* (over the slab's slices at each position), summed → MLP with a
     depthwise-separable conv → decoder (two transposed convs back to full resolution, skip-concat with the
     full-resolution stem output, two 3×3 convs, 7×7 conv → 1×1 conv → tanh).
  2. Generator step: L_G = Σ_dirs softplus(−D(G(x))) + 3·L1(cycle) + 1·L1(identity); then the EMA copies
     (decay 0.5^(32/10000)).
  3. Discriminator step: softplus(−D(real)) + softplus(D(fake)), fakes from a 50-slab history pool; every 12th
     step the lazy R1 penalty γ/2·12·‖∇D(real)‖² (γ = 10), the squared gradient summed over every pixel of the slab
     (all 3 slices: one slab is the official batch of 1). D: four 4×4 stride-2 convs + InstanceNorm + LeakyReLU 0.2,
     1×1 conv, spatial mean: one logit per slice.
  4. After training (``generate``): each labelled source volume is translated with the EMA G_AB by a sliding
     3-slice window (each window min–max scaled), keeping the centre slice, rescaled to the source volume's intensity
     range; the source labels stay exact. Later stages read the pairs through ``data.synthetic``.
Stage 2 (paper, tag P): teacher = ``supervised`` (Dice + CE) on the translated source (``data.synthetic: {from_stage:
  translate, ratio: 1.0}``).
Stage 3, ``sdc_uda_self_train`` (P; code not released): per round, the frozen teacher predicts the real target
  images; pseudo label ŷ = argmax, uncertainty = softmax entropy / ln C; :func:`refine_pseudo_labels` keeps the confident
  voxels and relabels uncertain ones by intensity (sensitivity: add those touching structure c inside c's intensity
  range; specificity: remove those of c outside it); the student learns Dice + CE on the translated source plus the
  masked Dice + CE on the refined target labels. ``rounds`` rounds, the student becoming the next round's teacher.

Departures, each for a reason:
* Sizes are CPU-sized (config ``width``, ``dim``, ``blocks``, ``heads``; the paper: 32/64/128 channels, 4 blocks, 8
  heads, 256², 100k iterations); the recipes say how far below.
* The lazy R1 penalty is added to that step's discriminator loss instead of a separate optimizer step (the loop steps
  each optimizer once per training step); the gradient is the same sum.
* Pseudo labels are computed on the fly from the round's frozen teacher on the student's (augmented) batch, instead of
  predicting and storing the target volumes once per round: the same teacher and refinement, no files. The intensity
  range of structure c is the ``intensity_quantiles`` of the image's confident c voxels (thresholds unreleased: all
  configurable, spec pitfall). "Touching" is the 3×3 (2D) / 3×3×3 (3D) neighbourhood.
* On 2D datasets (ACDC here) the segmenter is the recipe's 2D backbone evaluated per volume, not a 3D nnU-Net: ACDC
  volumes have 6–18 slices ~10 mm apart. The translation stays 2.5D, the part that gives slice continuity.
* The student starts from the teacher and keeps training across rounds (whether the paper re-initialises it is not
  verified).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import ce_dice, supervised_loss
from ..networks.slice_transformer import SliceDiscriminator, SliceGenerator
from ..utils import class_map
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .ema import ema_update, make_teacher
from .replay import ImagePool
from .requirements import Requirements


def to_unit_range(slab: torch.Tensor) -> torch.Tensor:
    """Min–max scale one slab to [-1, 1] (a constant slab becomes −1)."""
    lo, hi = slab.min(), slab.max()
    return (slab - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1


@register_strategy("sdc_uda_translate")
class SDCUDATranslate(Strategy):
    """Stage 1: unpaired source → target translation of 3-slice slabs; writes the translated labelled source."""

    # labeled stream: source slabs (their labels are not used by the GAN; they stay with the translated images)
    # unlabeled stream: target slabs
    # spatial_dims: 2D networks and 2D pairs
    requires = Requirements(streams=('labeled', 'unlabeled'), role='generator', spatial_dims=(2,),
                            optimizers=('generator', 'discriminator'), generates_volumes=True)

    class Config(StrategyConfig):
        slab: int = 3  #: slices per slab (C)
        channels: int | None = None  #: image channels; None: the backbone's input channels
        width: int = 16  #: CNN channels (C: 32)
        dim: int = 32  #: transformer channels (C: 128)
        blocks: int = 1  #: transformer blocks (C: 4)
        heads: int = 4  #: attention heads (C: 8)
        mlp_ratio: int = 4  #: (C)
        reduction: int = 2  #: intra-slice key/value reduction (C)
        inter_slice: bool = True  #: False: an ablation without slice exchange (a 2D translator)
        disc_width: int = 16  #: discriminator channels (C: 64)
        cycle_weight: float = 3.0  #: (C)
        identity_weight: float = 1.0  #: (C)
        r1_gamma: float = 10.0  #: (C)
        r1_every: int = 12  #: lazy R1 period (C)
        ema_decay: float = 0.5 ** (32 / 10000)  #: (C)
        pool_size: int = 50  #: history pool (C)

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        c = self.config
        if c.slab < 1 or c.slab % 2 == 0:
            raise ValueError(f"sdc_uda_translate: slab must be odd (centre ± neighbours), got {c.slab}")
        self.channels = c.channels or self.in_channels
        make = lambda: SliceGenerator(self.channels, c.width, c.dim, c.blocks, c.heads, c.mlp_ratio, c.reduction,
                                      c.inter_slice)
        self.g_ab, self.g_ba = make(), make()
        self.d_a, self.d_b = SliceDiscriminator(self.channels, c.disc_width), SliceDiscriminator(self.channels, c.disc_width)
        self.g_ab_ema, self.g_ba_ema = make_teacher(self.g_ab), make_teacher(self.g_ba)
        self.pool_a, self.pool_b = ImagePool(c.pool_size), ImagePool(c.pool_size)  # one slab a sample

    def stream_options(self):
        return {"labeled": {"slab": self.config.slab}, "unlabeled": {"slab": self.config.slab}}

    def handover_parts(self):
        return []  # the segmenter is untouched here: the next stage keeps its own initialisation

    def trainable_parameters(self):
        return {"generator": list(self.g_ab.parameters()) + list(self.g_ba.parameters()),
                "discriminator": list(self.d_a.parameters()) + list(self.d_b.parameters())}

    def _slab(self, images: torch.Tensor, stream: str) -> torch.Tensor:
        """The batch's one slab ``(1, k·C, H, W)`` as the generator's ``(k, C, H, W)``, scaled to [-1, 1]."""
        k = self.config.slab
        if images.shape[0] != 1 or images.shape[1] != k * self.channels:
            raise ValueError(f"sdc_uda_translate takes one {k}-slice slab per stream and step (the generator's batch "
                             f"axis is the slice axis): set batch_size {{labeled: 1, unlabeled: 1}}; got {stream} "
                             f"images of shape {tuple(images.shape)}, expected (1, {k * self.channels}, H, W)")
        return to_unit_range(images[0].unflatten(0, (k, self.channels)))

    def _disc_loss(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor, r1: bool):
        real = real.detach().requires_grad_(r1)
        out_real = d(real)
        loss = F.softplus(-out_real).mean() + F.softplus(d(fake)).mean()
        if not r1:
            return loss, torch.zeros(())
        grad, = torch.autograd.grad(out_real.sum(), real, create_graph=True)
        penalty = grad.pow(2).sum()  # summed over the pixels of all the slab's slices: one slab = a batch of 1 (C)
        return loss + self.config.r1_gamma / 2 * self.config.r1_every * penalty, penalty.detach()

    def training_step(self, batch, step):
        c = self.config
        a, b = self._slab(batch["labeled"]["image"], "labeled"), self._slab(batch["unlabeled"]["image"], "unlabeled")
        # generator step: adversarial + cycle + identity, both directions
        for p in self.trainable_parameters()["discriminator"]:
            p.requires_grad_(False)
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        adv = F.softplus(-self.d_b(fake_b)).mean() + F.softplus(-self.d_a(fake_a)).mean()
        cycle = F.l1_loss(self.g_ba(fake_b), a) + F.l1_loss(self.g_ab(fake_a), b)
        identity = F.l1_loss(self.g_ab(b), b) + F.l1_loss(self.g_ba(a), a)
        loss_g = adv + c.cycle_weight * cycle + c.identity_weight * identity
        self.optimizer_step("generator", loss_g)
        for ema, net in ((self.g_ab_ema, self.g_ab), (self.g_ba_ema, self.g_ba)):
            ema_update(ema, net, c.ema_decay, buffers=False, lerp=True)  # parameters only
        # discriminator step: real vs pooled fakes, lazy R1 every r1_every steps
        for p in self.trainable_parameters()["discriminator"]:
            p.requires_grad_(True)
        r1 = c.r1_every > 0 and step % c.r1_every == 0
        loss_da, r1_a = self._disc_loss(self.d_a, a, self.pool_a(fake_a[None])[0], r1)
        loss_db, r1_b = self._disc_loss(self.d_b, b, self.pool_b(fake_b[None])[0], r1)
        loss_d = loss_da + loss_db
        self.optimizer_step("discriminator", loss_d)
        return StepOutput(loss_g.detach() + loss_d.detach(),
                          {"loss_g_adv": adv.detach(), "loss_cycle": cycle.detach(), "loss_identity": identity.detach(),
                           "loss_d": loss_d.detach(), "r1": (r1_a + r1_b).item() if r1 else float("nan")})

    @torch.no_grad()
    def translate_volume(self, volume: torch.Tensor, generator: nn.Module | None = None) -> torch.Tensor:
        """``(Z, C, H, W) -> (Z, C, H, W)``: a sliding slab (edge slices repeated), each window min–max scaled, the
        centre output kept and rescaled to the input volume's intensity range (EMA G_AB by default)."""
        g = (generator or self.g_ab_ema).eval()
        k, z = self.config.slab, volume.shape[0]
        lo, hi = volume.min(), volume.max()
        out = []
        for i in range(z):
            window = volume[[min(max(i + d, 0), z - 1) for d in range(-(k // 2), k // 2 + 1)]]
            out.append(g(to_unit_range(window))[k // 2])
        return (torch.stack(out) + 1) / 2 * (hi - lo) + lo

    @torch.no_grad()
    def generate(self, image: torch.Tensor, label: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        """One translated volume ``(1, Z, C, H, W)`` per labelled source volume (``image`` (Z, C, H, W)); 3D
        ``(C, X, Y, Z)`` volumes are translated along their last axis."""
        if n != 1:
            raise ValueError(f"sdc_uda_translate translates deterministically: one image per case, not {n} variants")
        device = next(self.g_ab_ema.parameters()).device
        if image.ndim == 4 and label.ndim == 3 and image.shape[0] == label.shape[0]:  # 2D slices stacked (Z, C, H, W)
            return self.translate_volume(image.to(device)).cpu()[None]
        return self.translate_volume(image.to(device).permute(3, 0, 1, 2)).permute(1, 2, 3, 0).cpu()[None]


# -- stages 2–3: pseudo-label refinement and self-training ------------------------------------------
@torch.no_grad()
def refine_pseudo_labels(intensity: torch.Tensor, probs: torch.Tensor, threshold: float,
                         quantiles: tuple[float, float] = (0.05, 0.95), sensitivity: bool = True,
                         specificity: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncertainty-filtered, intensity-refined pseudo labels.

    ``intensity`` (N, *S), ``probs`` (N, C, *S) softmax. Uncertainty u = entropy / ln C; confident: u ≤ ``threshold``.
    ŷ = argmax. For each foreground class c and image, the intensity range of c is the ``quantiles`` of its confident
    voxels' intensities; among the uncertain voxels, sensitivity labels c those touching ŷ = c (3^d neighbourhood)
    whose intensity is in c's range, specificity labels background those of ŷ = c outside it (first decision wins).
    Returns (label (N, *S) long, weight (N, *S) float): weight 1 on confident and on relabelled voxels, 0 on the
    uncertain voxels left as they were."""
    num_classes = probs.shape[1]
    uncertainty = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1) / math.log(num_classes)
    confident = uncertainty <= threshold
    pseudo = class_map(probs)
    label, changed = pseudo.clone(), torch.zeros_like(confident)
    pool = F.max_pool2d if probs.ndim == 4 else F.max_pool3d
    q = torch.tensor(quantiles, dtype=intensity.dtype, device=intensity.device)
    for c in range(1, num_classes):
        struct = pseudo == c
        touching = pool(struct[:, None].float(), 3, 1, 1)[:, 0].bool() & ~struct
        for n in range(probs.shape[0]):
            ref = intensity[n][struct[n] & confident[n]]
            if ref.numel() == 0:  # no confident voxel of c in this image: no range to refine with
                continue
            lo, hi = torch.quantile(ref.float(), q).to(intensity.dtype)
            in_range = (intensity[n] >= lo) & (intensity[n] <= hi)
            free = ~confident[n] & ~changed[n]
            if sensitivity:
                add = free & touching[n] & in_range
                label[n][add], changed[n] = c, changed[n] | add
            if specificity:
                remove = free & ~add if sensitivity else free
                remove = remove & struct[n] & ~in_range
                label[n][remove], changed[n] = 0, changed[n] | remove
    return label, (confident | changed).float()


@register_strategy("sdc_uda_self_train")
class SDCUDASelfTrain(Strategy):
    """Stages 2–3: teacher → student rounds on translated source + refined pseudo-labelled real target."""

    # labeled stream: translated source pairs (data.synthetic)
    # unlabeled stream: real target images, never labelled
    requires = Requirements(streams=('labeled', 'unlabeled'))

    class Config(StrategyConfig):
        rounds: int = 2  #: teacher → student rounds within the stage (P: "a few")
        uncertainty_threshold: float = 0.5  #: normalised entropy above which a voxel is uncertain (R)
        intensity_quantiles: tuple[float, float] = (0.05, 0.95)  #: a structure's intensity range (R)
        sensitivity: bool = True
        specificity: bool = True
        target_weight: float = 1.0  #: weight of the pseudo-labelled target loss (R)

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        if self.config.rounds < 1:
            raise ValueError(f"sdc_uda_self_train: rounds must be ≥ 1, got {self.config.rounds}")
        self.loss_fn = ce_dice()
        self.teacher = make_teacher(model)
        self.register_buffer("round", torch.zeros((), dtype=torch.long))

    def round_of(self, step: int) -> int:
        return min(step * self.config.rounds // max(self.total_steps, 1), self.config.rounds - 1)

    def training_step(self, batch, step):
        c = self.config
        r = self.round_of(step)
        if r > int(self.round):  # the student becomes the teacher of the next round
            self.teacher.load_state_dict(self.model.state_dict())
            self.round.fill_(r)
        self.teacher.eval()  # the loop puts every module in train mode at each epoch
        lab, u = batch["labeled"], batch["unlabeled"]["image"]
        with torch.no_grad():
            pseudo, weight = refine_pseudo_labels(u.mean(1), self.teacher(u).float().softmax(1), c.uncertainty_threshold,
                                                  tuple(c.intensity_quantiles), c.sensitivity, c.specificity)
        logits = self.model(torch.cat([lab["image"], u]))
        n = lab["image"].shape[0]
        loss_src = supervised_loss(self.loss_fn, logits[:n], lab["label"])
        loss_tgt = supervised_loss(self.loss_fn, logits[n:], pseudo, weight)
        loss = loss_src + c.target_weight * loss_tgt
        return StepOutput(loss, {"loss_source": loss_src.detach(), "loss_target": loss_tgt.detach(),
                                 "kept_fraction": weight.mean().item(), "round": float(r)})
