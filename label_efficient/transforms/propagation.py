"""Registration-based propagation of one annotated slice through its volume (DeSCO, Cai et al. CVPR 2023, §3.1).

From the annotated slice g along ``axis``, going up then down (``registration.py`` of the DeSCO code): the image of
the last labelled slice (moving) is registered onto its neighbour (fixed) with ANTs SyNRA (rigid + affine + SyN), the label is warped with nearest-neighbour interpolation and cleaned with a 5×5
opening and a 5×5 closing (one iteration each, per class), and becomes the next slice's label. The annotated slice
is kept exactly. ANTsPy (``antspyx``) is the spec's registration library, so no substitute is needed.
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


def _clean(label: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """Per-class binary opening then closing with a ``size``×``size`` square (classes painted in index order)."""
    if size <= 1:
        return label
    out = np.zeros_like(label)
    st = np.ones((size, size), dtype=bool)
    for c in range(1, num_classes):
        m = ndimage.binary_closing(ndimage.binary_opening(label == c, st), st)
        out[m] = c
    return out


class SlicePropagator:
    """``propagate(image (*S), label (*S), axis, index)`` → dense label (*S) grown from slice ``index`` of ``axis``.

    ``transform``: an ANTs ``type_of_transform`` (``SyNRA``, the one the DeSCO code asks for; a misspelt keyword
    there makes ANTs run its default SyN); ``morphology``: the opening/closing
    size (0: none); ``seed``: ANTs' random seed (one ITK thread; SyN still varies a little between repeats: Dice of the
    test's propagated label 0.83-0.96 over repeats in one process, so targets are cached once per run). A registration
    that fails (e.g. on a blank slice) copies the label unchanged and is counted in ``failed``."""

    def __init__(self, transform: str = "SyNRA", morphology: int = 5, seed: int = 0):
        self.transform, self.morphology, self.seed = transform, morphology, seed
        self.failed = 0

    def _step(self, moving_img: np.ndarray, fixed_img: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
        import ants

        if not label.any():
            return label
        try:
            fixed, moving = ants.from_numpy(fixed_img.astype(np.float32)), ants.from_numpy(moving_img.astype(np.float32))
            reg = ants.registration(fixed, moving, type_of_transform=self.transform)
            warped = ants.apply_transforms(fixed, ants.from_numpy(label.astype(np.float32)), reg["fwdtransforms"],
                                           interpolator="nearestNeighbor").numpy()
        except (RuntimeError, ValueError) as e:
            self.failed += 1
            log.warning("registration failed (%s); the label is copied to the next slice", str(e).splitlines()[0])
            return label
        return _clean(np.rint(warped).astype(label.dtype), self.morphology, num_classes)

    def propagate(self, image: np.ndarray, label: np.ndarray, axis: int, index: int, num_classes: int) -> np.ndarray:
        if image.shape != label.shape:
            raise ValueError(f"image {image.shape} and label {label.shape} differ")
        if not 0 <= index < image.shape[axis]:
            raise ValueError(f"annotated slice {index} is outside axis {axis} of size {image.shape[axis]}")
        import ants

        # reproducible registration: ANTs' affine stage samples metric points at random (a fixed --random-seed and
        # one ITK thread; antspy's switch also reseeds numpy's and random's global generators with the same seed)
        ants.config.set_ants_deterministic(True, self.seed)
        img, lab = np.moveaxis(image, axis, 0), np.moveaxis(label, axis, 0)
        out = np.zeros_like(lab)
        out[index] = lab[index]
        for direction in (1, -1):  # up, then down
            i = index
            while 0 <= i + direction < len(lab):
                out[i + direction] = self._step(img[i], img[i + direction], out[i], num_classes)
                i += direction
        return np.moveaxis(out, 0, axis)
