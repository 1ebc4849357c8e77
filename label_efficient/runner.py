"""Run a recipe: stages in order (weights pass on), model selection on val, one test evaluation at the end.

Output folder::

    recipe.resolved.yaml     the validated recipe with every default filled in
    stage<i>_<name>/         last.ckpt, best.ckpt (on val), metrics.csv, done.json
    model.pt                 self-contained inference bundle (backbone spec + weights)
    metrics.json             per case and class, plus means (top-level ``mean_dice``)
    overlays/*.png           test predictions over the image
    learning_curve.png
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator
import json
import logging
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import build_backbone, load_parts
from .backbones.rotated_heads import rebuild as rebuild_inference
from .data import CaseStore, DatasetSpec, StepBatches, Stream, build_dataset, eval_volumes, split_labeled, train_loader
from .data.annotation import SliceAnnotation
from .data.aux_masks import build_aux_masks
from .data.loaders import MaskStream, volume_loader
from .data.readers import DataError
from .data.synthetic import generate_pairs, load_pairs
from .errors import CheckpointError, UserError
from .evaluation import evaluate
from .outputs import prepare as prepare_output, recipe_hash
from .preflight import check_recipe
from .ood import OODDetector, pooled_features
from .precision import log_choice
from .lightning import (AtomicCheckpointIO, CheckpointMismatchError, ResumableCSVLogger, StrategyModule, check_meta,
                        load_state)
from .recipe import DataConfig, Recipe
from .strategies import STRATEGIES, Strategy
from .utils import (atomic_torch_save, atomic_write_json, barrier, global_rank, seed_everything, torch_load,
                    use_channels_last)

log = logging.getLogger("label_efficient")
BUNDLE_FORMAT = "label_efficient.model/1"


@dataclass
class DataContext:
    """What one stage's data section resolves to."""

    cfg: DataConfig
    spec: DatasetSpec
    store: CaseStore
    labeled: list = field(default_factory=list)
    unlabeled: list = field(default_factory=list)

    @classmethod
    def build(cls, cfg: DataConfig, seed: int, source_free: bool = False, label_free: bool = False) -> "DataContext":
        """Resolve a data section; a source-free or label-free stage gets its domain's train images, all
        unlabelled (a label budget is then ignored and no mask is read)."""
        spec = build_dataset(cfg.dataset, cfg.root, **cfg.options)
        store = CaseStore(spec, cfg.image_size, cfg.on_corrupt)
        train = spec.select(cfg.train_split, cfg.domain)
        if source_free or label_free:
            if not train:
                raise DataError(f"the train split of '{spec.name}' (domain {cfg.domain}) is empty")
            if label_free and not cfg.budget.all:
                log.info("label-free stage: its label budget is ignored; all %d train images are used unlabelled "
                         "and no mask is read", len(train))
            labeled, unlabeled = [], train
        elif cfg.labeled_domain not in (None, cfg.domain):  # adaptation: labelled source, the whole target unlabelled
            labeled, unlabeled = split_labeled(spec.select(cfg.train_split, cfg.labeled_domain), cfg.budget)[0], train
        else:
            labeled, unlabeled = split_labeled(train, cfg.budget)
        if cfg.max_unlabeled is not None and len(unlabeled) > cfg.max_unlabeled:
            keep = np.random.default_rng(seed).permutation(len(unlabeled))[: cfg.max_unlabeled]
            unlabeled = [unlabeled[i] for i in sorted(keep)]
        return cls(cfg, spec, store, labeled, unlabeled)

    def volumes(self, split: str | None, limit: int | None, with_label: bool = True):
        if not split:
            return []
        cases = self.spec.select(split, self.cfg.domain)
        vols = eval_volumes(self.store, cases, with_label)
        return vols[:limit] if limit else vols

    @property
    def meta(self) -> dict:
        return {"spatial_dims": self.spec.spatial_dims, "in_channels": self.spec.in_channels,
                "num_classes": self.spec.num_classes}


def build_model(recipe: Recipe, ctx: DataContext) -> torch.nn.Module:
    b = recipe.backbone
    model = build_backbone(b.name, ctx.spec.spatial_dims, ctx.spec.in_channels, ctx.spec.num_classes,
                           tap_points=b.tap_points, **b.kwargs)
    return use_channels_last(model) if recipe.trainer.channels_last and ctx.spec.spatial_dims == 2 else model


def load_for_evaluation(recipe: Recipe, ctx: DataContext, path: str | Path) -> torch.nn.Module:
    """A ``model.pt`` bundle, or the test-time network of a stage checkpoint (``last.ckpt``/``best.ckpt``): that
    stage's strategy rebuilt from ``recipe`` and restored, then ``export_inference()`` (e.g. UPL-SFDA's head
    ensemble), in eval mode."""
    if str(path).endswith(".ckpt"):
        blob = torch_load(path, "checkpoint")
        saved = blob.get("label_efficient", {})
        check_meta(saved, {"backbone": recipe.backbone.name, **ctx.meta}, str(path))
        stages = {st.name or st.strategy: st for st in recipe.stages}
        if saved.get("stage") not in stages:
            raise CheckpointError(f"{path} is a checkpoint of stage '{saved.get('stage')}', which recipe '{recipe.name}' "
                             f"does not have (its stages: {list(stages)}): pass the recipe that wrote it")
        stage = stages[saved["stage"]]  # the stage's strategy, rebuilt: its test-time network (e.g. an ensemble)
        strategy = STRATEGIES.get(stage.strategy)(build_model(recipe, ctx), ctx.spec.num_classes, stage.config)
        load_state(strategy, _strategy_keys(blob["state_dict"]), str(path))
        return strategy.export_inference().eval()
    return load_bundle(path)[0]


def _streams(strategy: Strategy, ctx: DataContext, batch, stage_name: str, synthetic=None,
             seed: int = 0) -> dict[str, Stream | MaskStream]:
    streams, options = {}, strategy.stream_options()
    if strategy.needs_labeled:
        extra = {"synthetic": synthetic, "synthetic_ratio": ctx.cfg.synthetic.ratio} if synthetic else {}
        streams["labeled"] = Stream(ctx.labeled, batch.labeled, with_label=True, **options.get("labeled", {}), **extra)
    if strategy.needs_unlabeled:
        if not ctx.unlabeled:
            raise DataError(f"stage '{stage_name}': strategy '{strategy.name}' needs unlabelled data, but the "
                            "label budget leaves no unlabelled case in the train split; lower the budget")
        streams["unlabeled"] = Stream(ctx.unlabeled, batch.unlabeled, with_label=False, **options.get("unlabeled", {}))
    if strategy.needs_aux_masks:  # unpaired masks, as many per batch as images
        masks = build_aux_masks(ctx.cfg.aux_masks, ctx.spec, ctx.cfg.image_size, seed)
        log.info("stage '%s': %d auxiliary masks (%s)", stage_name, len(masks), ctx.cfg.aux_masks.kind)
        streams["aux_masks"] = MaskStream(masks, batch.unlabeled if strategy.needs_unlabeled else batch.labeled)
    return streams


def _load_parts(model: torch.nn.Module, state: dict, parts: list[str], stage: str) -> None:
    """Load only ``parts`` of ``state`` (a pre-training stage's encoder / decoder blocks); the rest keeps its init.
    No parts (a generating stage that trained its own network): nothing passes on."""
    if not parts:
        log.info("stage '%s' keeps its own initialisation: the previous stage hands over no weights", stage)
        return
    try:
        n = load_parts(model, state, parts)
    except ValueError as e:
        raise CheckpointMismatchError(f"stage '{stage}': the weights handed over: {e}") from e
    log.info("stage '%s' starts from parts %s of the previous stage (%d tensors); the rest keeps its initialisation",
             stage, parts, n)


def _init_weights(model: torch.nn.Module, init: str, previous: dict | None, meta: dict, stage: str) -> None:
    if init == "none" or (init.startswith("previous") and previous is None):
        return
    if init in ("previous_best", "previous_last"):
        state = previous["best" if init == "previous_best" else "last"]
        if previous.get("parts") is not None:
            return _load_parts(model, state, previous["parts"], stage)
    else:
        blob = torch_load(init, f"stage '{stage}': init checkpoint")
        path = Path(init)
        check_meta(blob.get("label_efficient", blob.get("meta", {})), meta, str(path))
        state = blob["state_dict"]
        if blob.get("parts") is not None:  # a pre-training bundle: only its trained parts pass on
            return _load_parts(model, state, blob["parts"], stage)
        if blob.get("wrapper"):  # an ensemble's model.pt: start from its plain network
            wrapped = rebuild_inference(copy.deepcopy(model), blob["wrapper"])
            load_state(wrapped, state, str(path))
            state = wrapped.plain_network().state_dict()
        if any(k.startswith("strategy.model.") for k in state):  # a Lightning checkpoint
            state = {k[len("strategy.model."):]: v for k, v in state.items() if k.startswith("strategy.model.")}
    load_state(model, state, f"stage '{stage}' init '{init}'")


def _synthetic_pairs(recipe: Recipe, i: int, ctx: DataContext, out: Path):
    """Generated pairs a stage adds to its labelled stream (``data.synthetic``), or ``None``."""
    syn = ctx.cfg.synthetic
    if syn is None:
        return None
    if syn.path is not None:
        return load_pairs(Path(syn.path), ctx.store)
    names = [st.name or st.strategy for st in recipe.stages]
    j = names.index(syn.from_stage)
    return load_pairs(out / f"stage{j}_{names[j]}" / "generated", ctx.store)


#: the logged score and its direction of each validating ``select`` rule
MONITORS = {"val_dice": ("val/mean_dice", "max"), "label_free": ("val/label_free", "max"), "val_loss": ("val/loss", "min")}


def _generate(strategy: Strategy, ctx: DataContext, sdir: Path, seed: int) -> None:
    """Run a data-producing stage's generation for the labelled cases of its budget (resumable)."""
    train = ctx.spec.select(ctx.cfg.train_split, ctx.cfg.labeled_domain or ctx.cfg.domain)
    labeled = ctx.store.load(split_labeled(train, ctx.cfg.budget)[0], True)
    strategy.eval()
    m = generate_pairs(strategy.generate, ctx.store, labeled, sdir / "generated",
                       getattr(strategy.config, "variants", 1), seed, strategy.name, strategy.generates_volumes)
    log.info("stage %s: %d generated pairs from %d labelled cases (%d empty masks skipped) in %s", sdir.name,
             m["variants"] * len(m["cases"]), len(m["cases"]), len(m["skipped_empty"]), sdir / "generated")
    if ctx.spec.spatial_dims == 2 and not (sdir / "generated" / "preview.png").is_file():
        from .reporting import generated_pairs

        generated_pairs(sdir / "generated", ctx.store, labeled, sdir / "generated" / "preview.png")


def _initial_candidate(module: StrategyModule, val: list, sdir: Path, rank0: bool) -> float:
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


def _strategy_keys(state_dict: dict) -> dict:
    """The strategy's own entries of a StrategyModule state dict, without their ``strategy.`` prefix."""
    return {k[len("strategy."):]: v for k, v in state_dict.items() if k.startswith("strategy.")}


def _strategy_state(ckpt_path: Path) -> dict:
    return _strategy_keys(torch_load(ckpt_path)["state_dict"])


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False) -> dict:
    """Run every stage of ``recipe`` into ``out`` and evaluate once on the test split."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    out, rank0 = Path(out), global_rank() == 0  # under DDP every process runs this function; rank 0 writes
    check_recipe(recipe)  # every problem knowable before training, before anything is written
    if rank0:
        prepare_output(out, recipe, resume)
    t_start = time.time()
    precision = log_choice(recipe.trainer.precision, recipe.trainer.accelerator)
    previous: dict | None = None
    stage_reports = []
    for i, stage in enumerate(recipe.stages):
        name = stage.name or stage.strategy
        sdir = out / f"stage{i}_{name}"
        strategy_cls = STRATEGIES.get(stage.strategy)
        ctx = DataContext.build(recipe.stage_data(i), recipe.seed, source_free=strategy_cls.source_free,
                                label_free=strategy_cls.label_free)
        meta = {"backbone": recipe.backbone.name, **ctx.meta, "stage": name, "strategy": stage.strategy}
        seed_everything(recipe.seed + i)
        model = build_model(recipe, ctx)
        _init_weights(model, stage.init, previous, meta, name)
        strategy = strategy_cls(model, ctx.spec.num_classes, stage.config)
        select = recipe.select(i)
        module = StrategyModule(strategy, recipe.stage_optimizers(i) if strategy.optimizers else stage.optimizer, stage.steps, seed=recipe.seed + 7919 * i,
                                spatial_dims=ctx.spec.spatial_dims, roi_size=ctx.cfg.patch_size, meta=meta,
                                overlap=recipe.evaluation.sw_overlap, val_loss=select == "val_loss")
        done = sdir / "done.json"
        if not (resume and done.exists()):
            annotation = SliceAnnotation(ctx.cfg.annotation) if ctx.cfg.annotation.kind == "slices" else None
            streams = _streams(strategy, ctx, stage.batch_size, name, _synthetic_pairs(recipe, i, ctx, out),
                               seed=recipe.seed + i)
            batches = StepBatches(ctx.store, streams, stage.val_every,
                                  seed=recipe.seed + 7919 * i, augment=ctx.cfg.augment, patch_size=ctx.cfg.patch_size,
                                  image_transform=strategy.image_transform(), annotation=annotation,
                                  target_transform=strategy.target_transform(), target_cache=sdir / "targets")
            per_step = module.optimizer_steps_per_step  # Lightning counts optimizer steps
            val = [] if select == "last" else ctx.volumes(ctx.cfg.val_split, ctx.cfg.max_val_cases,
                                                         with_label=select == "val_dice")
            monitor, mode = MONITORS.get(select, (None, "max"))
            # last.ckpt is written at the end of every epoch's validation (or every epoch's last step without
            # val): Lightning's own save_last refreshes it only when a new best is saved, and a checkpoint taken
            # in on_train_epoch_end does not resume bit-identically.
            last_ckpt = ModelCheckpoint(dirpath=sdir, filename="last", monitor=None, save_top_k=1,
                                        enable_version_counter=False, save_on_train_epoch_end=False,
                                        **({} if val else {"every_n_train_steps": stage.val_every * per_step}))
            ckpt = ModelCheckpoint(dirpath=sdir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                                   enable_version_counter=False, save_on_train_epoch_end=False) if val else None
            # label-free selection from given weights: the starting point is a candidate too ("do not adapt")
            initial = (_initial_candidate(module, val, sdir, rank0)
                       if select == "label_free" and stage.init != "none" else None)
            last = sdir / "last.ckpt"
            resume_from = last if resume and last.exists() else None
            resume_step = torch_load(resume_from)["global_step"] if resume_from else None
            trainer = pl.Trainer(
                accelerator=recipe.trainer.accelerator, devices=recipe.trainer.devices, strategy=recipe.trainer.strategy,
                precision=precision, max_steps=stage.steps * per_step, max_epochs=-1, callbacks=[last_ckpt, ckpt] if val else [last_ckpt],
                logger=ResumableCSVLogger(sdir, resume_step), log_every_n_steps=recipe.trainer.log_every,
                num_sanity_val_steps=0, limit_val_batches=1.0 if val else 0, enable_progress_bar=recipe.trainer.progress_bar,
                plugins=[AtomicCheckpointIO()], enable_model_summary=False, default_root_dir=sdir,
                use_distributed_sampler=False,  # EpochSampler shards draws itself (see data.loaders)
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*does not have many workers.*")
                warnings.filterwarnings("ignore", ".*IterableDataset.*|.*num_workers.*|.*LeafSpec.*|.*val_dataloader.*"
                                                  "|.*manual optimization and every_n_train_steps.*")
                with out_of_memory_named(name, ctx.cfg, stage.batch_size):
                    trainer.fit(module, train_dataloaders=train_loader(batches, ctx.cfg.num_workers),
                                val_dataloaders=volume_loader(val) if val else None,
                                ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
            if stage.steps % stage.val_every:  # the final steps after the last full epoch (not validated)
                trainer.save_checkpoint(last)
            best_path = Path(ckpt.best_model_path) if val and ckpt.best_model_path else last
            score = float(ckpt.best_model_score) if val and ckpt.best_model_score is not None else None
            if initial is not None and (score is None or initial > score):
                best_path, score = sdir / "initial.ckpt", initial
            info = {"best": best_path.name, "select": select, "best_score": score,
                    "seconds": module.train_seconds, "steps": stage.steps}
            if rank0:
                atomic_write_json(done, info)
        else:
            info = json.loads(done.read_text())
        strategy.load_state_dict(_strategy_state(sdir / "last.ckpt"))
        last_state = copy.deepcopy(strategy.export_model().state_dict())
        strategy.load_state_dict(_strategy_state(sdir / info["best"]))
        previous = {"best": copy.deepcopy(strategy.export_model().state_dict()), "last": last_state,
                    "parts": strategy.handover_parts()}
        if strategy.produces_pairs:
            if rank0:
                _generate(strategy, ctx, sdir, recipe.seed + i)
            barrier()  # the other processes read the pairs in the next stage
        stage_reports.append({"stage": name, "strategy": stage.strategy, **info})
    if not rank0:  # DDP: the test evaluation and every output file are rank 0's
        return {"mean_dice": None, "evaluated": False, "rank": global_rank()}
    if not strategy.segments:  # pre-training / embedding only: nothing to score; model.pt hands on its parts
        metrics = {"mean_dice": None, "evaluated": False, **_run_summary(stage_reports, t_start)}
        save_bundle(out / "model.pt", strategy.export_inference(), recipe, ctx, parts=previous["parts"])
        atomic_write_json(out / "metrics.json", metrics)
        log.info("label-free run: no test evaluation; fine-tune from %s (init: <path>)", out / "model.pt")
        return metrics
    # --- final evaluation, once, on the test split with the last stage's selected weights -------
    ev = recipe.evaluation
    test = ctx.volumes(ev.split, ctx.cfg.max_test_cases)
    device = next(strategy.parameters()).device
    strategy.eval()
    metrics = evaluate(strategy.predict, test, ctx.spec.num_classes, ctx.spec.class_names, ctx.spec.spatial_dims,
                       ev.metrics, roi_size=ctx.cfg.patch_size, device=device, overlap=ev.sw_overlap, keep=ev.overlays,
                       empty=ev.empty)
    predictions = metrics.pop("predictions", [])
    exported = strategy.export_model()  # the OOD detector reads its bottleneck, which an ensemble's heads share
    detector = fit_ood(exported, ctx, device) if ctx.spec.spatial_dims == 2 else None
    if detector is not None:
        for vol in test:
            sc = detector.score(pooled_features(exported, [vol.image], device))
            metrics["cases"][vol.id]["ood"] = {k: float(v.mean()) for k, v in sc.items()}
            metrics["cases"][vol.id]["ood"]["flagged"] = bool(detector.flag(sc).any())
    metrics = {"mean_dice": metrics.get("mean_dice"), **metrics, "split": ev.split, "recipe_sha256": recipe_hash(recipe),
               **_run_summary(stage_reports, t_start), "skipped_corrupt": ctx.store.skipped}
    save_bundle(out / "model.pt", strategy.export_inference(), recipe, ctx, detector)
    atomic_write_json(out / "metrics.json", metrics)
    from .reporting import learning_curve, overlays

    overlays(test, predictions, ctx, out / "overlays")
    learning_curve(out, out / "learning_curve.png")
    return metrics


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


class OutOfMemory(UserError, MemoryError):
    """Training did not fit in the device's memory at the recipe's sizes."""


def _run_summary(stage_reports: list[dict], t_start: float) -> dict:
    return {"stages": stage_reports, "train_seconds": sum(s["seconds"] for s in stage_reports),
            "wall_seconds": time.time() - t_start, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def fit_ood(model: torch.nn.Module, ctx: DataContext, device, max_images: int = 1000) -> OODDetector | None:
    """Fit the OOD detector on the stage's training images (labelled + unlabelled, no labels used) and set its
    threshold on the validation images; ``None`` when the model has no ``bottleneck`` tap point."""
    train = ctx.labeled + ctx.unlabeled
    if "bottleneck" not in getattr(model, "tap_points", {}) or len(train) < 2:
        log.warning("no OOD detector: needs a 'bottleneck' tap point and at least 2 training images")
        return None
    keep = np.random.default_rng(0).permutation(len(train))[:max_images]
    train = [train[i] for i in sorted(keep)]
    val = ctx.spec.select(ctx.cfg.val_split, ctx.cfg.domain) if ctx.cfg.val_split else []
    images = lambda cases: [torch.from_numpy(np.stack([ctx.store.get(c, False).image for c in cases[i:i + 32]]))
                            for i in range(0, len(cases), 32)]
    return OODDetector().fit(pooled_features(model, images(ctx.store.load(train, False)), device),
                             pooled_features(model, images(ctx.store.load(val, False)), device))


def save_bundle(path: Path, model: torch.nn.Module, recipe: Recipe, ctx: DataContext,
                detector: OODDetector | None = None, parts: list[str] | None = None) -> None:
    """Self-contained inference bundle: backbone spec, preprocessing, weights and the OOD detector
    (loadable weights-only); ``parts``: what a stage initialised from it takes (None: the whole network)."""
    atomic_torch_save({
        "parts": parts,
        "ood": detector.state_dict() if detector is not None else None,
        "format": BUNDLE_FORMAT,
        "meta": {"backbone": recipe.backbone.name, **ctx.meta},
        "backbone": {"name": recipe.backbone.name, "kwargs": recipe.backbone.kwargs,
                     "tap_points": recipe.backbone.tap_points},
        "data": {"image_size": ctx.cfg.image_size, "patch_size": ctx.cfg.patch_size, "intensity": ctx.spec.intensity,
                 "format": ctx.spec.format, "class_names": ctx.spec.class_names},
        "wrapper": model.bundle_spec() if hasattr(model, "bundle_spec") else None,
        "state_dict": model.state_dict(),
    }, path)


def load_bundle(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load ``model.pt`` (weights only) and rebuild its network (or the strategy's inference ensemble)."""
    blob = torch_load(path, "model")
    if blob.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path} is not a label-efficient model bundle (format {blob.get('format')!r}); pass "
                              "the model.pt of a run")
    m, b = blob["meta"], blob["backbone"]
    model = build_backbone(b["name"], m["spatial_dims"], m["in_channels"], m["num_classes"],
                           tap_points=b["tap_points"], **b["kwargs"])
    model = rebuild_inference(model, blob.get("wrapper"))
    load_state(model, blob["state_dict"], str(path))
    return model.eval(), blob
