"""Load, validate, preprocess and cache cases. Unlabelled cases never have their mask read."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import Case, DatasetSpec
from .readers import (GREY_MODES, CorruptFileError, DataError, check_pair, image_depth, read_h5, read_image_2d, read_mask_2d,
                      read_volume)

log = logging.getLogger(__name__)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float image."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    t = torch.from_numpy(image)[None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0].numpy()


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map."""
    if tuple(label.shape) == tuple(size):
        return label
    t = torch.from_numpy(label)[None, None].float()
    return F.interpolate(t, size=tuple(size), mode="nearest-exact")[0, 0].long().numpy()


@dataclass
class Loaded:
    image: np.ndarray  # (C, *spatial) float32, preprocessed (resized in 2D, normalised)
    label: np.ndarray | None  # (*spatial) int64 at the same size as image
    original_label: np.ndarray | None  # (*spatial) int64 at the file's own size (for evaluation)
    original_size: tuple[int, ...]  # spatial size of the file


class CaseStore:
    """In-memory cache of preprocessed cases of one dataset.

    ``on_corrupt='skip'`` drops unreadable files (counted in ``skipped``) instead of failing.
    """

    def __init__(self, spec: DatasetSpec, image_size: Sequence[int] | None = None,
                 on_corrupt: Literal["error", "skip"] = "error"):
        if spec.spatial_dims == 2 and image_size is None:
            raise DataError(f"dataset '{spec.name}' is 2D: set data.image_size (e.g. [128, 128])")
        self.spec = spec
        self.image_size = tuple(image_size) if image_size is not None else None
        self.on_corrupt = on_corrupt
        self.skipped: list[str] = []
        self._cache: dict[tuple[str, bool], Loaded] = {}
        self._depth: tuple[int, str] | None = None  # (bit depth, first file) of the 2D images read

    def _read(self, case: Case, with_label: bool) -> Loaded:
        spec = self.spec
        label = None
        if spec.format == "image2d":
            self.check_header(case.image)
            image = read_image_2d(case.image, spec.in_channels)
            if with_label:
                if case.mask is None:
                    raise DataError(f"case {case.id}: image {case.image} has no mask")
                label = read_mask_2d(case.mask)
        elif spec.format == "nifti":
            image = read_volume(case.image)[None]
            if with_label:
                if case.mask is None:
                    raise DataError(f"case {case.id}: volume {case.image} has no label volume")
                label = np.rint(read_volume(case.mask)).astype(np.int64)
        else:
            image, lab = read_h5(case.image)
            image = image[None]
            if with_label:
                if lab is None:
                    raise DataError(f"case {case.id}: {case.image} has no 'label' dataset")
                label = lab
        if label is not None:
            check_pair(image, label, spec.num_classes, f"case {case.id} ({case.image})")
        if spec.intensity == "zscore":
            image = (image - image.mean()) / max(float(image.std()), 1e-8)
        image = image.astype(np.float32)
        original, original_size = label, tuple(image.shape[1:])
        if spec.spatial_dims == 2:
            image = resize_image(image, self.image_size)
            label = resize_label(label, self.image_size) if label is not None else None
        if spec.image_remap is not None:
            image = spec.image_remap(image, case)
        return Loaded(image, label, original, original_size)

    def check_header(self, path: str) -> None:
        """RGB images for an RGB dataset, and one bit depth per dataset: 8-bit images are scaled to [0, 1] and 16-bit ones kept raw, so a folder mixing
        them would train on two intensity scales."""
        from PIL import Image

        try:
            with Image.open(path) as im:
                depth, mode = image_depth(im.mode), im.mode
        except OSError:
            return  # unreadable: read_image_2d names it
        if self.spec.in_channels == 3 and mode in GREY_MODES:
            raise DataError(f"{path} is a grey image (mode {mode}) but dataset '{self.spec.name}' is RGB "
                            "(in_channels 3): convert it to RGB, or set data.options.in_channels: 1")
        if self._depth is None:
            self._depth = (depth, path)
        elif depth != self._depth[0]:
            raise DataError(f"{path} is a {depth}-bit image but {self._depth[1]} is {self._depth[0]}-bit: 8-bit images "
                            "are scaled to [0, 1] and 16-bit ones kept raw, so convert every image to one bit depth")

    def get(self, case: Case, with_label: bool) -> Loaded:
        key = (case.id, with_label)
        if key not in self._cache:
            self._cache[key] = self._read(case, with_label)
        return self._cache[key]

    def load(self, cases: Iterable[Case], with_label: bool) -> list[Case]:
        """Load (and validate) ``cases``; returns those usable (all, unless ``on_corrupt='skip'``)."""
        ok = []
        for c in cases:
            try:
                self.get(c, with_label)
                ok.append(c)
            except CorruptFileError as e:
                if self.on_corrupt == "error":
                    raise
                self.skipped.append(c.id)
                log.warning("skipping corrupt case %s: %s", c.id, e)
        return ok
