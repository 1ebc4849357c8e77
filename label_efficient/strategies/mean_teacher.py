"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017), in the SSL4MIS configuration for segmentation.

Per step: L = L_sup(student(x_l), y_l) + λ(t)·MSE(softmax(student(x_u)), softmax(teacher(x_u + ξ))),
with ξ = clip(N(0, 0.1²), −0.2, 0.2), λ(t) = w·exp(−5(1 − t/T)²) (sigmoid ramp-up) and, after the
optimizer step, θ_T ← α θ_T + (1 − α) θ_S over the *parameters only*, as SSL4MIS's ``update_ema_variables``
(``ema_model.parameters()``). Its teacher is never put in eval mode, so its BN running statistics are its own: each
teacher forward (train mode, on x_u + ξ) moves them by BN's momentum, and the student's are never copied or averaged
in. They only matter for a teacher that predicts in eval mode (``teacher_eval_mode``, beyond SSL4MIS): then the
teacher's own forwards no longer update them, so the EMA also averages the floating BN buffers (and copies
``num_batches_tracked``). SSL4MIS decays the learning rate as 0.01·(1 − t/T)^0.9 (``schedule: poly``,
``poly_power: 0.9``, as ``recipes/acdc_mean_teacher.yaml``).
Departure: α is constant from step 0; SSL4MIS warms it up as min(1 − 1/(t+1), α). The teacher starts as a copy of
the student, so the two differ only while the student moves fast in the first ~100 steps (all rows in
``benchmarks/RESULTS.md`` use the constant α). SSL4MIS also zeroes the consistency loss for its first 1000
iterations (of 30000) and ramps λ over epochs of 150 iterations; we ramp from step 0 over ``rampup_fraction`` of
the stage.
Option beyond SSL4MIS (off by default): ``student_view="strong"`` feeds the student a photometric strong view of
x_u (kornia, on device) while the teacher keeps the weak one, as in weak/strong consistency methods.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..data.batch_augment import StrongIntensity
from ..losses import ce_dice, sigmoid_rampup, supervised_loss
from .base import StepOutput, Strategy, StrategyConfig, register_strategy
from .requirements import Requirements
from .ema import ema_update, make_teacher


@register_strategy("mean_teacher")
class MeanTeacher(Strategy):
    """Mean teacher: supervised ½(CE+Dice) + ramped MSE consistency to an EMA teacher on noisy inputs."""

    requires = Requirements(streams=('labeled', 'unlabeled'), labels='sparse')

    class Config(StrategyConfig):
        ema_decay: float = 0.99  #: α (SSL4MIS)
        consistency: float = 0.1  #: w, the final consistency weight (SSL4MIS)
        rampup_fraction: float = 1.0  #: T as a fraction of the stage's steps (SSL4MIS ramps over the whole run)
        noise_std: float = 0.1  #: ξ ~ N(0, σ²) added to the teacher's input
        noise_clip: float = 0.2
        #: False (SSL4MIS, which never calls ``ema_model.eval()``): the teacher normalises its noisy input with batch
        #: statistics. In eval mode its running statistics do not fit the noisy input: on ACDC val its Dice fell
        #: from 0.41 (train mode) to 0.20 with the noise (measured), and the consistency target with it.
        teacher_eval_mode: bool = False
        student_view: Literal["same", "strong"] = "same"  #: "strong": photometric strong view for the student
        #: "joint" (SSL4MIS): one student pass over labelled + unlabelled, so BN mixes both; "separate": one pass each
        student_passes: Literal["joint", "separate"] = "joint"

    def __init__(self, model, num_classes, config=None, **overrides):
        super().__init__(model, num_classes, config, **overrides)
        self.teacher = make_teacher(model)
        self.loss_fn = ce_dice()
        self.strong = StrongIntensity() if self.config.student_view == "strong" else None

    def consistency_weight(self, step: int) -> float:
        c = self.config
        return c.consistency * sigmoid_rampup(step, c.rampup_fraction * max(self.total_steps, 1))

    def training_step(self, batch, step):
        c = self.config
        lab, unl = batch["labeled"], batch["unlabeled"]
        n_l = lab["image"].shape[0]
        x_u = self.strong(unl["image"]) if self.strong is not None else unl["image"]
        if c.student_passes == "joint":
            logits = self.model(torch.cat([lab["image"], x_u]))
        else:
            logits = torch.cat([self.model(lab["image"]), self.model(x_u)])
        loss_sup = supervised_loss(self.loss_fn, logits[:n_l], lab["label"], lab.get("label_mask"))
        noise = (torch.randn_like(unl["image"]) * c.noise_std).clamp(-c.noise_clip, c.noise_clip)
        self.teacher.train(not c.teacher_eval_mode)
        with torch.no_grad():
            teacher_probs = self.teacher(unl["image"] + noise).float().softmax(1)
        loss_cons = torch.mean((logits[n_l:].float().softmax(1) - teacher_probs) ** 2)
        weight = self.consistency_weight(step)
        loss = loss_sup + weight * loss_cons
        return StepOutput(loss, {"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(), "w_cons": weight})

    def after_optimizer_step(self, step):
        # SSL4MIS: parameters only (the train-mode teacher keeps BN statistics of its own inputs); an eval-mode
        # teacher has no forward of its own that updates them, so it averages the student's
        ema_update(self.teacher, self.model, self.config.ema_decay, buffers=self.config.teacher_eval_mode)
