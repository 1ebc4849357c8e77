"""CycleGAN pseudo labels + noise-robust iterative learning (Wang et al., IEEE TMI 2021; spec
``cyclegan_pseudo_labels.md``). No training image is labelled: the stage sees the unlabelled train images and an
unpaired stream of auxiliary masks (``data.aux_masks``: a shape model or another dataset's masks).

Stage A, steps [0, ``gan_steps``), one unlabelled image batch x and one unpaired mask batch m (one-hot) per step:

1. m̂ = G_s(x): a U-Net generator; softmax(logits / T) of its head applied to the last decoder features f;
   **DGCC**: z = μ of D_m's encoder for the first m̂, channel weights c = σ(MLP(z)), m̂ = softmax(head(f·c) / T);
2. x̂ = G_i(m), the mask-to-image U-Net; the cycles G_i(m̂) ≈ x and G_s(x̂) ≈ m;
3. generators step: L_G = LSGAN_G(D_x(x̂)) + LSGAN_G(D_m(m̂)) + λ_cyc·(‖G_i(m̂) − x‖₁ + ‖G_s(x̂) − m‖₁) updates
   G_s, G_i and the DGCC MLP (not D_m, though the DGCC gradient passes through it);
4. discriminators step, fakes detached and drawn through image pools: L_D = LSGAN_D(D_x; x, x̂) +
   LSGAN_D(D_m; m, m̂) + L_VAE(m), D_x a PatchGAN, D_m the **VAE discriminator** (encoder → (μ, log σ²), decoder
   reconstructing the mask from z, real/fake head on μ); L_VAE = Dice (or BCE) reconstruction + β·KL(q(z|m) ‖ N(0, I)).

LSGAN: LSGAN_D = E[(D(real) − 1)²] + E[D(fake)²], LSGAN_G = E[(D(fake) − 1)²].

Stage B, the remaining steps split into ``rounds`` equal rounds; the segmenter S is the recipe's backbone (what
:meth:`predict` returns). Round r trains S on (x, ŷ_r) with the **noise-weighted Dice**
L_NWD = 1 − (2Σ w p ŷ + ε) / (Σ w (p + ŷ) + ε) per foreground class, w = 1 − |p̃ − ŷ| (detached), p̃ the EMA of S
(``weight_from: ema``) or the label source's own soft prediction (``previous``); ``weighting: none`` is plain Dice
(the ablation). ŷ_1 = argmax of the frozen G_s (with DGCC), ŷ_{r+1} = argmax of the frozen S_r, both cleaned to the
largest component per class with holes filled. Pseudo labels are computed on the fly for every batch from the
frozen label source (G_s instance-normed, S_r and the EMA in eval mode): deterministic, and they follow the
augmentation. Logged per step: ``round``, ``fg_fraction`` (of ŷ, to catch a
collapsing round), ``label_change`` = 1 − Dice(clean(argmax S), ŷ) (a running mean decides the stop rule).

Departures (reasons): a CPU step budget (``gan_steps``, a few thousand) instead of 200 epochs, its linear decay over
the last ``1 − gan_decay_from`` of Stage A as the 100 + 100 epochs; batches of several images (throughput); no
identity loss (image and mask have different channels, so G_i(x) is undefined); G_i has a linear output (intensity
scale agnostic) instead of tanh; D_m's real/fake head reads μ (deterministic scores), its decoder reconstructs at
16² then upsamples bilinearly (any image size), KL is averaged over latent units (so β = 1 does not swamp a
[0, 1] Dice at z = 128); S is fine-tuned from round to round (not re-initialised: one optimizer over the whole
stage); the stop rule compares S's current labels with ŷ_r by a running mean (0.9) instead of a full pass: when it
is below ``min_change`` at a round's end, the labels are not refreshed again. One component kept per class (the
multi-structure pitfall: set ``largest_component: false``). Hole filling runs with scipy on the host.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from pydantic import Field
from scipy import ndimage

from ..losses import noise_weighted_dice
from ..networks.gan import MaskGenerator, PatchDiscriminator, VAEDiscriminator
from ..transforms.components import largest_component_labels
from ..utils import class_map
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements
from .ema import ema_update, make_teacher
from .replay import ImagePool


# -- losses ---------------------------------------------------------------------------------------
def lsgan_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[(D(real) − 1)²] + E[D(fake)²]."""
    return ((real - 1) ** 2).mean() + (fake ** 2).mean()


def lsgan_g(fake: torch.Tensor) -> torch.Tensor:
    """E[(D(fake) − 1)²]."""
    return ((fake - 1) ** 2).mean()


def label_weights(reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """w = 1 − |p̃ − y| ∈ [0, 1], detached (reference p̃ and one-hot y: (N, K, *S))."""
    return (1 - (reference.detach() - target.to(reference.dtype)).abs()).clamp(0, 1)


def dice_overlap(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Mean foreground Dice of two label maps (1 when both are empty)."""
    out = []
    for k in range(1, num_classes):
        x, y = a == k, b == k
        s = x.sum() + y.sum()
        out.append(1.0 if s == 0 else float(2 * (x & y).sum() / s))
    return float(np.mean(out))


# -- pseudo-label cleaning --------------------------------------------------------------------------
def fill_holes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fill the holes of each foreground class of a label map (N, *S) (holes of class k become k)."""
    arr = labels.cpu().numpy()
    out = arr.copy()
    for n in range(arr.shape[0]):
        for k in range(1, num_classes):
            filled = ndimage.binary_fill_holes(arr[n] == k)
            out[n][filled & (arr[n] == 0)] = k
    return torch.from_numpy(out).to(labels.device)


def clean_labels(labels: torch.Tensor, num_classes: int, largest: bool = True, holes: bool = True) -> torch.Tensor:
    """The R post-processing of pseudo labels: keep the largest component per class, then fill holes."""
    if largest:
        labels = largest_component_labels(labels, num_classes)
    return fill_holes(labels, num_classes) if holes else labels


@register_strategy("cyclegan_pseudo_labels")
class CycleGANPseudoLabels(Strategy):
    """Stage A: CycleGAN image ↔ unpaired mask (VAE-D, DGCC); Stage B: rounds of noise-weighted Dice on its labels."""

    # labels none: no training label: every train image is unlabelled, fixed steps, no validation
    # spatial_dims: 2D networks and 2D pairs
    requires = Requirements(streams=('unlabeled', 'aux_masks'), labels='none', spatial_dims=(2,),
                            optimizers=('generators', 'discriminators', 'segmenter'))

    class Config(StrategyConfig):
        gan_steps: int = Field(2000, ge=1)  #: Stage A steps (CG: 200 epochs; CPU budget)
        gan_decay_from: float = Field(0.5, ge=0, le=1)  #: linear LR decay to 0 after this share of Stage A (CG)
        lambda_cyc: float = 10.0  #: λ_cyc (CG)
        pool_size: int = Field(50, ge=0)  #: image pool (CG)
        temperature: float = Field(0.5, gt=0)  #: softmax temperature of G_s: hard-ish masks (R, pitfall)
        generator_features: list[int] = [16, 16, 32, 64, 128, 16]  #: BasicUNet widths of G_s and G_i (R)
        discriminator_width: int = 32  #: first width of D_x and D_m (R)
        patch_layers: int = 3  #: PatchGAN stride-2 layers (CG)
        latent: int = 128  #: z of the VAE discriminator (R)
        vae_beta: float = 1.0  #: β of KL(q(z|m) ‖ N(0, I)) (R)
        vae_recon: Literal["dice", "bce"] = "dice"  #: reconstruction term of L_VAE (R)
        dgcc: bool = True  #: discriminator-guided channel recalibration of G_s (A/R)
        rounds: int = Field(2, ge=1)  #: Stage B rounds (R: 2–3)
        weighting: Literal["nwd", "none"] = "nwd"  #: noise-weighted Dice, or plain Dice (ablation)
        weight_from: Literal["ema", "previous"] = "ema"  #: p̃ of w = 1 − |p̃ − ŷ| (R)
        ema_decay: float = Field(0.99, ge=0, lt=1)  #: EMA of S for p̃ (R)
        largest_component: bool = True  #: keep the largest component per class (R)
        fill_holes: bool = True  #: fill holes of the pseudo labels (R)
        min_change: float = Field(0.01, ge=0)  #: stop re-labelling when the labels change by < this (1 − Dice) (R)
        smooth: float = 1e-5  #: ε of L_NWD

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        c, in_ch = self.config, self.in_channels
        if len(c.generator_features) != 6:
            raise ValueError(f"cyclegan_pseudo_labels: generator_features takes 6 BasicUNet widths, got "
                             f"{c.generator_features}")
        self.g_s = MaskGenerator(in_ch, num_classes, c.generator_features, c.latent, c.temperature, c.dgcc)
        self.g_i = BasicUNet(2, num_classes, in_ch, features=tuple(c.generator_features))
        self.d_x = PatchDiscriminator(in_ch, c.discriminator_width, c.patch_layers)
        self.d_m = VAEDiscriminator(num_classes, c.discriminator_width, c.latent)
        self.pool_x, self.pool_m = ImagePool(c.pool_size), ImagePool(c.pool_size)
        self.teacher = make_teacher(model)  # S_r, frozen: the label source of round r + 1
        self.ema = make_teacher(model)  # p̃ of the noise weights
        self.register_buffer("round", torch.zeros((), dtype=torch.long))  # current round (0: Stage A)
        self.register_buffer("label_round", torch.zeros((), dtype=torch.long))  # 0: labels from G_s, r: from S_r
        self.register_buffer("change", torch.ones(()))  # running mean of label_change
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))  # re-labelling stopped (min_change)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        if total_steps <= self.config.gan_steps:
            raise ValueError(f"cyclegan_pseudo_labels: the stage's {total_steps} steps leave none for the segmenter "
                             f"after config.gan_steps={self.config.gan_steps} CycleGAN steps; raise steps")

    # -- schedule ----------------------------------------------------------------------------------
    def round_at(self, step: int) -> int:
        """0 during Stage A, else the Stage B round 1…R."""
        c = self.config
        if step < c.gan_steps:
            return 0
        return min((step - c.gan_steps) * c.rounds // (self.total_steps - c.gan_steps), c.rounds - 1) + 1

    def gan_lr_factor(self, step: int) -> float:
        start = self.config.gan_decay_from * self.config.gan_steps
        return 1.0 if step < start else max(0.0, 1 - (step - start) / max(self.config.gan_steps - start, 1))

    @contextlib.contextmanager
    def _lr_scaled(self, name: str, factor: float):
        groups = self._optimizers[name].param_groups
        before = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor
        try:
            yield
        finally:
            for g, lr in zip(groups, before):
                g["lr"] = lr

    # -- Stage A -----------------------------------------------------------------------------------
    def generator_losses(self, x: torch.Tensor, m: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """({adv, cyc}, x̂ = G_i(m), m̂ = G_s(x)) of the generators step."""
        _, m_fake = self.g_s(x, self.d_m)
        x_fake = self.g_i(m)
        _, m_rec = self.g_s(x_fake, self.d_m)
        adv = lsgan_g(self.d_x(x_fake)) + lsgan_g(self.d_m.score(m_fake))
        cyc = F.l1_loss(self.g_i(m_fake), x) + F.l1_loss(m_rec, m)
        return {"adv": adv, "cyc": cyc}, x_fake, m_fake

    def discriminator_losses(self, x, m, x_fake, m_fake) -> dict:
        """{d_x, d_m, vae_rec, vae_kl} of the discriminators step; fakes are detached (through the pools)."""
        c = self.config
        fx, fm = self.pool_x(x_fake.detach()), self.pool_m(m_fake.detach())
        rec, kl = self.d_m.vae_loss(m, c.vae_beta, c.vae_recon)
        return {"d_x": lsgan_d(self.d_x(x), self.d_x(fx)), "d_m": lsgan_d(self.d_m.score(m), self.d_m.score(fm)),
                "vae_rec": rec, "vae_kl": kl}

    def gan_step(self, x: torch.Tensor, m: torch.Tensor, step: int) -> StepOutput:
        c, f = self.config, self.gan_lr_factor(step)
        g, x_fake, m_fake = self.generator_losses(x, m)
        loss_g = g["adv"] + c.lambda_cyc * g["cyc"]
        with self._lr_scaled("generators", f):
            self.optimizer_step("generators", loss_g)
        d = self.discriminator_losses(x, m, x_fake, m_fake)
        loss_d = d["d_x"] + d["d_m"] + d["vae_rec"] + c.vae_beta * d["vae_kl"]
        with self._lr_scaled("discriminators", f):
            self.optimizer_step("discriminators", loss_d)
        self.optimizer_idle("segmenter")
        logs = {"round": 0.0, "gan_lr_factor": f, "fake_mask_fg": float(m_fake.detach()[:, 1:].sum(1).mean()),
                **{f"loss_{k}": float(v.detach()) for k, v in {**g, **d}.items()}}
        return StepOutput(loss_g.detach() + loss_d.detach(), logs)

    # -- Stage B -----------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_labels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŷ cleaned (N, *S), the source's soft prediction (N, K, *S)) from G_s (round 1) or the frozen S_r."""
        if int(self.label_round) == 0:
            probs = self.g_s(x, self.d_m)[1]
        else:
            probs = self.teacher.eval()(x).float().softmax(1)
        c = self.config
        return clean_labels(class_map(probs), self.num_classes, c.largest_component, c.fill_holes), probs

    def _enter_round(self, r: int) -> None:
        """At a round's first step: S_{r−1} becomes the label source unless the labels stopped changing."""
        if r == 1:
            self.ema.load_state_dict(self.model.state_dict())
        elif not bool(self.frozen):
            if float(self.change) < self.config.min_change:
                self.frozen.fill_(True)
            else:
                self.teacher.load_state_dict(self.model.state_dict())
                self.label_round.fill_(r - 1)
        self.round.fill_(r)
        self.change.fill_(1.0)

    def segmenter_step(self, x: torch.Tensor, r: int) -> StepOutput:
        c = self.config
        if int(self.round) != r:
            self._enter_round(r)
        self.optimizer_idle("generators")
        self.optimizer_idle("discriminators")
        y, source = self.pseudo_labels(x)
        onehot = F.one_hot(y, self.num_classes).movedim(-1, 1).float()
        logits = self.model(x)
        probs = logits.float().softmax(1)
        if c.weighting == "none":
            w = torch.ones_like(onehot)
        else:
            with torch.no_grad():
                ref = self.ema.eval()(x).float().softmax(1) if c.weight_from == "ema" else source
            w = label_weights(ref, onehot)
        loss = noise_weighted_dice(probs, onehot, w, c.smooth)
        self.optimizer_step("segmenter", loss)
        ema_update(self.ema, self.model, c.ema_decay)
        mine = clean_labels(class_map(logits.detach()), self.num_classes, c.largest_component, c.fill_holes)
        change = 1 - dice_overlap(mine, y, self.num_classes)
        self.change.mul_(0.9).add_(0.1 * change)
        logs = {"round": float(r), "label_round": float(self.label_round), "fg_fraction": float((y > 0).float().mean()),
                "label_change": change, "mean_weight": float(w[:, 1:].mean()), "loss_nwd": float(loss.detach())}
        return StepOutput(loss.detach(), logs)

    def training_step(self, batch, step):
        x = batch["unlabeled"]["image"]
        r = self.round_at(step)
        if r == 0:
            m = F.one_hot(batch["aux_masks"]["label"], self.num_classes).movedim(-1, 1).to(x.dtype)
            return self.gan_step(x, m, step)
        return self.segmenter_step(x, r)

    def trainable_parameters(self):
        return {"generators": [p for p in [*self.g_s.parameters(), *self.g_i.parameters()] if p.requires_grad],
                "discriminators": [*self.d_x.parameters(), *self.d_m.parameters()],
                "segmenter": [p for p in self.model.parameters() if p.requires_grad]}
