"""UPL-SFDA: uncertainty-aware pseudo-label guided source-free adaptation (Wu et al., IEEE TMI 2023, arXiv 2309.10244).

The source model's output head is cloned into K heads sharing the rest of the network (feature tap); head k sees the
input rotated by r_k·90° (r = 1, 2, 3, 0) and its softmax is rotated back. Per target step:
  1. Pass 1 (no grad): p̄ = mean_k p_k; pseudo label Y_c = 1[p̄_c > τ_c] for every class c, background included
     (one τ for all classes as the paper, or one per class: a small structure rarely reaches the background's 0.95);
     pixels where no class passes τ are ignored; the largest connected component of each Y_c is kept, with face
     connectivity (4 in 2D, 6 in 3D) as the official ``get_largest_component``.
  2. Pass 2 (grad): recompute p_k; L_TFS = mean_{k,c} 1 − (2Σ q·Y_c + s)/(ΣY_c + Σq² + s), q = p_kc ⊙ Y_c, s = 1e-4
     (twice-forward supervision: only pixels pseudo-labelled c count for class c).
  3. L = L_TFS + λ·L_ME with L_ME = −Σ p̄ log₂(p̄ + 1e-10)/(N·C·|Ω|), the entropy of the head mean.
Inference averages the K rotated heads (``RotatedHeads``, also what ``model.pt`` holds). The heads form their own
optimizer parameter group with Adam betas (0.5, 0.999), the rest of the network the optimizer's defaults (official
code). Departures from the official code
(spec pitfalls): BN runs in train mode during adaptation by default (``bn_mode="frozen"`` keeps the incoming
running statistics) and in eval mode at test. Neither mode is the official one: its first epoch trains in train mode
(the BN statistics adapt to the target), and its validation's ``eval()`` leaves every later epoch in eval mode (the
statistics frozen at their epoch-1 values); on the simulated ACDC shift (``benchmarks/parity_upl_sfda.py``) train
mode lands near the official, frozen well below it; only the final 1×1 head is cloned (the official code clones the
whole decoder, which a generic backbone does not expose), so the heads differ by their rotation alone where the
official decoders also differ by their own dropout (p = 0.5 in each decoder's deepest block), unless the backbone
itself has dropout; no checkpoint is chosen on target labels (fixed step count).
Largest component, 2D: the official 2D batch is *one volume's window* of 10 consecutive slices (``crop_depth``,
batch size 1, zero slices padding shorter volumes), and ``save_nii`` keeps per class the largest 3D component of
that (10, H, W) stack, face-connected across slices too: a slice whose class region does not touch the window's
largest component loses it. We keep the largest component per 2D image (4-connected in-plane, the official
structuring element restricted to one slice), so every slice keeps one component per class. Not changed because
the strategy cannot see volumes: our target batches are slices drawn at random across volumes, they carry no
volume or slice index, and no stream option draws consecutive slices of one volume (``partitions`` takes one slice
per chunk; ``slab`` stacks neighbours on the channel axis, changing the network's input), and the polyp targets are
not volumes at all. For 3D inputs (N, C, D, H, W) each sample is a volume and the rule is the official one.
Ties between equally large components: the first in raster order (the official code compares the label map with
every tied label at once, which NumPy broadcasts or rejects). ``connectivity: full`` (8/26, the earlier default)
is kept as an option.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from ..backbones.rotated_heads import RotatedHeads, default_rotations, ensemble_logits, rotated_head_probs, split_heads
from ..backbones.taps import batchnorm_layers
from ..losses import masked_dice_loss
from ..transforms.components import log_cleaning, largest_component_mask
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements


class UPLSFDAConfig(StrategyConfig):
    num_heads: int = 4  #: K
    tau: float | list[float] = 0.95  #: threshold τ (C: 0.95 M&Ms/FeTA, 0.90 fetal brain), or one τ_c per class (R)
    entropy_weight: float = 1.0  #: λ
    largest_component: bool = True
    connectivity: Literal["face", "full"] = "face"  #: of the largest component (C: face; "full" as before)
    dice_smooth: float = 1e-4
    bn_mode: Literal["train", "frozen"] = "train"  #: BN batch statistics during adaptation, or the incoming ones (R)
    head_betas: tuple[float, float] = (0.5, 0.999)  #: Adam betas of the heads' parameter group (C)


@register_strategy("upl_sfda")
class UPLSFDA(Strategy):
    """K rotation heads cloned from the source head; online confident pseudo labels from their mean."""

    Config = UPLSFDAConfig
    requires = Requirements(streams=('unlabeled',), labels='none', role='adapter')

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        tau = self.config.tau
        if isinstance(tau, list) and len(tau) != num_classes:
            raise ValueError(f"upl_sfda: tau has {len(tau)} per-class thresholds for {num_classes} classes "
                             "(background included)")
        self.register_buffer("tau", torch.tensor(tau, dtype=torch.float32).reshape(-1), persistent=False)
        _, self.heads = split_heads(model, self.config.num_heads)  # self.model now returns the shared decoder features
        self.rotations = default_rotations(self.config.num_heads)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        log_cleaning("upl_sfda", self.config.largest_component)

    def head_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax of every head on its rotated input, rotated back into the input frame."""
        return rotated_head_probs(self.model, self.heads, self.rotations, x)

    def trainable_parameters(self):
        """Two parameter groups: the shared network, and the heads with their own Adam betas."""
        heads = list(self.heads.parameters())
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]},
                {"params": heads, "betas": self.config.head_betas}]

    def training_step(self, batch, step):
        if self.config.bn_mode == "frozen":  # the loop switches to train mode each epoch: freeze BN per step
            for _, bn in batchnorm_layers(self.model):
                bn.eval()
        x = batch["unlabeled"]["image"]
        with torch.no_grad():
            mean = torch.stack(self.head_probs(x)).mean(0)
            pseudo = (mean > self.tau.reshape(1, -1, *(1,) * (mean.ndim - 2))).float()
            if self.config.largest_component:
                pseudo = largest_component_mask(pseudo, self.config.connectivity)
        probs = self.head_probs(x)
        loss_tfs = torch.stack([masked_dice_loss(p, pseudo, self.config.dice_smooth) for p in probs]).mean()
        p_mean = torch.stack(probs).mean(0)
        loss_me = -(p_mean * torch.log2(p_mean + 1e-10)).sum() / p_mean.numel()
        loss = loss_tfs + self.config.entropy_weight * loss_me
        covered = pseudo.amax(1).mean()
        return StepOutput(loss, {"loss_tfs": loss_tfs.detach(), "loss_me": loss_me.detach(), "pl_fraction": covered})

    @torch.no_grad()
    def predict(self, x):
        """Ensemble of the K rotation heads: logits whose softmax is the heads' mean softmax."""
        return ensemble_logits(self.model, self.heads, self.rotations, x)

    def export_model(self) -> nn.Module:
        """A plain network with the unrotated head (r = 0), for the next stage."""
        return RotatedHeads(self.model, self.heads, self.rotations).plain_network()

    def export_inference(self) -> nn.Module:
        """The K-head rotation ensemble that ``predict`` runs, as one module for ``model.pt``."""
        return RotatedHeads(copy.deepcopy(self.model), copy.deepcopy(self.heads), self.rotations)
