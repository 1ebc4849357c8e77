"""Checks of a recipe against its data and this machine, run before any output is written or any step trained.

Everything that can be known before training is checked here, so a bad input costs seconds, not a run: the
dataset builds from ``data.options``, every split a stage reads exists, each strategy takes the data's
dimensionality and intensity scaling, the backbone builds from ``backbone.kwargs``, the accelerator exists, the
2D images share one bit depth, and the resized images fit in memory.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .backbones import build_backbone
from .context import store_for
from .data import DatasetSpec, build_dataset
from .errors import DataError, RecipeError
from .recipe import DataConfig, Recipe
from .registry import did_you_mean
from .planning import check_strategy_fits, plan_stage

log = logging.getLogger("label_efficient")


def check_recipe(recipe: Recipe) -> None:
    """Raise a :class:`~label_efficient.errors.UserError` naming the key or file of the first problem found."""
    check_accelerator(recipe.trainer.accelerator)
    for i, stage in enumerate(recipe.stages):
        data = recipe.stage_data(i)
        spec = build_dataset(data.dataset, data.root, **data.options)
        check_splits(spec, data, f"stages.{i}" if stage.data else "data")
        if i == len(recipe.stages) - 1:
            check_split(spec, recipe.evaluation.split, "evaluation.split")
        check_strategy_fits(plan_stage(recipe, i), spec.intensity, spec.spatial_dims, spec.name)
        check_backbone(recipe, spec)
        if data.patch_size is not None and len(data.patch_size) != spec.spatial_dims:
            raise RecipeError(f"data.patch_size {data.patch_size} has {len(data.patch_size)} axes, but dataset "
                              f"'{spec.name}' is {spec.spatial_dims}D")
        if spec.format == "image2d":
            store = store_for(spec, data)
            for case in spec.cases:
                store.check_header(case.image)
            check_memory(spec, data)


def split_names(spec: DatasetSpec) -> list[str]:
    return sorted({c.split for c in spec.cases})


def check_split(spec: DatasetSpec, split: str | None, key: str, domain: str | None = None) -> None:
    """``split`` names a split of ``spec`` (with cases of ``domain``)."""
    if split is None:
        return
    names = split_names(spec)
    if split not in names:
        raise RecipeError(f"{key}: '{split}' is not a split of dataset '{spec.name}'.{did_you_mean(split, names)} "
                          f"Its splits: {names} (set data.train_split, data.val_split and evaluation.split to them)")
    if domain is not None and not spec.select(split, domain):
        raise RecipeError(f"{key}: split '{split}' of dataset '{spec.name}' has no case of domain '{domain}'")


def check_splits(spec: DatasetSpec, data: DataConfig, where: str) -> None:
    check_split(spec, data.train_split, f"{where}.train_split" if where != "data" else "data.train_split",
                data.labeled_domain or data.domain)
    check_split(spec, data.val_split, f"{where}.val_split" if where != "data" else "data.val_split", data.domain)


def check_backbone(recipe: Recipe, spec: DatasetSpec) -> None:
    """The backbone builds from ``backbone.kwargs`` (a typo there names the key, not a TypeError deep inside)."""
    b = recipe.backbone
    try:
        build_backbone(b.name, spec.spatial_dims, spec.in_channels, spec.num_classes, tap_points=b.tap_points,
                       **b.kwargs)
    except TypeError as e:
        raise RecipeError(f"backbone.kwargs of '{b.name}': {e}") from None
    except ValueError as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"backbone '{b.name}' with kwargs {b.kwargs}: {e}") from None


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RecipeError(f"trainer.accelerator: '{accelerator}', but torch {torch.__version__} sees no CUDA GPU; "
                          "use auto (GPU when there is one) or cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise RecipeError("trainer.accelerator: 'mps', but no Apple GPU is available; use auto or cpu")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(spec: DatasetSpec, data: DataConfig) -> None:
    """The resized 2D images a run holds (float32 image, int64 label) fit in the memory available."""
    if data.image_size is None:
        return
    per_case = int(np.prod(data.image_size)) * (4 * spec.in_channels + 8)
    need, have = per_case * len(spec.cases), available_memory()
    if have is not None and need > 0.8 * have:
        raise DataError(f"data.image_size {data.image_size}: the {len(spec.cases)} images of '{spec.name}' would "
                        f"need {need / 2**30:.1f} GiB in memory, {have / 2**30:.1f} GiB is available; lower "
                        "data.image_size")
