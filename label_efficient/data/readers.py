"""Readers for 2D image files, 3D NIfTI (MONAI) and HDF5, with validation that names the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np


from ..errors import CorruptFileError, DataError  # noqa: F401  (re-exported: their historical home)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


#: PIL modes of grey images, and the bit depth of each mode (what scales an image: 8-bit /255, else raw)
GREY_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L", "I", "F")
_DEPTH = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


def image_depth(mode: str) -> int:
    """Bits per sample of a PIL ``mode`` (8 for every 8-bit mode: L, RGB, P, …)."""
    return _DEPTH.get(mode, 8)


def read_image_2d(path: str | Path, in_channels: int = 1) -> np.ndarray:
    """Read a 2D grey or RGB image as float32 (C, H, W) in [0, 1] (8-bit) or raw range (16-bit / float TIFF).

    A grey image for an RGB model is refused (its colour channels would be copies); an RGB image for a grey model is
    converted to luminance. NaN or infinite pixels (float TIFF) are a :class:`CorruptFileError`."""
    from PIL import Image, UnidentifiedImageError

    if in_channels not in (1, 3):
        raise DataError(f"{path}: in_channels must be 1 or 3 for 2D images, got {in_channels}")
    try:
        with Image.open(path) as im:
            im.load()
            if in_channels == 3 and im.mode in GREY_MODES:
                raise DataError(f"{path} is a grey image (mode {im.mode}) but the model takes RGB images: "
                                "convert it to RGB, or use a model trained on grey images")
            if in_channels == 1:
                im = im.convert("L") if im.mode not in ("L", "I;16", "I", "F") else im
            else:
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CorruptFileError(f"cannot read image {path}: {e}") from e
    arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
    check_finite(arr, path)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def check_finite(array: np.ndarray, path: str | Path) -> None:
    """Refuse NaN or infinite intensities, naming the file (they would poison every loss and statistic)."""
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise CorruptFileError(f"image {path} holds {bad} NaN or infinite value(s): fix the file, remove the case, "
                               "or set data.on_corrupt: skip")


def read_mask_2d(path: str | Path) -> np.ndarray:
    """Read a 2D label map (single channel, integer values) as int64 (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise CorruptFileError(f"cannot read mask {path}: {e}") from e
    if arr.ndim == 3:
        if not (arr == arr[..., :1]).all():
            raise DataError(f"mask {path} has {arr.shape[-1]} different channels; a label map must be single-channel")
        arr = arr[..., 0]
    return arr.astype(np.int64)


def read_volume(path: str | Path) -> np.ndarray:
    """Read a NIfTI (or any MONAI-readable) volume as float32 (X, Y, Z) with MONAI ``LoadImage``."""
    return read_volume_affine(path)[0]


def read_volume_affine(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_volume` plus the volume's voxel-to-world affine (4×4 float64, RAS world as NIfTI stores it)."""
    from monai.transforms import LoadImage

    try:
        volume = LoadImage(image_only=False, dtype=np.float32)(str(path))[0]
        affine = np.asarray(volume.affine, dtype=np.float64) if hasattr(volume, "affine") else np.eye(4)
        volume = np.asarray(volume)
    except Exception as e:  # MONAI raises several types for unreadable files
        raise CorruptFileError(f"cannot read volume {path}: {e}") from e
    if volume.ndim != 3:
        raise DataError(f"volume {path} has shape {volume.shape}: one 3D volume (X, Y, Z) per file is expected "
                        "(split a 4D series into one file per time point or channel)")
    check_finite(volume, path)
    return volume, affine


def read_h5(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an SSL4MIS-style HDF5 file with datasets ``image`` and (optionally) ``label``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            image = np.asarray(f["image"], dtype=np.float32)
            label = np.asarray(f["label"]).astype(np.int64) if "label" in f else None
    except (OSError, KeyError) as e:
        raise CorruptFileError(f"cannot read HDF5 {path} (needs dataset 'image'): {e}") from e
    check_finite(image, path)
    return image, label


def check_pair(image: np.ndarray, mask: np.ndarray, num_classes: int, where: str) -> None:
    """Raise a ``DataError`` when the mask does not fit the image or holds undeclared label values."""
    if tuple(image.shape[-mask.ndim:]) != tuple(mask.shape):
        raise DataError(f"{where}: image shape {tuple(image.shape)} does not match mask shape {tuple(mask.shape)}")
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(
            f"{where}: mask holds label value(s) {bad.tolist()} outside the declared classes 0..{num_classes - 1}"
        )
