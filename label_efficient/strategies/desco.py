"""DeSCO: dense–sparse co-training from orthogonal annotation (Cai et al., CVPR 2023; spec ``desco.md``).

Each labelled volume has one annotated slice in each of two orthogonal planes (``data.annotation: {kind: slices,
axes: [a_1, a_2]}``). Before training (:meth:`DeSCO.target_transform`), each annotated slice is propagated through
its stack by registration (ANTs SyNRA, ``transforms.propagation``): L_1 grows from the a_1-plane slice with the
a_2-plane GT slice pasted in, L_2 the mirror case. Per step, for k = 1 then 2 (Net2 uses the already updated Net1):

1. o = Net_k(x_l ‖ u);
2. without gradient, the other network j: ŷ = argmax Net_j(u) and U = H(mean_T softmax Net_j(u + ξ_t)),
   ξ_t = clip(N(0, 0.1²), ±0.2), T = 8 passes in train mode (dropout active);
3. m = [U < τ], τ = (0.75 + 0.25·r(it, 6000))·ln 2, r the sigmoid ramp;
4. Loss_k = (1−λ)·½[WCE(o_l, L_k; W_k) + WDice(o_l, L_k; W_k)] + λ·WCE(o_u, ŷ; m); step optimizer k.

W_k = s^{d_k}, d_k the distance (voxels) to the plane-k annotated slice and 0 on the other plane's GT slice; s = 0.95,
then at every rebuild (each 1000 iterations) s = ½(cos(π·t/40) + 1), t = it // 150; λ = 0.1·exp(−5(1 − min(t, 40)/40)²).
Net1 is the model (evaluated at its last step in the paper: no model selection).

Each network gets its own crops (the official code draws Net1's and Net2's batches from two loaders): by default the
step's labelled and unlabelled batches are split in halves, Net1 trains on the first, Net2 on the second, so the recipe
asks for twice the per-network batch (spec: 1 + 1 per network, ``batch_size: {labeled: 2, unlabeled: 2}``);
``batches: shared`` gives both networks the whole batch.

Schedules run on the paper's 6000 iterations: step t of a T-step stage is paper iteration ⌊t·6000/T⌋, so a shorter
CPU run anneals dense → sparse the same way.

Departures (official code HengCai-NJU/DeSCO d3f0852 = C):

* W_k is computed per batch from cached distance maps (s^d) instead of rebuilding the dataset every 1000
  iterations; the weights are the same at every iteration.
* Registration is SyNRA as C's ``registration.py`` asks, but C misspells the keyword (``type_of_transforme``, :60,
  :87), which ANTsPy ignores, so C actually runs its default SyN (no rigid stage); C also registers 0–255 PNGs where we
  register the z-scored slice. Both change only the propagated labels.
* The annotated slices are the middle ones (``shape // 2``: z = 44 of LA's 88); C hard-codes z = 43
  (la_heart.py 78, 225, 267).
* The T noisy passes are one forward of the T·n_u copies; C makes T/2 forwards of 2 (train_desco.py 208–214), so
  in train mode its BN batch statistics come from 2 copies, ours from 8, and its running statistics get more updates.
* The cross term logs 0 when no voxel is confident (C's wce logs 1.0); the gradient is zero in both.
* The two networks' labelled cases come from one permutation of the labelled set (two consecutive draws, so they
  differ within a pass); C's two loaders permute independently.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ..data.readers import DataError
from ..losses import sample_weighted_ce, sigmoid_rampup, weighted_dice
from ..transforms.propagation import SlicePropagator
from ..utils import class_map
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .ema import reinitialised
from .requirements import Requirements


def annotated_slices(label_mask: np.ndarray) -> dict[int, list[int]]:
    """``{axis: [indices]}`` of the slices ``label_mask`` marks completely."""
    out = {}
    for axis in range(label_mask.ndim):
        full = np.moveaxis(label_mask > 0, axis, 0).reshape(label_mask.shape[axis], -1).all(1)
        if full.any():
            out[axis] = [int(i) for i in np.flatnonzero(full)]
    return out


@register_strategy("desco")
class DeSCO(Strategy):
    """Two networks, each densified from one annotation plane, co-trained with uncertainty-masked cross pseudo labels."""

    requires = Requirements(streams=('labeled', 'unlabeled'), labels='sparse', optimizers=('net1', 'net2'))

    class Config(StrategyConfig):
        axes: list[int] = [2, 1]  #: annotated planes, Net1's first (LA (x, y, z): axial z, coronal y) (C la_heart.py)
        paper_iterations: int = 6000  #: the schedules' time base (C train_desco.py:29)
        s0: float = 0.95  #: decay base before the first rebuild (C :37)
        rebuild_every: int = 1000  #: paper iterations between rebuilds of the weights (C :352)
        s_step: int = 150  #: t = it // s_step (C :39)
        s_period: int = 40  #: s = ½(cos(π t / s_period) + 1) (C :75-76)
        lambda_max: float = 0.1  #: λ = λ_max·exp(−5(1 − min(t, ramp)/ramp)²) (C :41-42, 78-80)
        lambda_rampup: int = 40
        tau_rampup: int = 6000  #: τ ramp length in paper iterations (C :207-231)
        mc_passes: int = 8  #: T (C :207-214)
        noise_std: float = 0.1
        noise_clip: float = 0.2
        registration: str = "SyNRA"  #: ANTs type_of_transform C asks for (registration.py; it runs SyN, see above)
        morphology: int = 5  #: opening/closing size after each warp (C registration.py)
        #: "split" (C train_desco.py:191,248: a batch per network): halves of the step's batch; "shared": all of it
        batches: Literal["split", "shared"] = "split"

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        if len(self.config.axes) != 2 or len(set(self.config.axes)) != 2:
            raise ValueError(f"desco: config.axes names two different planes, got {self.config.axes}")
        self.net2 = reinitialised(model)

    # -- schedules (paper iterations) ------------------------------------------------------------
    def paper_iteration(self, step: int) -> int:
        return step * self.config.paper_iterations // max(self.total_steps, 1)

    def decay_base(self, it: int) -> float:
        """s: 0.95, then ½(cos(π·t/40) + 1) at each rebuild (t = it//150 at the rebuild)."""
        c = self.config
        if it < c.rebuild_every:
            return c.s0
        t = (it // c.rebuild_every * c.rebuild_every) // c.s_step
        return 0.5 * (math.cos(math.pi * t / c.s_period) + 1)

    def consistency_weight(self, it: int) -> float:
        c = self.config
        t = min(it // c.s_step, c.lambda_rampup)
        return c.lambda_max * math.exp(-5 * (1 - t / c.lambda_rampup) ** 2)

    def uncertainty_threshold(self, it: int) -> float:
        return (0.75 + 0.25 * sigmoid_rampup(it, self.config.tau_rampup)) * math.log(2)

    # -- targets: registration-propagated labels and distance maps, once per labelled case --------
    def target_transform(self):
        c = self.config
        propagator = SlicePropagator(c.registration, c.morphology)

        def targets(image: np.ndarray, label: np.ndarray, label_mask: np.ndarray, case_id: str) -> dict:
            found = annotated_slices(label_mask)
            planes = []
            for axis in c.axes:
                if len(found.get(axis, [])) != 1:
                    raise DataError(f"desco: case {case_id} needs exactly one annotated slice on axis {axis}, found "
                                    f"{found.get(axis, [])}; set data.annotation to {{kind: slices, axes: {c.axes}}}")
                planes.append((axis, found[axis][0]))
            out = {}
            for k, ((axis, index), (other_axis, other_index)) in enumerate((planes, planes[::-1]), 1):
                dense = propagator.propagate(image[0], label, axis, index, self.num_classes)
                other = tuple(other_index if a == other_axis else slice(None) for a in range(label.ndim))
                dense[other] = label[other]
                shape = [1] * label.ndim
                shape[axis] = label.shape[axis]
                dist = np.broadcast_to(np.abs(np.arange(label.shape[axis]) - index).reshape(shape), label.shape).copy()
                dist[other] = 0
                out[f"label_{k}"], out[f"dist_{k}"] = dense.astype(np.float32), dist.astype(np.float32)
            return out

        return targets

    # -- one step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def cross_pseudo_label(self, net: torch.nn.Module, u: torch.Tensor, tau: float):
        """(ŷ = argmax net(u), m = [H(mean over T noisy passes) < τ])."""
        c = self.config
        pseudo = class_map(net(u))
        noisy = u.repeat(c.mc_passes, *([1] * (u.ndim - 1)))
        noisy = noisy + (torch.randn_like(noisy) * c.noise_std).clamp(-c.noise_clip, c.noise_clip)
        probs = net(noisy).float().softmax(1).unflatten(0, (c.mc_passes, u.shape[0])).mean(0)
        entropy = -(probs * torch.log(probs + 1e-6)).sum(1)
        return pseudo, (entropy < tau).to(u.dtype)

    def network_batches(self, batch) -> list[tuple[dict, torch.Tensor]]:
        """(labelled fields, unlabelled images) for Net1 and Net2: the two halves of the batch, or all of it twice."""
        lab, u = batch["labeled"], batch["unlabeled"]["image"]
        if self.config.batches == "shared":
            return [(lab, u), (lab, u)]
        n_l, n_u = lab["image"].shape[0], u.shape[0]
        if n_l % 2 or n_u % 2:
            raise ValueError(f"desco (batches: split) gives each network half of the batch: labelled and unlabelled "
                             f"batch sizes must be even (spec: batch_size {{labeled: 2, unlabeled: 2}}), got {n_l} + {n_u}")
        halves = [slice(0, n_l // 2), slice(n_l // 2, n_l)], [slice(0, n_u // 2), slice(n_u // 2, n_u)]
        return [({k: v[i] for k, v in lab.items() if torch.is_tensor(v)}, u[j]) for i, j in zip(*halves)]

    def training_step(self, batch, step):
        it = self.paper_iteration(step)
        s, lam, tau = self.decay_base(it), self.consistency_weight(it), self.uncertainty_threshold(it)
        logs, total = {"s": s, "lambda": lam, "tau": tau}, 0.0
        nets = ((self.model, self.net2), (self.net2, self.model))
        for k, ((net, other), (lab, u)) in enumerate(zip(nets, self.network_batches(batch)), 1):
            n_l = lab["image"].shape[0]
            target, weight = lab[f"label_{k}"].long(), s ** lab[f"dist_{k}"]
            logits = net(torch.cat([lab["image"], u]))
            o_l, o_u = logits[:n_l], logits[n_l:]
            pseudo, confident = self.cross_pseudo_label(other, u, tau)
            loss_dense_sparse = 0.5 * (sample_weighted_ce(o_l, target, weight)
                                       + weighted_dice(o_l, target, weight, include_background=False))
            loss_cross = sample_weighted_ce(o_u, pseudo, confident)
            loss = (1 - lam) * loss_dense_sparse + lam * loss_cross
            self.optimizer_step(f"net{k}", loss)
            total = total + loss.detach()
            logs.update({f"loss_sup_{k}": loss_dense_sparse.detach(), f"loss_cross_{k}": loss_cross.detach(),
                         f"confident_{k}": confident.mean().item()})
        return StepOutput(total, logs)

    def trainable_parameters(self):
        return {"net1": [p for p in self.model.parameters() if p.requires_grad],
                "net2": [p for p in self.net2.parameters() if p.requires_grad]}
