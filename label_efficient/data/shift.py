"""A simulated modality shift: a second "scanner" domain made from real volumes (dataset ``simulated_shift``).

No labelled cross-modality pair of volumes is available here, so unsupervised domain adaptation is benchmarked on a
*simulated* shift of one real dataset. Within every split, a fixed, seeded half of the patients (``target_fraction``)
becomes domain ``target``; the rest stays ``source``: the two domains never share a patient. Every image of a target
patient goes through one deterministic, non-linear intensity remap (the "target scanner"), applied after the store's
preprocessing (so at the training size); its labels are untouched::

    u = clip(x, 0, 1) ** gamma             non-linear intensity curve
    u = 1 - u                               contrast inversion (bright blood pool becomes dark, background bright)
    u = u * (1 + bias * <d, r>)             smooth linear bias field across the slice plane; its direction d is
                                            drawn per volume (from the volume id), r in [-1, 1]² the in-plane position
    u = clip(gaussian_blur(u, blur_sigma))  lower resolution (sigma in pixels of the stored image)

Source images are returned as they are. The base dataset must have unit intensities (images in [0, 1], e.g. ``acdc``)
and no domains of its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from .datasets import DATASETS, Case, DatasetSpec, build_dataset
from .readers import DataError

SOURCE, TARGET = "source", "target"


@dataclass(frozen=True)
class ScannerShift:
    """The target scanner's intensity remap ``(image (C, *S), case) -> image``; identity for source cases."""

    gamma: float = 0.6
    invert: bool = True
    bias: float = 0.3
    blur_sigma: float = 1.0

    def __call__(self, image: np.ndarray, case: Case) -> np.ndarray:
        if case.domain != TARGET:
            return image
        from scipy.ndimage import gaussian_filter

        u = np.clip(image, 0.0, 1.0) ** self.gamma
        if self.invert:
            u = 1.0 - u
        if self.bias:
            angle = int(hashlib.sha256(case.volume.encode()).hexdigest()[:8], 16) / 16**8 * 2 * np.pi
            h, w = image.shape[1:3]
            ry, rx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
            field = 1.0 + self.bias * (np.cos(angle) * ry + np.sin(angle) * rx)
            u = u * field.reshape(field.shape + (1,) * (image.ndim - 3))
        if self.blur_sigma > 0:
            u = np.stack([gaussian_filter(c, self.blur_sigma) for c in u])
        return np.clip(u, 0.0, 1.0).astype(np.float32)


def assign_domains(cases: list[Case], target_fraction: float, seed: int) -> list[Case]:
    """Each split's patients (``group``) shuffled with ``seed``; the first ``target_fraction`` become ``target``."""
    target: set[str] = set()
    for split in sorted({c.split for c in cases}):
        groups = sorted({c.group for c in cases if c.split == split})
        order = np.random.default_rng(seed).permutation(len(groups))
        target |= {groups[i] for i in order[: round(target_fraction * len(groups))]}
    return [replace(c, domain=TARGET if c.group in target else SOURCE) for c in cases]


@DATASETS.register("simulated_shift")
def simulated_shift(root: str | None = None, base: str = "acdc", base_options: Mapping[str, Any] | None = None,
                    target_fraction: float = 0.5, seed: int = 0, gamma: float = 0.6, invert: bool = True,
                    bias: float = 0.3, blur_sigma: float = 1.0) -> DatasetSpec:
    """``base`` split by patient into domains ``source`` (as is) and ``target`` (the remapped scanner, see module)."""
    spec = build_dataset(base, root, **dict(base_options or {}))
    if spec.intensity != "unit":
        raise DataError(f"simulated_shift remaps unit intensities in [0, 1]; dataset '{base}' is {spec.intensity}-"
                        "normalised")
    if any(c.domain for c in spec.cases):
        raise DataError(f"dataset '{base}' already has domains {sorted({c.domain for c in spec.cases})}: use them "
                        "instead of a simulated shift")
    if not 0 < target_fraction < 1:
        raise DataError(f"simulated_shift: target_fraction must be in (0, 1), got {target_fraction}")
    return replace(spec, name=f"{spec.name}+shift{seed}", cases=assign_domains(spec.cases, target_fraction, seed),
                   image_remap=ScannerShift(gamma, invert, bias, blur_sigma))
