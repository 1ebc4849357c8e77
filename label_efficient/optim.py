"""Optimizers and learning-rate schedules from an ``OptimizerConfig`` (usable in any loop, not only Lightning's)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .recipe import OptimizerConfig
from .strategies.base import Strategy


def build_optimizer(params, cfg: OptimizerConfig, total_steps: int):
    """SGD/Adam(W) with a per-step constant, poly ((1 − t/T)^p), step, or cosine schedule (to 0 at T); any of
    them after ``warmup_steps`` of linear warm-up from 0."""
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.schedule == "poly":
        fn: Callable[[int], float] = lambda s: max(0.0, 1.0 - s / max(total_steps, 1)) ** cfg.poly_power
    elif cfg.schedule == "step":
        fn = lambda s: cfg.gamma ** (s // cfg.step_size)
    elif cfg.schedule == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1)))
    else:
        fn = lambda s: 1.0
    warm = cfg.warmup_steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: fn(s) * min(1.0, (s + 1) / warm) if warm else fn(s))


def optimizer_names(strategy: Strategy) -> tuple[str, ...]:
    """The names of the optimizers a strategy steps itself, in order: the keys of its ``trainable_parameters()``
    when it returns ``{name: parameters}``; empty for a strategy with one optimizer, stepped by the loop."""
    params = strategy.trainable_parameters()
    return tuple(params) if isinstance(params, dict) else ()


def build_optimizers(strategy: Strategy, cfg: OptimizerConfig | dict[str, OptimizerConfig], total_steps: int):
    """``[(optimizer, scheduler)]``: one for a plain strategy, one per name of :func:`optimizer_names` (``cfg`` a
    config per name, or one config for all)."""
    params = strategy.trainable_parameters()
    if not isinstance(params, dict):
        return [build_optimizer(params, cfg, total_steps)]
    cfgs = cfg if isinstance(cfg, dict) else {n: cfg for n in params}
    if set(cfgs) != set(params):
        raise TypeError(f"strategy '{strategy.name}' steps optimizers {list(params)}; configs were given for "
                        f"{sorted(cfgs)}")
    return [build_optimizer(list(params[n]), cfgs[n], total_steps) for n in params]
