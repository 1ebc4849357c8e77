"""One stage's data: the dataset, its cached cases, the labelled / unlabelled split of its train cases, its streams."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import CaseStore, DatasetSpec, Stream, build_dataset, eval_volumes, split_labeled
from .data.aux_masks import build_aux_masks
from .data.loaders import MaskStream
from .data.synthetic import load_pairs
from .errors import DataError
from .recipe import DataConfig, Recipe
from .strategies import Strategy

if TYPE_CHECKING:
    from .planning import StagePlan

log = logging.getLogger("label_efficient")


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
        store = store_for(spec, cfg)
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
        if labeled:
            store.fit_normalization(labeled)  # CT: foreground statistics of the labelled train cases (else no-op)
        return cls(cfg, spec, store, labeled, unlabeled)

    def volumes(self, split: str | None, limit: int | None, with_label: bool = True):
        if not split:
            return []
        cases = self.spec.select(split, self.cfg.domain)
        vols = eval_volumes(self.store, cases, with_label)
        return vols[:limit] if limit else vols

    @classmethod
    def for_stage(cls, plan: "StagePlan", seed: int) -> "DataContext":
        return cls.build(plan.data, seed, source_free=plan.source_free, label_free=plan.label_free)

    @property
    def meta(self) -> dict:
        return {"spatial_dims": self.spec.spatial_dims, "in_channels": self.spec.in_channels,
                "num_classes": self.spec.num_classes}


def store_for(spec: DatasetSpec, cfg: DataConfig) -> CaseStore:
    """The case store of a data section: 2D images resized to ``image_size`` (or kept at their own size when only
    ``patch_size`` is set), NIfTI volumes on the ``orientation`` / ``spacing`` grid, ``normalize``, ``cache_dir``."""
    return CaseStore(spec, cfg.image_size, cfg.on_corrupt, spacing=cfg.spacing, orientation=cfg.orientation,
                     normalize=cfg.normalize, cache_dir=cfg.cache_dir, native=cfg.patch_size is not None)


def streams(plan: "StagePlan", strategy: Strategy, ctx: DataContext, synthetic=None,
            seed: int = 0) -> dict[str, Stream | MaskStream]:
    """The batch streams the stage's strategy declares (``Requirements.streams``), over the stage's cases."""
    out, options, batch = {}, strategy.stream_options(), plan.stage.batch_size
    if "labeled" in plan.streams:
        extra = {"synthetic": synthetic, "synthetic_ratio": ctx.cfg.synthetic.ratio} if synthetic else {}
        out["labeled"] = Stream(ctx.labeled, batch.labeled, with_label=True, **options.get("labeled", {}), **extra)
    if "unlabeled" in plan.streams:
        if not ctx.unlabeled:
            raise DataError(f"stage '{plan.name}': strategy '{strategy.name}' needs unlabelled data, but the "
                            "label budget leaves no unlabelled case in the train split; lower the budget")
        out["unlabeled"] = Stream(ctx.unlabeled, batch.unlabeled, with_label=False, **options.get("unlabeled", {}))
    if "aux_masks" in plan.streams:  # unpaired masks, as many per batch as images
        masks = build_aux_masks(ctx.cfg.aux_masks, ctx.spec, ctx.cfg.image_size, seed)
        log.info("stage '%s': %d auxiliary masks (%s)", plan.name, len(masks), ctx.cfg.aux_masks.kind)
        out["aux_masks"] = MaskStream(masks, batch.unlabeled if "unlabeled" in plan.streams else batch.labeled)
    return out


def synthetic_pairs(recipe: Recipe, i: int, ctx: DataContext, out: Path):
    """Generated pairs a stage adds to its labelled stream (``data.synthetic``), or ``None``."""
    syn = ctx.cfg.synthetic
    if syn is None:
        return None
    if syn.path is not None:
        return load_pairs(Path(syn.path), ctx.store)
    names = [st.name or st.strategy for st in recipe.stages]
    j = names.index(syn.from_stage)
    return load_pairs(out / f"stage{j}_{names[j]}" / "generated", ctx.store)
