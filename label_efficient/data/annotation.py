"""Sparse annotation: which voxels of a labelled case an annotator marked (``label_mask``).

``dense`` (default) marks every voxel. ``slices`` simulates barely-supervised annotation (DeSCO, Cai et al. CVPR
2023): one slice per listed spatial axis is annotated (e.g. an axial and a coronal slice of a 3D volume); every other
voxel's label is erased (set to 0) and excluded by ``label_mask``, so the dense label never reaches training.
"""
from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .readers import DataError

log = logging.getLogger(__name__)


class AnnotationConfig(BaseModel):
    """``kind: slices``: annotate ``axes`` (spatial axes, 0-based; LA volumes are (x, y, z): ``[2, 1]`` = axial +
    coronal) at ``index`` (``middle`` or one slice index per axis)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dense", "slices"] = "dense"
    axes: list[int] = Field(default_factory=lambda: [2, 1], min_length=1)
    index: Literal["middle"] | list[int] = "middle"


class SliceAnnotation:
    """Erase a dense label outside the annotated slices; count the slices that miss the foreground."""

    def __init__(self, cfg: AnnotationConfig):
        if cfg.kind != "slices":
            raise ValueError("SliceAnnotation needs annotation.kind = slices")
        if isinstance(cfg.index, list) and len(cfg.index) != len(cfg.axes):
            raise DataError(f"annotation.index gives {len(cfg.index)} slice indices for {len(cfg.axes)} axes "
                            f"{cfg.axes}: give one per axis, or 'middle'")
        self.cfg = cfg
        self.empty_slices: list[str] = []  #: "case axis=a index=i" of annotated slices without foreground

    def slice_indices(self, shape: tuple[int, ...], case_id: str) -> list[int]:
        out = []
        for k, axis in enumerate(self.cfg.axes):
            if not 0 <= axis < len(shape):
                raise DataError(f"annotation axis {axis} does not exist in case {case_id} of spatial shape {shape}")
            i = shape[axis] // 2 if self.cfg.index == "middle" else self.cfg.index[k]
            if not 0 <= i < shape[axis]:
                raise DataError(f"annotated slice index {i} on axis {axis} is outside case {case_id} "
                                f"(size {shape[axis]} on that axis)")
            out.append(i)
        return out

    def __call__(self, label: np.ndarray, case_id: str) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        """``(sparse label, label_mask, {axis: slice index})`` of a dense ``label`` (*spatial)."""
        mask = np.zeros(label.shape, dtype=np.float32)
        where = {}
        for axis, i in zip(self.cfg.axes, self.slice_indices(label.shape, case_id)):
            sl = [slice(None)] * label.ndim
            sl[axis] = i
            mask[tuple(sl)] = 1.0
            where[axis] = i
            if not label[tuple(sl)].any():
                self.empty_slices.append(f"{case_id} axis={axis} index={i}")
                log.warning("case %s: annotated slice %d on axis %d has no foreground (%d such slices so far)",
                            case_id, i, axis, len(self.empty_slices))
        return np.where(mask > 0, label, 0).astype(label.dtype), mask, where
