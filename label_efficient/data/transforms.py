"""Per-sample augmentation: albumentations for 2D (CPU), MONAI for 3D; seeded per sample for exact resume.

Besides the image and its label, a sample may carry per-pixel *maps* (``label_mask`` of a sparse annotation, a
strategy's per-case targets such as propagated labels or distance maps): they follow the label's geometry exactly
(nearest-neighbour, zero fill).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Maps = Mapping[str, np.ndarray]


class Augment2D:
    """SSL4MIS/BCP weak augmentation: rot90 + flip (p=.5) or rotation ±20° (p=.25), else identity.

    A non-square image keeps its shape: its symmetries are the flips and the half turn (a quarter turn would
    transpose it and the batch would no longer stack)."""

    def __init__(self, enabled: bool = True, rotate_limit: float = 20.0):
        import albumentations as A
        import cv2

        self.enabled = enabled
        rotate = A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5)
        self.compose = A.Compose([A.OneOf([A.SquareSymmetry(p=1.0), rotate], p=0.75)])
        flips = A.Sequential([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], p=1.0)
        self.compose_rect = A.Compose([A.OneOf([flips, rotate], p=0.75)])

    def __call__(self, image: np.ndarray, label: np.ndarray | None, seed: int, maps: Maps | None = None):
        """``(image, label, maps)`` augmented alike; ``label`` and ``maps`` may be ``None``."""
        if not self.enabled:
            return image, label, dict(maps or {})
        compose = self.compose if image.shape[1] == image.shape[2] else self.compose_rect
        compose.set_random_seed(seed)
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
        names = list(maps or {})
        if not names:
            out = compose(image=hwc, mask=label) if label is not None else compose(image=hwc)
            label_out, warped = out.get("mask"), []
        else:  # label and maps through one (float) path, so nearest-neighbour picks the same source pixel for all
            stack = ([label.astype(np.float32)] if label is not None else []) + [maps[k].astype(np.float32) for k in names]
            out = compose(image=hwc, masks=stack)
            warped = list(out["masks"])
            label_out = np.rint(warped.pop(0)).astype(label.dtype) if label is not None else None
        img = out["image"]
        img = img[..., None] if img.ndim == 2 else img
        return (np.ascontiguousarray(img.transpose(2, 0, 1)), label_out,
                {k: np.ascontiguousarray(m) for k, m in zip(names, warped)})


class Augment3D:
    """Random crop of ``patch_size`` (zero-padded when the volume is smaller) + rot90/flip in-plane (MONAI: a quarter
    turn k ∈ {1, 2, 3} with p = ½, a flip of each in-plane axis with p = ½, so all 8 in-plane symmetries occur; the
    UA-MT-family LA codes draw k ∈ {0…3} and always one flip); no quarter turn when the patch is not square in-plane.

    ``foreground_ratio`` = p (nnU-Net: 1/3): with probability p a sample's crop is centred on a foreground voxel
    (a foreground class drawn uniformly among those present, then one of its voxels; clipped so the patch stays
    inside the padded volume), else uniform as with p = 0 (which draws exactly the crops it always did). Both draws
    depend only on the sample's seed (exact resume). ``foreground``: precomputed (N, 1 + 3) rows ``(class, x, y, z)``
    (:func:`~label_efficient.data.geometry.foreground_locations`); without them the label's voxels are used."""

    def __init__(self, patch_size: Sequence[int], enabled: bool = True, foreground_ratio: float = 0.0):
        from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropd, SpatialPadd

        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio must lie in [0, 1], got {foreground_ratio}")
        keys = ["image", "label", "maps"]
        self.patch_size = tuple(patch_size)
        self.foreground_ratio = float(foreground_ratio)
        self.pad = SpatialPadd(keys, self.patch_size, allow_missing_keys=True)
        crop = [self.pad, RandSpatialCropd(keys, self.patch_size, random_size=False, allow_missing_keys=True)]
        # a quarter turn in-plane only when it keeps the patch's shape
        turn = [RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1), allow_missing_keys=True)] \
            if self.patch_size[0] == self.patch_size[1] else []
        aug = turn + [RandFlipd(keys, prob=0.5, spatial_axis=0, allow_missing_keys=True),
               RandFlipd(keys, prob=0.5, spatial_axis=1, allow_missing_keys=True)]
        self.compose = Compose(crop + (aug if enabled else []))
        self.aug = Compose(aug if enabled else [])

    def _centre(self, label: np.ndarray | None, foreground: np.ndarray | None, seed: int) -> np.ndarray | None:
        """The foreground voxel a crop is centred on, or None (uniform crop)."""
        if self.foreground_ratio <= 0 or label is None:
            return None
        rng = np.random.default_rng([seed % 2**32, 0x46475F43])  # a stream of its own: the MONAI ones stay as they were
        if rng.random() >= self.foreground_ratio:
            return None
        if foreground is None:
            from .geometry import foreground_locations

            foreground = foreground_locations(label)
        if len(foreground) == 0:
            return None
        classes = np.unique(foreground[:, 0])
        rows = foreground[foreground[:, 0] == classes[rng.integers(len(classes))]]
        return np.asarray(rows[rng.integers(len(rows))][1:], dtype=np.int64)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, seed: int, maps: Maps | None = None,
                 foreground: np.ndarray | None = None):
        """``(image, label, maps)`` cropped and augmented alike; ``label`` and ``maps`` may be ``None``."""
        centre = self._centre(label, foreground, seed)
        self.compose.set_random_state(seed=seed % 2**32)
        d = {"image": image}
        if label is not None:
            d["label"] = label[None]
        names = list(maps or {})
        if names:
            d["maps"] = np.stack([np.asarray(maps[k], dtype=np.float32) for k in names])
        if centre is None:
            out = self.compose(d)
        else:
            self.aug.set_random_state(seed=seed % 2**32)
            shape = np.asarray(image.shape[1:])
            before = np.maximum(np.asarray(self.patch_size) - shape, 0) // 2  # SpatialPadd pads symmetrically
            padded = np.maximum(shape, self.patch_size)
            start = np.clip(centre + before - np.asarray(self.patch_size) // 2, 0, padded - self.patch_size)
            box = (slice(None),) + tuple(slice(int(a), int(a) + p) for a, p in zip(start, self.patch_size))
            d = self.pad(d)
            out = self.aug({k: v[box] for k, v in d.items()})
        img = np.asarray(out["image"], dtype=np.float32)
        lab = np.asarray(out["label"])[0].astype(np.int64) if label is not None else None
        return img, lab, {k: np.asarray(out["maps"][i], dtype=np.float32) for i, k in enumerate(names)}


class PatchAugment2D:
    """2D patch training at native resolution: a random ``patch_size`` crop (zero-padded where the image is smaller;
    with probability ``foreground_ratio`` centred on a foreground pixel, as :class:`Augment3D`, whose MONAI crop is
    dimension-generic), then the weak 2D augmentation of :class:`Augment2D` on the patch."""

    def __init__(self, patch_size: Sequence[int], enabled: bool = True, foreground_ratio: float = 0.0):
        self.patch_size = tuple(patch_size)
        self.crop = Augment3D(self.patch_size, enabled=False, foreground_ratio=foreground_ratio)
        self.augment = Augment2D(enabled=enabled)
        self._said_padded = False

    def __call__(self, image: np.ndarray, label: np.ndarray | None, seed: int, maps: Maps | None = None,
                 foreground: np.ndarray | None = None):
        if not self._said_padded and any(s < p for s, p in zip(image.shape[1:], self.patch_size)):
            import logging

            logging.getLogger("label_efficient").info(
                "an image of size %s is smaller than data.patch_size %s: it is zero-padded (said once)",
                list(image.shape[1:]), list(self.patch_size))
            self._said_padded = True
        img, lab, maps = self.crop(image, label, seed, maps, foreground=foreground)
        return self.augment(np.ascontiguousarray(img), lab, seed, maps)
