"""Load, validate, preprocess and cache cases. Unlabelled cases never have their mask read."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import DiskCache, open_mapped
from .datasets import Case, DatasetSpec
from .geometry import (NORMALIZE, Grid, Normalize, check_orientation, check_same_grid, foreground_locations, foreground_sample,
                       foreground_stats, normalize)
from .readers import (GREY_MODES, CorruptFileError, DataError, check_pair, image_depth, read_h5, read_image_2d, read_mask_2d,
                      read_volume_affine)

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


def _label_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else (np.int16 if num_classes <= 32767 else np.int32)


@dataclass
class Loaded:
    image: np.ndarray  # (C, *spatial) float32, preprocessed (resized in 2D, normalised; 3D: on the training grid)
    label: np.ndarray | None  # (*spatial) integer label map at the same size as image
    original_label: np.ndarray | None  # (*spatial) at the file's own size and axis order (for evaluation)
    original_size: tuple[int, ...]  # spatial size of the file
    #: NIfTI: how the training grid maps back to the file's grid (None: other formats)
    grid: Grid | None = None
    #: 3D and 2D patches: up to 10,000 voxels per foreground class, rows ``(class, *voxel)`` on the training grid (labelled cases)
    foreground: np.ndarray | None = None
    #: arrays memory-mapped from the disk cache: ``{field: .npy file}`` (pickled as their paths, reopened)
    sources: dict[str, str] | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """Voxel size (mm) of the training grid; None without an affine (2D images, HDF5)."""
        return self.grid.spacing if self.grid is not None else None

    @property
    def native_spacing(self) -> tuple[float, ...] | None:
        """Voxel size (mm) of the file's own grid (that of ``original_label``)."""
        return self.grid.native_spacing if self.grid is not None else None

    @property
    def native_affine(self) -> np.ndarray | None:
        return self.grid.native_affine if self.grid is not None else None

    def to_native(self, x) -> np.ndarray:
        """Logits (C, *grid) or a label map (*grid) on the training grid → label map on the file's grid
        (:meth:`Grid.to_native`); without a grid, the argmax of logits / the label map itself."""
        if self.grid is not None:
            return self.grid.to_native(x)
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        a = a[0] if a.ndim == len(self.original_size) + 2 else a
        return (a.argmax(0) if a.ndim == len(self.original_size) + 1 else a).astype(np.int64)

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self.sources or {}:
            state[name] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name, path in (self.sources or {}).items():
            setattr(self, name, open_mapped(path))


class CaseStore:
    """Cache of preprocessed cases of one dataset: in memory, or with ``cache_dir`` on disk and memory-mapped
    (:mod:`~label_efficient.data.cache`; data larger than memory, shared by data-loader workers).

    NIfTI geometry (:mod:`~label_efficient.data.geometry`): ``orientation`` (e.g. ``"RAS"``) reorients every volume,
    ``spacing`` (mm per axis) resamples it, once per case; the label must lie on its image's grid. Both None (the
    defaults here): each volume's own grid, as before. ``normalize`` overrides the dataset's intensity scheme
    (``zscore``, ``zscore_foreground``, ``ct``; None: the dataset's own). ``ct`` needs the foreground statistics of
    the training labelled cases: call :meth:`fit_normalization` with them before loading anything (one extra
    reading pass over those cases, cached with ``cache_dir``); they are in :attr:`intensity_stats` for the bundle.

    ``on_corrupt='skip'`` drops unreadable files (counted in ``skipped``) instead of failing.
    """

    def __init__(self, spec: DatasetSpec, image_size: Sequence[int] | None = None,
                 on_corrupt: Literal["error", "skip"] = "error", *, spacing: Sequence[float] | None = None,
                 orientation: str | None = None, normalize: Normalize | None = None,
                 cache_dir: str | Path | None = None, intensity_stats: dict | None = None, native: bool = False):
        if spec.spatial_dims == 2 and image_size is None and not native:
            raise DataError(f"dataset '{spec.name}' is 2D: set data.image_size (e.g. [128, 128]) to resize every "
                            "image, or data.patch_size to train on patches at the images' own size")
        if spacing is not None and spec.format != "nifti":
            raise DataError(f"data.spacing resamples NIfTI volumes by their affine; dataset '{spec.name}' is "
                            f"'{spec.format}' (no voxel spacing): remove data.spacing")
        if normalize is not None and normalize not in NORMALIZE:
            raise DataError(f"data.normalize must be one of {list(NORMALIZE)} or null, got {normalize!r}")
        self.spec = spec
        self.image_size = tuple(image_size) if image_size is not None else None
        self.native = native  # 2D: patches are cropped from the stored images (at their own size without image_size)
        self.on_corrupt = on_corrupt
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else None
        self.orientation = check_orientation(orientation) if spec.format == "nifti" else None
        self.normalize = normalize
        self.intensity_stats = dict(intensity_stats) if intensity_stats else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._disk: DiskCache | None = None
        self.skipped: list[str] = []
        self._cache: dict[tuple[str, bool], Loaded] = {}
        self._depth: tuple[int, str] | None = None  # (bit depth, first file) of the 2D images read

    @property
    def intensity_mode(self) -> str | None:
        """The normalisation applied: ``normalize``, else the dataset's (``zscore`` or none)."""
        return self.normalize or ("zscore" if self.spec.intensity == "zscore" else None)

    def settings(self) -> dict:
        """Everything the preprocessed arrays depend on besides the files (the disk cache's key)."""
        s = self.spec
        return {"format": s.format, "spatial_dims": s.spatial_dims, "in_channels": s.in_channels,
                "num_classes": s.num_classes, "intensity": self.intensity_mode, "image_size": self.image_size,
                "spacing": self.spacing, "orientation": self.orientation, "stats": self.intensity_stats,
                **({"native": True} if self.native else {})}

    @property
    def disk(self) -> DiskCache | None:
        if self.cache_dir is None:
            return None
        if self._disk is None or self._disk.settings != DiskCache.with_version(self.settings()):
            self._disk = DiskCache(self.cache_dir, self.settings())
        return self._disk

    # --- reading -------------------------------------------------------------------------------------------------

    def _raw(self, case: Case, with_label: bool) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
        """The file's image (C, *S) float32 and label (*S) int64 as stored, checked; the grid plan (NIfTI)."""
        spec = self.spec
        label, grid = None, None
        if spec.format == "image2d":
            self.check_header(case.image)
            image = read_image_2d(case.image, spec.in_channels)
            if with_label:
                if case.mask is None:
                    raise DataError(f"case {case.id}: image {case.image} has no mask")
                label = read_mask_2d(case.mask)
        elif spec.format == "nifti":
            image, affine = read_volume_affine(case.image)
            if with_label:
                if case.mask is None:
                    raise DataError(f"case {case.id}: volume {case.image} has no label volume")
                lab, lab_affine = read_volume_affine(case.mask)
                check_same_grid(case.image, image.shape, affine, case.mask, lab.shape, lab_affine)
                label = np.rint(lab).astype(np.int64)
            image = image[None]
            grid = Grid.plan(image.shape[1:], affine, self.orientation, self.spacing)
        else:
            image, lab = read_h5(case.image)
            image = image[None]
            if with_label:
                if lab is None:
                    raise DataError(f"case {case.id}: {case.image} has no 'label' dataset")
                label = lab
        if label is not None:
            check_pair(image, label, spec.num_classes, f"case {case.id} ({case.image})")
        return image, label, grid

    def _read(self, case: Case, with_label: bool, remap: bool = True) -> Loaded:
        spec = self.spec
        image, label, grid = self._raw(case, with_label)
        mode = self.intensity_mode
        if mode == "ct" and not self.intensity_stats:
            raise DataError("data.normalize: ct needs the foreground statistics of the training labelled cases: "
                            "call CaseStore.fit_normalization(labelled train cases) before loading")
        image = normalize(image, mode, self.intensity_stats)
        image = image.astype(np.float32)
        original, original_size = label, tuple(image.shape[1:])
        if spec.spatial_dims == 2 and self.image_size is not None:  # else: native size (2D patch training)
            image = resize_image(image, self.image_size)
            label = resize_label(label, self.image_size) if label is not None else None
        if grid is not None and not grid.identity:
            image = grid.image(image)
            label = grid.label(label) if label is not None else None
        if remap and spec.image_remap is not None:
            image = spec.image_remap(image, case)
        patches = spec.spatial_dims == 3 or self.native  # foreground-centred crops need these
        foreground = foreground_locations(label) if label is not None and patches else None
        return Loaded(image, label, original, original_size, grid, foreground)

    def fit_normalization(self, cases: Iterable[Case]) -> dict | None:
        """With ``normalize='ct'``: the foreground intensity statistics (mean, std, 0.5/99.5 percentiles) of
        ``cases`` — the training *labelled* cases — read once on their native grid (10,000 foreground voxels
        sampled per case, seeded by case id, as nnU-Net's fingerprint), cached with ``cache_dir``. Other modes: no-op.
        Must run before any case is loaded (the preprocessed arrays depend on it)."""
        if self.intensity_mode != "ct" or self.intensity_stats:
            return self.intensity_stats
        cases = list(cases)
        if not cases:
            raise DataError("data.normalize: ct computes its statistics on the training labelled cases; there are none")
        if self._cache:
            raise DataError("CaseStore.fit_normalization must run before any case is loaded")
        key = None
        if self.cache_dir is not None:
            d = DiskCache(self.cache_dir, {**self.settings(), "stats": None})
            key = d.key("ct_stats", *[f for c in sorted(cases, key=lambda c: c.id) for f in (c.image, c.mask)])
            stats = d.load_json(key)
            if stats:
                self.intensity_stats = stats
                return stats
        samples = []
        for c in cases:
            try:
                image, label, _ = self._raw(c, True)
            except CorruptFileError:
                if self.on_corrupt == "error":
                    raise
                continue
            samples.append(foreground_sample(image, label, c.id))
        self.intensity_stats = foreground_stats(samples)
        log.info("ct normalisation: foreground statistics of %d labelled case(s): %s", len(samples),
                 {k: round(v, 3) for k, v in self.intensity_stats.items()})
        if key is not None:
            d.save_json(key, self.intensity_stats)
        return self.intensity_stats

    # --- disk cache ----------------------------------------------------------------------------------------------

    def _from_disk(self, case: Case, with_label: bool) -> Loaded:
        disk = self.disk
        ikey = disk.key("image", case.image)
        lkey = disk.key("label", case.image, case.mask) if with_label else None
        got_i = disk.load(ikey)
        got_l = disk.load(lkey) if with_label else None
        if got_i is None or (with_label and got_l is None):
            item = self._read(case, with_label, remap=False)
            meta = {"original_size": list(item.original_size),
                    "grid": item.grid.to_meta() if item.grid is not None else None}
            disk.save(ikey, {"image": item.image}, meta)
            if with_label:
                dtype = _label_dtype(self.spec.num_classes)
                arrays = {"label": item.label.astype(dtype)}
                if item.original_label is not item.label:
                    arrays["original_label"] = item.original_label.astype(dtype)
                if item.foreground is not None:
                    arrays["foreground"] = item.foreground
                disk.save(lkey, arrays)
            got_i = disk.load(ikey)
            got_l = disk.load(lkey) if with_label else None
        elif self.spec.format == "image2d":
            self.check_header(case.image)  # the bit-depth check across the dataset, header only
        arrays, meta, sources = dict(got_i[0]), got_i[1], dict(got_i[2])
        if got_l is not None:
            arrays.update(got_l[0])
            sources.update(got_l[2])
            if "original_label" not in arrays:
                arrays["original_label"], sources["original_label"] = arrays["label"], sources["label"]
        grid = Grid.from_meta(meta["grid"]) if meta.get("grid") else None
        item = Loaded(arrays["image"], arrays.get("label"), arrays.get("original_label"),
                      tuple(meta["original_size"]), grid, arrays.get("foreground"), sources)
        return item

    # --- API -----------------------------------------------------------------------------------------------------

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
        """The preprocessed case: from memory, or with ``cache_dir`` memory-mapped afresh at every access, so the
        pages one sample touched are unmapped once it is used and resident memory does not grow with the cases."""
        if self.cache_dir is not None:
            item = self._from_disk(case, with_label)
            if self.spec.image_remap is not None:  # not cached: a remap is code, not a setting
                item.image = self.spec.image_remap(np.asarray(item.image), case)
                item.sources = {k: v for k, v in (item.sources or {}).items() if k != "image"}
            return item
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
