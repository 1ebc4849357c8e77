"""BN-statistics source-free adaptation (Liu et al., MICCAI 2021, arXiv 2106.12497; no official code).

Per target step t, with T initialised from the source model S (kept frozen):
  1. Low-order statistics: every BN layer updates μ^T, σ²^T with momentum η_t = η₀·exp(−t/τ) from the batch
     (PyTorch's momentum is the weight of the new batch, as η here); at τ → 0 this is the paper's literal e^(−t),
     which stops after ~5 steps, so τ is exposed (default: 100 steps).
  2. Transferability α_lc = C_l·(1+d_lc)⁻¹ / Σ_c′(1+d_lc′)⁻¹ with d_lc = |μ^S/√(σ²^S+ε) − μ^T/√(σ²^T+ε)|,
     recomputed every step from the running statistics (TransNorm-style).
  3. L = L_HBS + λ·L_SE, L_HBS = Σ_l Σ_c (1+α_lc)(|γ^T−γ^S| + |β^T−β^S|), L_SE = mean pixel entropy of softmax.
Which parameters train is ``train_params`` (default: BN affine only, Tent-like). The journal version's γ-aware
weight is not included. Defaults marked R in the spec are our recommendations (η₀ 0.1, λ 1, Adam 1e-4).

What this amounts to with the paper's loss (summed L1 anchor, λ = 1): the entropy term cannot move γ/β, so the
method acts as AdaBN with a decaying momentum (step 1 above, alone). L_HBS is a *sum* over channels of (1 + α_lc)
times an L1 distance, so once γ^T ≠ γ^S each γ/β gets an anchor gradient of magnitude 1 + α_lc ≥ 1 (α averages 1
over a layer's channels), while L_SE is a *mean* over the batch's pixels whose gradient per BN parameter is orders
of magnitude smaller (issue 26's audit measured it at 4.5e-6 of the anchor's gradient; 5e-3 on the test suite's
8…32-channel U-Net). At T = S the L1 subgradient is 0, so the first step follows the entropy; after it the anchor's
sign flips every step and, with Adam, each γ/β oscillates within about one learning rate of its source value
(measured on the test U-Net, Adam 1e-4, 60 steps: max |γ^T − γ^S| = 3e-5; the same steps with λ = 0 leave γ/β
exactly at the source values). The benchmark's "no entropy" rows equal the λ = 1 rows for that reason. To let L_SE
act, raise λ by several orders (λ = 1000 is a row in ``benchmarks/RESULTS.md``) or use ``train_params: all``. We
keep the paper's form: the spec gives the loss as stated (P) and λ is not verified.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..backbones.taps import batchnorm_layers
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements


class NoBatchNormError(ValueError):
    pass


def require_batchnorm(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    """The BN layers of ``model``, or an error naming the normalisation layers it has instead."""
    bns = batchnorm_layers(model)
    if not bns:
        norms = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                 if "Norm" in type(m).__name__ and n][:5]
        raise NoBatchNormError(f"{who} needs batch-norm layers, but {type(model).__name__} has none"
                               f"{'; its normalisation layers: ' + ', '.join(norms) if norms else ''}. "
                               "Build the backbone with norm='batch'.")
    return bns


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """−(1/|Ω|) Σ_i Σ_k p_ik log p_ik over all pixels of the batch."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(1).mean()


class BNSFDAConfig(StrategyConfig):
    eta0: float = 0.1  #: η₀ (R)
    tau: float = 100.0  #: decay time constant in steps, η_t = η₀·exp(−t/τ) (R; the literal e^(−t) is τ = 1)
    entropy_weight: float = 1.0  #: λ of L_SE; 0 disables the self-entropy term (R: report both)
    train_params: str = "bn_affine"  #: bn_affine | all
    eps: float = 1e-5  #: ε in the channel divergence (BN's ε)


@register_strategy("bn_sfda")
class BNSFDA(Strategy):
    """Re-estimate BN running statistics on the target with decaying momentum; anchor γ/β to the source."""

    Config = BNSFDAConfig
    requires = Requirements(streams=('unlabeled',), labels='none', role='adapter')

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        if self.config.train_params not in ("bn_affine", "all"):
            raise ValueError(f"train_params must be 'bn_affine' or 'all', got {self.config.train_params!r}")
        self.bn_names = [n for n, _ in require_batchnorm(model, "bn_sfda")]
        for name, bn in batchnorm_layers(model):  # source statistics: copies, never references into T
            key = name.replace(".", "__")
            for attr in ("running_mean", "running_var", "weight", "bias"):
                self.register_buffer(f"src_{attr}__{key}", getattr(bn, attr).detach().clone())
        if self.config.train_params == "bn_affine":
            affine = {id(p) for _, bn in batchnorm_layers(model) for p in (bn.weight, bn.bias)}
            for p in model.parameters():
                p.requires_grad_(id(p) in affine)

    def _src(self, attr: str, name: str) -> torch.Tensor:
        return getattr(self, f"src_{attr}__{name.replace('.', '__')}")

    def momentum(self, step: int) -> float:
        return self.config.eta0 * math.exp(-step / self.config.tau)

    def transferability(self, name: str, bn) -> torch.Tensor:
        eps = self.config.eps
        d = (self._src("running_mean", name) / torch.sqrt(self._src("running_var", name) + eps)
             - bn.running_mean / torch.sqrt(bn.running_var + eps)).abs()
        inv = 1.0 / (1.0 + d)
        return inv.numel() * inv / inv.sum()

    def high_order_loss(self) -> torch.Tensor:
        """L_HBS = Σ_l Σ_c (1+α_lc)(|γ^T−γ^S| + |β^T−β^S|), α from the current running statistics (detached)."""
        return torch.stack([((1.0 + self.transferability(name, bn).detach())
                             * ((bn.weight - self._src("weight", name)).abs()
                                + (bn.bias - self._src("bias", name)).abs())).sum()
                            for name, bn in batchnorm_layers(self.model)]).sum()

    def training_step(self, batch, step):
        eta = self.momentum(step)
        for _, bn in batchnorm_layers(self.model):
            bn.momentum = eta
        probs = self.model(batch["unlabeled"]["image"]).float().softmax(1)
        loss_hbs = self.high_order_loss()
        loss_se = mean_entropy(probs)
        loss = loss_hbs + self.config.entropy_weight * loss_se
        return StepOutput(loss, {"loss_hbs": loss_hbs.detach(), "loss_se": loss_se.detach(), "eta": eta})
