"""Fit one stage: its strategy on its data under Lightning, resumable, then the checkpoint its rule selects.

A stage folder holds ``last.ckpt`` (refreshed at every epoch end), ``best.ckpt`` (the best val score of its
``select`` rule), ``metrics.csv`` and ``done.json`` (written last: a stage with it is finished and is not re-run).
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import AtomicCheckpointIO, build_model, init_weights, strategy_state
from .context import DataContext, streams, synthetic_pairs
from .data import StepBatches, split_labeled, train_loader
from .data.annotation import SliceAnnotation
from .data.loaders import volume_loader
from .data.synthetic import generate_pairs
from .errors import UserError
from .lightning import ResumableCSVLogger, StrategyModule
from .planning import StagePlan
from .recipe import DataConfig, Recipe
from .strategies import Strategy
from .utils import atomic_torch_save, atomic_write_json, seed_everything, torch_load

log = logging.getLogger("label_efficient")


def build_stage(recipe: Recipe, plan: StagePlan, ctx: DataContext, previous: dict | None) -> StrategyModule:
    """The stage's network (initialised as ``init`` says), its strategy and the Lightning module driving it."""
    meta = {"backbone": recipe.backbone.name, **ctx.meta, "stage": plan.name, "strategy": plan.stage.strategy}
    seed_everything(recipe.seed + plan.index)
    model = build_model(recipe, ctx.spec)
    init_weights(model, plan.stage.init, previous, meta, plan.name)
    strategy = plan.strategy(model, ctx.spec.num_classes, plan.stage.config, in_channels=ctx.spec.in_channels,
                             spatial_dims=ctx.spec.spatial_dims)
    return StrategyModule(strategy, plan.optimizer, plan.stage.steps, seed=recipe.seed + 7919 * plan.index,
                          spatial_dims=ctx.spec.spatial_dims, roi_size=ctx.cfg.patch_size, meta=meta,
                          overlap=recipe.evaluation.sw_overlap, val_loss=plan.select == "val_loss")


def fit_stage(recipe: Recipe, plan: StagePlan, ctx: DataContext, module: StrategyModule, out: Path, resume: bool,
              precision: str, rank0: bool) -> dict:
    """Train the stage (or, resumed, continue it from ``last.ckpt``; or skip it when ``done.json`` says it is
    finished) and return its report: the selected checkpoint, its score, seconds, steps."""
    sdir = out / plan.folder
    done = sdir / "done.json"
    if resume and done.exists():
        return json.loads(done.read_text())
    val = [] if plan.select == "last" else ctx.volumes(ctx.cfg.val_split, ctx.cfg.max_val_cases,
                                                       with_label=plan.select == "val_dice")
    # label-free selection from given weights: the starting point is a candidate too ("do not adapt")
    initial = (initial_candidate(module, val, sdir, rank0)
               if plan.select == "label_free" and plan.stage.init != "none" else None)
    last = sdir / "last.ckpt"
    resume_from = last if resume and last.exists() else None
    trainer, best_cb = _trainer(recipe, plan, module, sdir, bool(val), precision,
                                torch_load(resume_from)["global_step"] if resume_from else None)
    with warnings.catch_warnings(), out_of_memory_named(plan.name, ctx.cfg, plan.stage.batch_size):
        warnings.filterwarnings("ignore", ".*does not have many workers.*|.*IterableDataset.*|.*num_workers.*"
                                          "|.*LeafSpec.*|.*val_dataloader.*|.*manual optimization and every_n_train.*")
        trainer.fit(module, train_dataloaders=train_loader(_batches(recipe, plan, ctx, module.strategy, out),
                                                           ctx.cfg.num_workers),
                    val_dataloaders=volume_loader(val) if val else None,
                    ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    if plan.stage.steps % plan.stage.val_every:  # the final steps after the last full epoch (not validated)
        trainer.save_checkpoint(last)
    best_path, score = selected(best_cb, last, sdir, initial)
    info = {"best": best_path.name, "select": plan.select, "best_score": score, "seconds": module.train_seconds,
            "steps": plan.stage.steps}
    if rank0:
        atomic_write_json(done, info)
    return info


def _batches(recipe: Recipe, plan: StagePlan, ctx: DataContext, strategy: Strategy, out: Path) -> StepBatches:
    annotation = SliceAnnotation(ctx.cfg.annotation) if ctx.cfg.annotation.kind == "slices" else None
    sdir, seed = out / plan.folder, recipe.seed + plan.index
    return StepBatches(ctx.store, streams(plan, strategy, ctx, synthetic_pairs(recipe, plan.index, ctx, out), seed),
                       plan.stage.val_every, seed=recipe.seed + 7919 * plan.index, augment=ctx.cfg.augment,
                       patch_size=ctx.cfg.patch_size, image_transform=strategy.image_transform(),
                       annotation=annotation, target_transform=strategy.target_transform(),
                       target_cache=sdir / "targets", foreground_ratio=ctx.cfg.foreground_ratio)


def _trainer(recipe: Recipe, plan: StagePlan, module: StrategyModule, sdir: Path, validates: bool, precision: str,
             resume_step: int | None):
    """The Lightning trainer of a stage, with its ``last`` and (when it validates) ``best`` checkpoints."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    per_step, st, tr = module.optimizer_steps_per_step, plan.stage, recipe.trainer  # Lightning counts optimizer steps
    monitor, mode = plan.monitor
    # last.ckpt is written at the end of every epoch's validation (or every epoch's last step without val):
    # Lightning's own save_last refreshes it only when a new best is saved, and a checkpoint taken in
    # on_train_epoch_end does not resume bit-identically.
    last_cb = ModelCheckpoint(dirpath=sdir, filename="last", monitor=None, save_top_k=1, enable_version_counter=False,
                              save_on_train_epoch_end=False,
                              **({} if validates else {"every_n_train_steps": st.val_every * per_step}))
    best_cb = ModelCheckpoint(dirpath=sdir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                              enable_version_counter=False, save_on_train_epoch_end=False) if validates else None
    trainer = pl.Trainer(
        accelerator=tr.accelerator, devices=tr.devices, strategy=tr.strategy, precision=precision,
        max_steps=st.steps * per_step, max_epochs=-1, callbacks=[last_cb, best_cb] if validates else [last_cb],
        logger=ResumableCSVLogger(sdir, resume_step), log_every_n_steps=tr.log_every, num_sanity_val_steps=0,
        limit_val_batches=1.0 if validates else 0, enable_progress_bar=tr.progress_bar,
        plugins=[AtomicCheckpointIO()], enable_model_summary=False, default_root_dir=sdir,
        use_distributed_sampler=False,  # EpochSampler shards draws itself (see data.loaders)
    )
    return trainer, best_cb


def initial_candidate(module: StrategyModule, val: list, sdir: Path, rank0: bool) -> float:
    """Label-free score of a stage's starting weights, which are kept as ``initial.ckpt`` (once; resumable)."""
    saved = sdir / "initial.json"
    if saved.exists():
        return json.loads(saved.read_text())["score"]
    score = module.score(val)["val/label_free"]
    if rank0:
        sdir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"state_dict": {f"strategy.{k}": v for k, v in module.strategy.state_dict().items()},
                           "global_step": 0, "label_efficient": module.meta}, sdir / "initial.ckpt")
        atomic_write_json(saved, {"score": score})
    return score


def selected(best_cb, last: Path, sdir: Path, initial: float | None) -> tuple[Path, float | None]:
    """The checkpoint the stage hands on and its score: the best val score of its rule (or the last step without
    validation), or its starting weights when they score higher (``select: label_free`` from given weights)."""
    best_path = Path(best_cb.best_model_path) if best_cb is not None and best_cb.best_model_path else last
    score = float(best_cb.best_model_score) if best_cb is not None and best_cb.best_model_score is not None else None
    if initial is not None and (score is None or initial > score):
        return sdir / "initial.ckpt", initial
    return best_path, score


def hand_over(strategy: Strategy, sdir: Path, info: dict) -> dict:
    """What the next stage may start from: the exported network of the selected and of the last checkpoint, and
    the parts it takes (a pre-training stage hands over its encoder only). Leaves ``strategy`` at the selection."""
    strategy.load_state_dict(strategy_state(sdir / "last.ckpt"))
    last = copy.deepcopy(strategy.export_model().state_dict())
    strategy.load_state_dict(strategy_state(sdir / info["best"]))
    return {"best": copy.deepcopy(strategy.export_model().state_dict()), "last": last,
            "parts": strategy.handover_parts()}


def generate(plan: StagePlan, strategy: Strategy, ctx: DataContext, sdir: Path, seed: int) -> None:
    """Run a generating stage's ``generate`` for the labelled cases of its budget (resumable)."""
    train = ctx.spec.select(ctx.cfg.train_split, ctx.cfg.labeled_domain or ctx.cfg.domain)
    labeled = ctx.store.load(split_labeled(train, ctx.cfg.budget)[0], True)
    strategy.eval()
    m = generate_pairs(strategy.generate, ctx.store, labeled, sdir / "generated",
                       getattr(strategy.config, "variants", 1), seed, strategy.name, plan.generates_volumes)
    log.info("stage %s: %d generated pairs from %d labelled cases (%d empty masks skipped) in %s", sdir.name,
             m["variants"] * len(m["cases"]), len(m["cases"]), len(m["skipped_empty"]), sdir / "generated")
    if ctx.spec.spatial_dims == 2 and not (sdir / "generated" / "preview.png").is_file():
        from .reporting import generated_pairs

        generated_pairs(sdir / "generated", ctx.store, labeled, sdir / "generated" / "preview.png")


class OutOfMemory(UserError, MemoryError):
    """Training did not fit in the device's memory at the recipe's sizes."""


@contextmanager
def out_of_memory_named(stage: str, data: DataConfig, batch) -> Iterator[None]:
    """Turn an allocation failure into a message naming the sizes that caused it and the keys to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(e):
            raise
        size = f"data.patch_size {data.patch_size}" if data.patch_size else f"data.image_size {data.image_size}"
        raise OutOfMemory(f"stage '{stage}' ran out of memory with {size} and batch {batch.labeled} labelled + "
                          f"{batch.unlabeled} unlabelled: lower them (or stages.<i>.batch_size)") from None
