"""Auxiliary unpaired masks (``data.aux_masks``): masks of the target structure that belong to *no* training image.

Strategies that learn a mask prior from unpaired masks (CycleGAN pseudo labels, Wang et al. TMI 2021) declare
``needs_aux_masks`` and get a stream ``"aux_masks"`` whose batches are ``{"label": (B, *S)}`` only, sampled
independently of the image streams and augmented with the labels' geometric augmentation. Two sources:

* ``{kind: shapes, count: N, ...}``: a shape model of random filled ellipses (binary, 2 classes) with configurable
  semi-axis, aspect, centre and rotation ranges, deterministic for ``seed``, at the stage's image size;
* ``{kind: dataset, dataset: <name>, domain: <d>, split: train, budget: {...}}``: the masks (only, no image is read)
  of another dataset or domain, resized like labels (nearest neighbour) to the stage's image size. Its class count
  must equal the stage dataset's.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .budget import LabelBudget, split_labeled
from .datasets import DatasetSpec, build_dataset
from .readers import DataError, read_mask_2d
from .store import resize_label


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ordered(rng: tuple[float, float], name: str, lo: float, hi: float) -> None:
    if not lo <= rng[0] <= rng[1] <= hi:
        raise ValueError(f"aux_masks.{name} must be an interval [a, b] with {lo} ≤ a ≤ b ≤ {hi}, got {list(rng)}")


class ShapeMasks(_Strict):
    """Random filled ellipses; lengths are fractions of the image side (defaults: polyp-sized blobs, mean area
    ≈ 0.14 of the image as Kvasir's 0.154)."""

    kind: Literal["shapes"]
    count: int = Field(500, ge=1)
    semi_axis: tuple[float, float] = (0.12, 0.35)  #: major semi-axis
    aspect: tuple[float, float] = (0.6, 1.0)  #: minor / major semi-axis
    centre: tuple[float, float] = (0.3, 0.7)  #: centre coordinates, per axis
    seed: int = 0  #: added to the recipe seed

    @model_validator(mode="after")
    def _ranges(self):
        _ordered(self.semi_axis, "semi_axis", 0.0, 1.0)
        _ordered(self.aspect, "aspect", 0.0, 1.0)
        _ordered(self.centre, "centre", 0.0, 1.0)
        return self


class DatasetMasks(_Strict):
    """The masks of another dataset / domain (e.g. ``polyp_kvasir_cvc`` domain ``cvc_clinicdb`` for Kvasir)."""

    kind: Literal["dataset"]
    dataset: str
    root: str | None = None
    options: dict[str, Any] = {}
    domain: str | None = None
    split: str = "train"
    budget: LabelBudget = LabelBudget(all=True)  #: which of its cases' masks (by group) are used


AuxMasksConfig = Annotated[Union[ShapeMasks, DatasetMasks], Field(discriminator="kind")]


def ellipse_masks(cfg: ShapeMasks, size: Sequence[int], seed: int) -> list[np.ndarray]:
    """``cfg.count`` binary (H, W) int64 ellipse masks, deterministic for ``seed``."""
    rng = np.random.default_rng([seed, cfg.seed])
    h, w = size
    side = min(h, w)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    out = []
    for _ in range(cfg.count):
        a = rng.uniform(*cfg.semi_axis) * side
        b = a * rng.uniform(*cfg.aspect)
        cy, cx = rng.uniform(*cfg.centre) * h, rng.uniform(*cfg.centre) * w
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        m = (u / a) ** 2 + (v / max(b, 0.5)) ** 2 <= 1
        if not m.any():  # a sub-pixel ellipse: keep its centre pixel
            m[min(int(cy), h - 1), min(int(cx), w - 1)] = True
        out.append(m.astype(np.int64))
    return out


def build_aux_masks(cfg: ShapeMasks | DatasetMasks, spec: DatasetSpec, image_size: Sequence[int] | None,
                    seed: int) -> list[np.ndarray]:
    """The auxiliary masks of a stage whose dataset is ``spec`` (2D, at ``image_size``); a class count that differs
    from the stage's task is a :class:`DataError` naming both."""
    if spec.spatial_dims != 2 or image_size is None:
        raise DataError(f"data.aux_masks is for 2D datasets with data.image_size; '{spec.name}' is "
                        f"{spec.spatial_dims}D")
    if isinstance(cfg, ShapeMasks):
        if spec.num_classes != 2:
            raise DataError(f"data.aux_masks: the shape model gives binary masks (2 classes), but dataset "
                            f"'{spec.name}' has {spec.num_classes} classes; use aux masks of kind 'dataset' with "
                            f"{spec.num_classes} classes")
        return ellipse_masks(cfg, image_size, seed)
    aux = build_dataset(cfg.dataset, cfg.root, **cfg.options)
    if aux.num_classes != spec.num_classes:
        raise DataError(f"data.aux_masks: dataset '{aux.name}' has {aux.num_classes} classes, but this stage's "
                        f"dataset '{spec.name}' has {spec.num_classes} classes; auxiliary masks must label the same "
                        "classes as the images' task")
    if aux.spatial_dims != 2 or aux.format != "image2d":
        raise DataError(f"data.aux_masks: dataset '{aux.name}' is not a 2D image dataset ({aux.format})")
    cases = split_labeled(aux.select(cfg.split, cfg.domain), cfg.budget)[0]
    masks = []
    for c in cases:
        if c.mask is None:
            raise DataError(f"data.aux_masks: case {c.id} of '{aux.name}' has no mask")
        m = resize_label(read_mask_2d(c.mask), image_size)
        if m.min() < 0 or m.max() >= aux.num_classes:
            raise DataError(f"data.aux_masks: mask {c.mask} holds values outside 0..{aux.num_classes - 1}")
        masks.append(m)
    return masks
