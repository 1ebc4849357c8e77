"""Volume geometry: image/label grid agreement, a canonical orientation, a target voxel spacing, intensity
normalisation, and the way back to a file's own grid.

A NIfTI case is preprocessed **once** (by :class:`~label_efficient.data.store.CaseStore`):

1. image and label are read with their affines; the label must lie on the image's grid (same shape, affines equal
   within :data:`ATOL_MM` mm for the origin and voxel sizes and :data:`ATOL_DIR` for the direction cosines), else a
   :class:`DataError` names both files and both affines;
2. the intensities are normalised on the native grid (:func:`normalize`), as nnU-Net does before resampling;
3. both are reoriented to ``orientation`` (e.g. ``"RAS"``: a transpose and flips, exact; a no-op for a volume
   already in that frame, e.g. LA) and resampled to ``spacing`` mm (image trilinear, label nearest neighbour).
   The new grid covers the same field of view: ``n' = round(n · s / t)`` voxels per axis, voxel centres mapped as
   ``x_old = (x_new + ½) · n / n' − ½`` (``align_corners=False``), so the effective spacing is ``s · n / n'``
   (within half a voxel of the target over the whole field of view) and an axis already at the target spacing is
   left untouched.

A :class:`Grid` records the native shape/affine and the transform, and maps a prediction back:
:meth:`Grid.to_native` takes class logits (C, *grid) (resampled trilinearly, then argmax, as nnU-Net resamples
probabilities) or a label map (*grid) (nearest neighbour) and returns the label map on the file's own grid, in its
own axis order, ready to be written with the file's affine.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

log = logging.getLogger(__name__)

#: image/label affine agreement: origin and voxel sizes (mm), direction cosines (unitless)
ATOL_MM = 1e-3
ATOL_DIR = 1e-3
Normalize = Literal["zscore", "zscore_foreground", "ct"]
NORMALIZE = ("zscore", "zscore_foreground", "ct")
#: foreground voxels sampled per case (ct statistics) and per class (foreground-centred crops), as nnU-Net
FG_SAMPLES = 10_000


def voxel_sizes(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) of each array axis: the norms of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def format_affine(affine: np.ndarray) -> str:
    """One-line, rounded rendering of a 4×4 affine (its three informative rows)."""
    rows = np.round(np.asarray(affine, dtype=np.float64)[:3], 3) + 0.0  # + 0.0: no "-0.0"
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in r) + "]" for r in rows) + "]"


def check_same_grid(image_path, image_shape: Sequence[int], image_affine: np.ndarray,
                    label_path, label_shape: Sequence[int], label_affine: np.ndarray) -> None:
    """Refuse a label that does not lie voxel for voxel on its image's grid (another shape, or an affine that differs
    beyond the tolerances, e.g. a label stored flipped, LPS vs RAS): used as is it would be mirrored or shifted."""
    a, b = np.asarray(image_affine, np.float64), np.asarray(label_affine, np.float64)
    sa, sb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    same = tuple(image_shape) == tuple(label_shape)
    same = same and bool(np.all(np.abs(a[:3, 3] - b[:3, 3]) <= ATOL_MM)) and bool(np.all(np.abs(sa - sb) <= ATOL_MM))
    same = same and bool(np.all(np.abs(a[:3, :3] / np.maximum(sa, 1e-12) - b[:3, :3] / np.maximum(sb, 1e-12))
                                <= ATOL_DIR))
    if not same:
        raise DataError(
            f"label {label_path} does not lie on the grid of image {image_path}: image shape {tuple(image_shape)} "
            f"affine {format_affine(a)} vs label shape {tuple(label_shape)} affine {format_affine(b)} (tolerance "
            f"{ATOL_MM:g} mm, direction {ATOL_DIR:g}); used voxel by voxel the label would be mirrored or shifted: "
            "resample the label onto the image (e.g. nearest neighbour in 3D Slicer / SimpleITK.Resample with the "
            "image as reference) or save it with the image's header if only the header is wrong")


def check_orientation(code: str | None) -> str | None:
    """Upper-cased axis codes, one of R/L, A/P, S/I each (e.g. ``RAS``, ``LPS``); None passes."""
    if code is None:
        return None
    c = str(code).upper()
    if len(c) != 3 or any(sum(ch in pair for ch in c) != 1 for pair in ("RL", "AP", "SI")):
        raise DataError(f"data.orientation {code!r}: three axis codes, one of R/L, one of A/P and one of S/I "
                        "(e.g. RAS, LPS), or null to keep each volume's own axes")
    return c


def _ornt_transform(affine: np.ndarray, orientation: str | None) -> np.ndarray | None:
    """nibabel orientation transform from the array's axes to ``orientation`` (None: identity/no reorientation)."""
    if orientation is None:
        return None
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    tr = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(orientation.upper())))
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    return None if np.array_equal(tr, identity) else tr


def _apply_ornt(array: np.ndarray, tr: np.ndarray | None, channel_first: bool = False) -> np.ndarray:
    if tr is None:
        return array
    from nibabel.orientations import apply_orientation

    if channel_first:
        return np.ascontiguousarray(np.moveaxis(apply_orientation(np.moveaxis(array, 0, -1), tr), -1, 0))
    return np.ascontiguousarray(apply_orientation(array, tr))


def _invert_ornt(tr: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(tr)
    for i, (j, flip) in enumerate(tr):
        inv[int(j)] = [i, flip]
    return inv


@dataclass
class Grid:
    """How a volume's training grid relates to the file's own (native) grid; see the module docstring."""

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray  # (4, 4) of the file
    ornt: np.ndarray | None  # nibabel orientation transform native → oriented (None: same axes)
    oriented_shape: tuple[int, int, int]
    shape: tuple[int, int, int]  # training grid
    affine: np.ndarray = field(repr=False)  # (4, 4) of the training grid

    @classmethod
    def plan(cls, shape: Sequence[int], affine: np.ndarray, orientation: str | None = None,
             spacing: Sequence[float] | None = None) -> "Grid":
        from nibabel.orientations import inv_ornt_aff

        shape, affine = tuple(int(s) for s in shape), np.asarray(affine, np.float64)
        tr = _ornt_transform(affine, orientation)
        if tr is not None:
            oshape = tuple(int(shape[int(j)]) for j in _invert_ornt(tr)[:, 0])
            oaff = affine @ inv_ornt_aff(tr, shape)
        else:
            oshape, oaff = shape, affine
        new = oshape
        if spacing is not None:
            if len(spacing) != 3 or min(spacing) <= 0:
                raise DataError(f"data.spacing must be three positive voxel sizes in mm, got {list(spacing)}")
            sizes = voxel_sizes(oaff)
            new = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(oshape, sizes, spacing))
        scale = np.array(oshape, np.float64) / np.array(new, np.float64)
        step = np.eye(4)
        step[:3, :3] = np.diag(scale)
        step[:3, 3] = 0.5 * scale - 0.5  # new voxel centre x' maps to old (x' + ½)·n/n' − ½
        return cls(shape, affine, tr, oshape, new, oaff @ step)

    @property
    def resampled(self) -> bool:
        return self.shape != self.oriented_shape

    @property
    def identity(self) -> bool:
        """The training grid is the file's grid (no reorientation, no resampling)."""
        return self.ornt is None and not self.resampled

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size (mm) of the training grid."""
        return voxel_sizes(self.affine)

    @property
    def native_spacing(self) -> tuple[float, ...]:
        return voxel_sizes(self.native_affine)

    def image(self, image: np.ndarray, order: int = 1) -> np.ndarray:
        """(C, *native) float image → (C, *grid): reorient, resample (``order`` 0 nearest, 1 trilinear)."""
        out = _apply_ornt(image, self.ornt, channel_first=True)
        if self.resampled:
            mode = "trilinear" if order >= 1 else "nearest-exact"
            kw = {"align_corners": False} if mode == "trilinear" else {}
            out = F.interpolate(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None], size=self.shape,
                                mode=mode, **kw)[0].numpy()
        return out.astype(np.float32, copy=False)

    def label(self, label: np.ndarray) -> np.ndarray:
        """(*native) label map → (*grid), nearest neighbour."""
        out = _apply_ornt(label, self.ornt)
        if self.resampled:
            t = torch.from_numpy(np.ascontiguousarray(out).astype(np.float32))[None, None]
            out = F.interpolate(t, size=self.shape, mode="nearest-exact")[0, 0].numpy()
            out = np.rint(out).astype(label.dtype)
        return out

    def to_native(self, x) -> np.ndarray:
        """Class logits/probabilities (C, *grid) — or (1, C, *grid) — or a label map (*grid) on the training grid →
        int64 label map on the file's grid (its shape and axis order). Logits are resampled trilinearly and then
        argmaxed; a label map is resampled by nearest neighbour."""
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
        if t.ndim == 5:
            t = t[0]
        if t.ndim == 4:
            if tuple(t.shape[1:]) != self.shape:
                raise ValueError(f"logits of grid {tuple(t.shape[1:])} do not match the volume's grid {self.shape}")
            if self.resampled:
                t = F.interpolate(t.float()[None], size=self.oriented_shape, mode="trilinear", align_corners=False)[0]
            lab = t.argmax(0).numpy()
        elif t.ndim == 3:
            if tuple(t.shape) != self.shape:
                raise ValueError(f"label map of grid {tuple(t.shape)} does not match the volume's grid {self.shape}")
            lab = t.numpy()
            if self.resampled:
                lab = F.interpolate(t.float()[None, None], size=self.oriented_shape, mode="nearest-exact")[0, 0].numpy()
                lab = np.rint(lab)
        else:
            raise ValueError(f"to_native takes (C, X, Y, Z) logits or an (X, Y, Z) label map, got shape {tuple(t.shape)}")
        lab = lab.astype(np.int64)
        if self.ornt is not None:
            lab = _apply_ornt(lab, _invert_ornt(self.ornt))
        return lab

    def to_meta(self) -> dict:
        return {"native_shape": list(self.native_shape), "native_affine": self.native_affine.tolist(),
                "ornt": None if self.ornt is None else self.ornt.tolist(), "oriented_shape": list(self.oriented_shape),
                "shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_meta(cls, m: Mapping) -> "Grid":
        return cls(tuple(m["native_shape"]), np.asarray(m["native_affine"], np.float64),
                   None if m["ornt"] is None else np.asarray(m["ornt"], np.float64), tuple(m["oriented_shape"]),
                   tuple(m["shape"]), np.asarray(m["affine"], np.float64))


# --- intensity normalisation -----------------------------------------------------------------------------------------

def normalize(image: np.ndarray, mode: str | None, stats: Mapping[str, float] | None = None) -> np.ndarray:
    """Normalise a (C, *S) image on its native grid.

    ``zscore``: one z-score over the whole image (air included; the historical default of the NIfTI datasets).
    ``zscore_foreground``: z-score over the non-zero voxels, the others set to 0 (nnU-Net's MR scheme with
    ``use_mask_for_norm``, the non-zero mask standing in for its crop-to-non-zero mask).
    ``ct``: clip to the 0.5–99.5 percentiles of the training labelled cases' foreground voxels, then z-score with
    their foreground mean and std (nnU-Net's CT scheme; ``stats`` from :func:`foreground_stats`).
    ``None``: unchanged."""
    if mode is None:
        return image
    if mode == "zscore":
        return (image - image.mean()) / max(float(image.std()), 1e-8)
    if mode == "zscore_foreground":
        mask = image != 0
        if not mask.any():
            return (image - image.mean()) / max(float(image.std()), 1e-8)
        v = image[mask]
        return np.where(mask, (image - v.mean()) / max(float(v.std()), 1e-8), 0).astype(np.float32)
    if mode == "ct":
        if not stats:
            raise DataError("data.normalize: ct needs the foreground intensity statistics of the training labelled "
                            "cases (CaseStore.fit_normalization, or the model bundle's data.intensity_stats)")
        lo, hi = stats["p00_5"], stats["p99_5"]
        return ((np.clip(image, lo, hi) - stats["mean"]) / max(float(stats["std"]), 1e-8)).astype(np.float32)
    raise DataError(f"data.normalize must be one of {list(NORMALIZE)} or null, got {mode!r}")


def foreground_sample(image: np.ndarray, label: np.ndarray, key: str, n: int = FG_SAMPLES) -> np.ndarray:
    """Up to ``n`` intensities of the foreground (label > 0) voxels of one case, drawn with a seed fixed by ``key``
    (so the statistics do not depend on the order the cases are read in)."""
    v = np.asarray(image).reshape(-1, *label.shape)[0][np.asarray(label) > 0]
    if v.size > n:
        v = v[np.random.default_rng(zlib.crc32(key.encode())).choice(v.size, n, replace=False)]
    return v.astype(np.float64)


def foreground_stats(samples: Sequence[np.ndarray]) -> dict[str, float]:
    """nnU-Net's CT statistics of pooled foreground intensities: mean, std, 0.5 and 99.5 percentiles."""
    v = np.concatenate([np.asarray(s, np.float64) for s in samples]) if samples else np.zeros(0)
    if v.size == 0:
        raise DataError("data.normalize: ct needs foreground voxels in the training labelled cases, found none")
    return {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(np.percentile(v, 0.5)),
            "p99_5": float(np.percentile(v, 99.5)), "voxels": int(v.size)}


# --- foreground locations and patch coverage ---------------------------------------------------------------------------

def foreground_locations(label: np.ndarray, n: int = FG_SAMPLES, seed: int = 1234) -> np.ndarray:
    """(N, 1 + ndim) int32 rows ``(class, *voxel)``: up to ``n`` voxels of each foreground class of ``label``
    (seeded), for foreground-centred crops (nnU-Net's ``class_locations``)."""
    label = np.asarray(label)
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(label):
        if c <= 0:
            continue
        where = np.argwhere(label == c)
        if len(where) > n:
            where = where[np.sort(rng.choice(len(where), n, replace=False))]
        rows.append(np.concatenate([np.full((len(where), 1), c), where], 1))
    return (np.concatenate(rows) if rows else np.zeros((0, 1 + label.ndim))).astype(np.int32)


def foreground_extent(locations: np.ndarray) -> tuple[int, ...] | None:
    """Bounding-box size (voxels) of the foreground locations, None without foreground."""
    if locations is None or len(locations) == 0:
        return None
    xyz = locations[:, 1:]
    return tuple(int(v) for v in xyz.max(0) - xyz.min(0) + 1)


def check_patch_coverage(items: Sequence[tuple], patch_size: Sequence[int]) -> list[str]:
    """Log (once per kind) the volumes smaller than the patch (they are zero-padded) and the structures the patch
    cannot cover (a foreground extent longer than the patch along an axis, typically after resampling a strongly
    anisotropic volume to fine isotropic voxels). ``items``: (case id, grid shape, grid spacing or None,
    foreground extent or None[, native spacing or None]). Returns the warnings."""
    patch = tuple(int(p) for p in patch_size)
    items = [tuple(it) + (None,) * (5 - len(it)) for it in items]
    out = []
    small = [(it[0], it[1]) for it in items if any(s < p for s, p in zip(it[1], patch))]
    if small:
        out.append(f"{len(small)} volume(s) are smaller than the patch {list(patch)} along some axis and are "
                   f"zero-padded, e.g. {small[0][0]} of shape {list(small[0][1])}")
    for axis, p in enumerate(patch):
        over = [it for it in items if it[3] is not None and it[3][axis] > p]
        if not over:
            continue
        cid, _, sp, ext, native = max(over, key=lambda it: it[3][axis])
        ext = ext[axis]
        mm = f" ({ext * sp[axis]:.1f} mm at {sp[axis]:.2f} mm; the patch spans {p * sp[axis]:.1f} mm)" if sp else ""
        why = ""
        if native:
            why = (f"; native spacing {[round(s, 3) for s in native]} mm (anisotropy {max(native) / min(native):.1f})"
                   + (f", training spacing {[round(s, 3) for s in sp]} mm" if sp else ""))
        out.append(f"the patch cannot cover the structure along axis {axis} in {len(over)} case(s): the foreground of "
                   f"{cid} spans {ext} voxels{mm} but the patch is {p}{why}; set a larger data.patch_size along "
                   "that axis or a coarser data.spacing")
    for w in out:
        log.warning(w)
    return out
