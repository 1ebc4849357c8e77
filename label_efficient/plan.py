"""``label-efficient plan``: check a data folder, fingerprint it, and write a commented, runnable recipe.

Layouts read (the same ones the ``image_folder`` and ``nifti_folder`` datasets read):

* a 2D image folder: ``images/`` + ``masks/`` matched by file stem (or ``--images`` / ``--masks`` sub-paths);
* a NIfTI folder: ``imagesTr/`` + ``labelsTr/``;
* a Medical Segmentation Decathlon / nnU-Net ``dataset.json`` beside ``imagesTr/``: its ``labels``,
  ``modality`` (MSD) or ``channel_names`` (nnU-Net v2), and ``training`` list (MSD) or ``<case>_0000.nii.gz``
  file names (nnU-Net v2, linked as ``<case>.nii.gz`` in a folder next to the recipe, since ``nifti_folder``
  matches labels by stem).

Every problem is collected before any is reported (one line each, naming the file and the fix); any error stops the
command with all of them (:class:`~label_efficient.errors.DataError`, exit 2). Then a fingerprint (counts, sizes,
spacings, foreground intensities, class shares, connected components, structure sizes) and a recipe whose derived
values carry a ``#`` comment saying the rule and the measured numbers. Nothing is written inside the data folder:
a split CSV that plan makes lies next to the recipe.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data.readers import GREY_MODES, IMAGE_SUFFIXES, image_depth
from .errors import DataError, OutputError, OutputExistsError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
STRATEGIES_PLANNED = ("supervised", "mean_teacher", "bcp")
MAX_LISTED = 10  #: files listed per kind of problem (the rest are counted)
MAX_LABEL_VALUES = 50  #: more distinct mask values than this: the "mask" looks like an image
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  #: train / val / test, by case

#: memory rule: a U-Net keeps ~K bytes of activations per pixel (voxel) per channel of its first level for the
#: backward pass (fp32, encoder + decoder, conv/BN/ReLU outputs: ~24 maps of the first level's width summed over
#: the levels, 4 bytes each), and a quarter of the device's memory is given to activations
ACT_BYTES = 100
MEMORY_SHARE = 0.25
WIDTH_2D, WIDTH_3D = 16, 16  #: first-level channels of basic_unet (2D) and of the 3D unet [16, 32, 64, 128]
SHORT_SIDE_CAP = {"cpu": 128, "cuda": 512}  #: CPU: the shipped 2D recipes' 128² (time, not memory, binds)
VOXEL_CAP = {"cpu": 112 * 112 * 80, "cuda": 160 * 160 * 128}  #: CPU: BCP's official LA crop 112×112×80
BATCH_CAP_2D = {"cpu": 12, "cuda": 32}  #: CPU: the shipped ACDC recipes' batch 12
BATCH_CAP_3D = {"cpu": 2, "cuda": 4}  #: CPU: the shipped LA recipes' batch 2
LCC_MAX_OUTSIDE = 0.05  #: largest-component cleaning off above this share of a class outside its largest component
#: 2D: native-resolution patches instead of resizing when a class's structure width / downscale factor < THIN_PX
THIN_PX = 2.0
WIDTH_SAMPLE = 40  #: masks sampled (evenly spaced) to measure the structure widths
MIN_PATCH_3D = 32  #: 3D patch axes ≥ 4 × 2³: the 3D U-Net [16, 32, 64, 128] halves 3 times, bottleneck ≥ 4 voxels
SPACING_TOL = 0.01  #: 3D: spacings within 1 % per axis count as one spacing (no resampling)
ANISOTROPY = 3.0  #: nnU-Net's anisotropy threshold (low-resolution axis spacing vs the others')
FOREGROUND_LINE = ("  foreground_ratio: 0.33   # nnU-Net's rule: a third of the training patches centred on a "
                   "foreground {what} (a class drawn at random), the rest uniform")


# ----------------------------------------------------------------------------------------------------- problems

@dataclass
class Problems:
    """Every problem found, grouped by kind; rendered one line per file (``MAX_LISTED`` per kind, then a count)."""

    items: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (level, kind) -> lines

    def add(self, level: str, kind: str, line: str) -> None:
        self.items.setdefault((level, kind), []).append(line)

    def error(self, kind: str, line: str) -> None:
        self.add("error", kind, line)

    def warn(self, kind: str, line: str) -> None:
        self.add("warning", kind, line)

    @property
    def errors(self) -> int:
        return sum(len(v) for (lvl, _), v in self.items.items() if lvl == "error")

    def lines(self) -> list[str]:
        out = []
        for level in ("error", "warning"):
            for (lvl, kind), lines in self.items.items():
                if lvl != level:
                    continue
                out += [f"{level}: {l}" for l in lines[:MAX_LISTED]]
                if len(lines) > MAX_LISTED:
                    out.append(f"{level}: … and {len(lines) - MAX_LISTED} more file(s) with the same problem ({kind})")
        return out


# ------------------------------------------------------------------------------------------------------- layout

@dataclass
class Pair:
    stem: str
    image: Path
    mask: Path | None


@dataclass
class Layout:
    kind: str  # "image2d" | "nifti"
    root: Path  # the data folder
    images: Path
    masks: Path
    pairs: list[Pair]
    dataset_json: dict | None = None
    declared: dict[int, str] | None = None  # label value -> name (dataset.json)
    modality: str | None = None
    nnunet_v2: bool = False  # <case>_0000.nii.gz images: linked for nifti_folder
    split_csv: Path | None = None
    split_rows: list[dict[str, str]] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _suffix(name: str, suffixes: Sequence[str]) -> str | None:
    low = name.lower()
    return next((s for s in suffixes if low.endswith(s)), None)


def _scan(folder: Path, root: Path, problems: Problems, strip: str = "") -> dict[str, Path]:
    """``{stem: file}`` of the image/volume files of ``folder``; same-stem files and mixed 2D/3D files reported."""
    by_stem: dict[str, list[Path]] = {}
    kinds: dict[str, list[Path]] = {"2D": [], "3D": []}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        s = _suffix(p.name, NIFTI_SUFFIXES) or _suffix(p.name, IMAGE_SUFFIXES)
        if s is None:
            continue
        kinds["3D" if s in NIFTI_SUFFIXES else "2D"].append(p)
        stem = p.name[: -len(s)]
        if strip and stem.endswith(strip):
            stem = stem[: -len(strip)]
        by_stem.setdefault(stem, []).append(p)
    for stem, files in by_stem.items():
        if len(files) > 1:
            problems.error("duplicate stem", f"{_rel(files[0], root)} and {', '.join(f.name for f in files[1:])} share the "
                           f"stem '{stem}' (masks are matched by stem): rename or remove all but one")
    if kinds["2D"] and kinds["3D"]:
        minority = "3D" if len(kinds["3D"]) <= len(kinds["2D"]) else "2D"
        majority = "2D" if minority == "3D" else "3D"
        for p in kinds[minority]:
            problems.error("mixed 2D/3D", f"{_rel(p, root)} is a {'NIfTI volume' if minority == '3D' else '2D image'} "
                           f"among {len(kinds[majority])} {'2D images' if majority == '2D' else 'NIfTI volumes'}: keep "
                           "one kind per folder (move it out)")
    return {s: f[0] for s, f in by_stem.items()}


def _read_split(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def discover(data_dir: str | Path, images: str | None = None, masks: str | None = None,
             problems: Problems | None = None) -> tuple[Layout, Problems]:
    """Find the layout of ``data_dir`` and pair images with masks; problems found so far are collected."""
    problems = problems or Problems()
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    dj = _load_dataset_json(root)
    img_dir, msk_dir = _find_folders(root, images, masks)
    files = [p for p in img_dir.iterdir() if not p.name.startswith(".")]
    nifti = dj is not None or any(_suffix(p.name, NIFTI_SUFFIXES) for p in files) and \
        sum(bool(_suffix(p.name, NIFTI_SUFFIXES)) for p in files) >= sum(bool(_suffix(p.name, IMAGE_SUFFIXES)) for p in files)
    v2 = nifti and any(p.name.lower().endswith(("_0000.nii.gz", "_0000.nii")) for p in files)
    imgs = _scan(img_dir, root, problems, strip="_0000" if v2 else "")
    msks = _scan(msk_dir, root, problems)
    layout = Layout("nifti" if nifti else "image2d", root, img_dir, msk_dir, [], dataset_json=dj, nnunet_v2=v2)
    if v2:
        imgs = _drop_extra_channels(img_dir, root, imgs, problems)
    if dj is not None:
        _read_dataset_json(layout, dj, imgs, msks, problems)
    for stem in sorted(set(imgs) - set(msks)):
        problems.error("image without mask", f"{_rel(imgs[stem], root)} has no mask {_rel(msk_dir, root)}/{stem}.*: add "
                       "its mask (same stem) or move the image out of the folder")
    for stem in sorted(set(msks) - set(imgs)):
        problems.warn("mask without image", f"{_rel(msks[stem], root)} has no image in {_rel(img_dir, root)}: it is not used")
    layout.pairs = [Pair(s, imgs[s], msks.get(s)) for s in sorted(imgs)]
    if not layout.pairs:
        raise DataError(f"{img_dir} holds no image files ({', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)})")
    split = root / "split.csv"
    if split.is_file():
        layout.split_csv, layout.split_rows = split, _read_split(split)
    return layout, problems


def _load_dataset_json(root: Path) -> dict | None:
    dj_path = root / "dataset.json"
    if not dj_path.is_file():
        return None
    try:
        return json.loads(dj_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{dj_path} is not valid JSON ({e}): fix it or remove it") from None


def _find_folders(root: Path, images: str | None, masks: str | None) -> tuple[Path, Path]:
    """The image and mask folders: the given sub-paths, else ``images/ masks/`` or ``imagesTr/ labelsTr/``."""
    if images is None:
        for im, ms in (("images", "masks"), ("imagesTr", "labelsTr")):
            if (root / im).is_dir():
                images, masks = im, masks or ms
                break
    if images is None:
        hint = ""
        csv_path = root / "split.csv"
        if csv_path.is_file():
            rows = _read_split(csv_path)
            if rows and "image" in rows[0]:
                folders = sorted({str(Path(r["image"]).parent) for r in rows})
                mfolders = sorted({str(Path(r["mask"]).parent) for r in rows}) if "mask" in rows[0] else []
                hint = (f"; its split.csv names images in {len(folders)} folder(s) {folders}: give one with --images "
                        f"{folders[0]}" + (f" --masks {mfolders[0]}" if mfolders else ""))
        raise DataError(f"{root}: no images/ + masks/ (2D) or imagesTr/ + labelsTr/ (NIfTI) folder{hint}")
    img_dir, msk_dir = root / images, root / (masks or "masks")
    if not img_dir.is_dir():
        raise DataError(f"image folder {img_dir} does not exist")
    if not msk_dir.is_dir():
        raise DataError(f"mask folder {msk_dir} does not exist: give it with --masks")
    return img_dir, msk_dir


def _drop_extra_channels(img_dir: Path, root: Path, imgs: dict[str, Path], problems: Problems) -> dict[str, Path]:
    """nnU-Net v2: ``<case>_000k`` files for k > 0 are further input channels, reported and left out."""
    extra = [p for p in img_dir.iterdir() if p.name.lower().endswith((".nii.gz", ".nii"))
             and "_" in p.name and p.name.split("_")[-1].split(".")[0].isdigit()
             and not p.name.lower().endswith(("_0000.nii.gz", "_0000.nii"))]
    for p in sorted(extra):
        problems.error("extra channel", f"{_rel(p, root)} is a second input channel (nnU-Net _000k): nifti_folder "
                       "reads one channel per case; remove the extra channels or merge them")
    return {s: p for s, p in imgs.items() if p not in extra}


def _read_dataset_json(layout: Layout, dj: dict, imgs: dict[str, Path], msks: dict[str, Path], problems: Problems):
    root, where = layout.root, "dataset.json"
    labels = dj.get("labels")
    if isinstance(labels, dict) and labels:
        declared: dict[int, str] = {}
        for k, v in labels.items():
            if str(k).lstrip("-").isdigit():  # MSD: {"0": "background"}
                declared[int(k)] = str(v)
            elif isinstance(v, int):  # nnU-Net v2: {"background": 0}
                declared[v] = str(k)
            else:
                problems.error("dataset.json", f"{where}: label '{k}': {v!r} is a region (list of labels), which "
                               "plan does not read: give one integer value per label")
        layout.declared = dict(sorted(declared.items()))
    else:
        problems.error("dataset.json", f"{where} has no 'labels' mapping: add one ({{\"0\": \"background\", ...}})")
    chans = dj.get("channel_names") or dj.get("modality") or {}
    if isinstance(chans, dict) and chans:
        layout.modality = str(next(iter(chans.values())))
        if len(chans) > 1:
            problems.error("dataset.json", f"{where} declares {len(chans)} input channels {list(chans.values())}: "
                           "nifti_folder reads one channel per case; keep one modality")
    training = dj.get("training")
    if isinstance(training, list) and training:
        listed_img, listed_lbl = set(), set()
        for entry in training:
            for key, listed, have, folder in (("image", listed_img, imgs, layout.images),
                                              ("label", listed_lbl, msks, layout.masks)):
                rel = entry.get(key) if isinstance(entry, dict) else None
                if rel is None:
                    continue
                path = (root / rel).resolve()
                s = _suffix(path.name, NIFTI_SUFFIXES) or ""
                stem = path.name[: -len(s)] if s else path.name
                listed.add(stem)
                if not path.is_file():
                    problems.error("dataset.json list", f"{where} lists {rel}, which does not exist: add the file or "
                                   "remove the entry")
        for stem in sorted(set(imgs) - listed_img):
            problems.error("dataset.json list", f"{_rel(imgs[stem], root)} is in no 'training' entry of {where}: add "
                           "an entry or move the file out")
        for stem in sorted(set(msks) - listed_lbl):
            problems.error("dataset.json list", f"{_rel(msks[stem], root)} is in no 'training' entry of {where}: add "
                           "an entry or move the file out")
    n = dj.get("numTraining")
    if isinstance(n, int) and n != len(imgs):
        problems.error("dataset.json count", f"{where}: numTraining is {n} but {_rel(layout.images, root)} holds "
                       f"{len(imgs)} case(s): correct numTraining or the folder")


# ------------------------------------------------------------------------------------------- reading and checks

@dataclass
class CaseInfo:
    stem: str
    size: tuple[int, ...]  # spatial size (H, W) or (X, Y, Z)
    spacing: tuple[float, ...] | None = None
    mode: str | None = None  # PIL mode (2D)
    ras_size: tuple[int, ...] | None = None  # 3D: size and spacing in the RAS axis order the run reorients to
    ras_spacing: tuple[float, ...] | None = None
    mask: np.ndarray | None = None  # read label map (dropped after the statistics)


def _header_2d(path: Path, root: Path, problems: Problems, what: str) -> tuple[tuple[int, int], str, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (im.size[1], im.size[0]), im.mode, int(getattr(im, "n_frames", 1))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        problems.error("unreadable", f"{_rel(path, root)}: cannot read this {what} ({e}): replace or remove it")
        return None


def _read_2d(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def _check_finite(arr: np.ndarray, path: Path, root: Path, problems: Problems) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        problems.error("NaN/inf", f"{_rel(path, root)} holds {int((~np.isfinite(arr)).sum())} NaN or infinite "
                       "value(s): fix the file or remove the case")


def _mask_values(mask: np.ndarray, path: Path, root: Path, problems: Problems, two_d: bool = True) -> np.ndarray | None:
    if two_d and mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            problems.error("colour mask", f"{_rel(path, root)} is a colour image with differing channels: save the mask "
                           "as a single-channel label map (values 0..K-1)")
            return None
        mask = mask[..., 0]
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or not np.all(mask == np.round(mask)):
            problems.error("non-integer mask", f"{_rel(path, root)} holds non-integer label values: a mask holds "
                           "class indices 0..K-1")
            return None
    mask = mask.astype(np.int64)
    return mask.astype(np.uint8) if mask.size and 0 <= mask.min() and mask.max() < 256 else mask.astype(np.int32)


def _check_2d(layout: Layout, problems: Problems) -> tuple[list[CaseInfo], dict]:
    root, infos = layout.root, []
    depths: dict[int, list[Path]] = {}
    colour: dict[bool, list[Path]] = {True: [], False: []}
    for pair in layout.pairs:
        if _suffix(pair.image.name, NIFTI_SUFFIXES):
            continue  # reported as mixed 2D/3D
        h = _header_2d(pair.image, root, problems, "image")
        if h is None:
            continue
        size, mode, frames = h
        if frames > 1:
            problems.error("mixed 2D/3D", f"{_rel(pair.image, root)} holds {frames} frames (a 3D stack) among 2D "
                           "images: save one 2D image per file")
        depths.setdefault(image_depth(mode), []).append(pair.image)
        colour[mode not in GREY_MODES].append(pair.image)
        if mode in ("F", "I"):
            _check_finite(_read_2d(pair.image).astype(np.float32), pair.image, root, problems)
        info = CaseInfo(pair.stem, size, mode=mode)
        if pair.mask is not None:
            mh = _header_2d(pair.mask, root, problems, "mask")
            if mh is not None:
                if mh[0] != size:
                    problems.error("shape mismatch", f"{_rel(pair.mask, root)} is {mh[0][0]}×{mh[0][1]} (H×W) but its "
                                   f"image {_rel(pair.image, root)} is {size[0]}×{size[1]}: re-save the mask at the "
                                   "image's size")
                else:
                    try:
                        info.mask = _mask_values(_read_2d(pair.mask), pair.mask, root, problems)
                    except OSError as e:
                        problems.error("unreadable", f"{_rel(pair.mask, root)}: cannot read this mask ({e})")
        infos.append(info)
    if len(depths) > 1:
        major = max(depths, key=lambda d: len(depths[d]))
        for d, files in depths.items():
            if d != major:
                for p in files:
                    problems.error("mixed bit depth", f"{_rel(p, root)} is a {d}-bit image but {len(depths[major])} "
                                   f"other images are {major}-bit (8-bit is scaled /255, 16-bit kept raw): convert "
                                   "every image to one bit depth")
    in_channels = 3 if len(colour[True]) >= len(colour[False]) and colour[True] else 1
    if in_channels == 3:
        for p in colour[False]:
            problems.error("grey among RGB", f"{_rel(p, root)} is a grey image among {len(colour[True])} colour "
                           "images: convert it to RGB (the model takes 3 channels)")
    depth = max(depths, key=lambda d: len(depths[d])) if depths else 8
    return infos, {"in_channels": in_channels, "bit_depth": depth}


def _check_nifti(layout: Layout, problems: Problems) -> tuple[list[CaseInfo], dict]:
    import nibabel as nib

    root, infos, dtypes = layout.root, [], {}
    for pair in layout.pairs:
        try:
            img = nib.load(str(pair.image))
        except Exception as e:  # nibabel raises several types for unreadable files
            problems.error("unreadable", f"{_rel(pair.image, root)}: cannot read this volume ({e}): replace or remove it")
            continue
        shape, zooms = tuple(int(s) for s in img.shape), tuple(float(z) for z in img.header.get_zooms())
        if len(shape) == 4:
            problems.error("4D volume", f"{_rel(pair.image, root)} has shape {shape} (4D): split it into one 3D file "
                           "per time point or channel (one modality per case)")
            continue
        if len(shape) != 3:
            problems.error("mixed 2D/3D", f"{_rel(pair.image, root)} has shape {shape} ({len(shape)}D) among 3D "
                           "volumes: give every case as one 3D volume")
            continue
        dtypes[str(img.get_data_dtype())] = dtypes.get(str(img.get_data_dtype()), 0) + 1
        if img.get_data_dtype().kind == "f":  # integer voxels cannot be NaN: only float volumes are read here
            _check_finite(np.asanyarray(img.dataobj), pair.image, root, problems)
        perm = np.argsort(nib.orientations.io_orientation(img.affine)[:, 0])  # RAS axis j <- stored axis perm[j]
        info = CaseInfo(pair.stem, shape, spacing=zooms[:3], ras_size=tuple(shape[i] for i in perm),
                        ras_spacing=tuple(zooms[i] for i in perm))
        if pair.mask is not None:
            try:
                lab = nib.load(str(pair.mask))
            except Exception as e:
                problems.error("unreadable", f"{_rel(pair.mask, root)}: cannot read this label volume ({e})")
                infos.append(info)
                continue
            lshape = tuple(int(s) for s in lab.shape)
            if lshape != shape:
                problems.error("shape mismatch", f"{_rel(pair.mask, root)} has shape {lshape} but its image "
                               f"{_rel(pair.image, root)} has {shape}: re-save the label on the image's grid")
            elif not np.allclose(lab.affine, img.affine, atol=1e-3):
                problems.error("affine mismatch", f"{_rel(pair.mask, root)}: its affine differs from its image's "
                               f"{_rel(pair.image, root)} (spacing {tuple(round(z, 4) for z in lab.header.get_zooms()[:3])} "
                               f"vs {tuple(round(z, 4) for z in zooms[:3])}): re-save the label with the image's "
                               "affine (nib.Nifti1Image(label, image.affine))")
            else:
                info.mask = _mask_values(np.asanyarray(lab.dataobj), pair.mask, root, problems, two_d=False)
        infos.append(info)
    return infos, {"in_channels": 1, "dtypes": dtypes}


def _check_labels(layout: Layout, infos: list[CaseInfo], problems: Problems) -> list[int]:
    """The task's label values (dataset.json's, else 0..K-1 from the masks); masks outside them reported."""
    root = layout.root
    values_of = {i.stem: np.unique(i.mask) for i in infos if i.mask is not None}
    path_of = {p.stem: p.mask for p in layout.pairs}
    union = sorted(set().union(*[set(v.tolist()) for v in values_of.values()])) if values_of else [0]
    if layout.declared is not None:
        allowed = sorted(layout.declared)
        for stem, vals in values_of.items():
            bad = [int(v) for v in vals if int(v) not in layout.declared]
            if bad:
                problems.error("label values", f"{_rel(path_of[stem], root)} holds label value(s) {bad[:8]} not in "
                               f"dataset.json's labels {allowed}: fix the mask or declare the label")
        return allowed
    if len(union) > MAX_LABEL_VALUES:
        for stem, vals in values_of.items():
            if len(vals) > MAX_LABEL_VALUES:
                problems.error("not a label map", f"{_rel(path_of[stem], root)} holds {len(vals)} distinct values: it "
                               "looks like an image, not a label map (class indices 0..K-1); replace it by its mask")
        union = sorted(set().union(*[set(v.tolist()) for v in values_of.values() if len(v) <= MAX_LABEL_VALUES]))
    k = 0
    while k in union:
        k += 1
    allowed = list(range(max(k, 2)))
    if any(v not in allowed for v in union):
        for stem, vals in values_of.items():
            bad = [int(v) for v in vals if int(v) not in allowed]
            if bad and len(vals) <= MAX_LABEL_VALUES:
                problems.error("label values", f"{_rel(path_of[stem], root)} holds label value(s) {bad[:8]}, but the "
                               f"masks' values {union[:12]} are not contiguous from 0 (classes 0..{k - 1}): re-save the "
                               "masks with values 0..K-1 (e.g. 255 -> 1), or add a dataset.json declaring the labels")
    for stem, vals in values_of.items():
        if vals.size and vals.max() <= 0:
            problems.warn("empty mask", f"{_rel(path_of[stem], root)} is empty (background only): fine for a "
                          "structure that is absent, else a missing annotation")
    return allowed


# ------------------------------------------------------------------------------------------------- fingerprint

def _axis_stats(rows: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    a = np.asarray(rows, dtype=np.float64)
    return {"min": a.min(0).tolist(), "median": np.median(a, 0).tolist(), "max": a.max(0).tolist()}


def _components(mask: np.ndarray, value: int, full: bool) -> tuple[int, float, list[int]]:
    """(components of class ``value``, share of its pixels outside the largest one, bounding-box extent)."""
    from scipy import ndimage

    fg = mask == value
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if full else 1)
    comp, n = ndimage.label(fg, structure)
    sizes = np.bincount(comp.ravel())[1:]
    outside = 1.0 - sizes.max() / sizes.sum() if n else 0.0
    box = ndimage.find_objects(fg.astype(np.uint8))[0]
    return n, float(outside), [int(sl.stop - sl.start) for sl in box]


def fingerprint(layout: Layout, infos: list[CaseInfo], values: list[int], meta: dict,
                sample_cases: int = 40, sample_pixels: int = 20000) -> dict:
    """Counts, sizes, spacings, foreground intensity percentiles (sampled), class shares, components, extents."""
    names = [layout.declared[v] for v in values] if layout.declared else \
        (["background"] + [f"class{v}" for v in values[1:]])
    labelled = [i for i in infos if i.mask is not None]
    fp: dict[str, Any] = {"layout": layout.kind, "root": str(layout.root), "cases": len(infos),
                          "labelled": len(labelled), "in_channels": meta["in_channels"],
                          "num_classes": len(values), "class_names": names, "modality": layout.modality}
    if meta.get("bit_depth"):
        fp["bit_depth"] = meta["bit_depth"]
    fp["size"] = _axis_stats([i.size for i in infos]) if infos else None
    if layout.kind == "nifti" and infos:
        fp["spacing"] = _axis_stats([i.spacing for i in infos])
        fp["grid"] = {"shape": [list(i.ras_size) for i in infos], "spacing": [list(i.ras_spacing) for i in infos]}
    counts = np.zeros(len(values), np.int64)
    comp: dict[int, dict[str, list]] = {v: {"n": [], "outside": [], "extent": [], "rel": []}
                                        for v in values[1:]}
    for info in labelled:
        m = info.mask
        counts += np.bincount(np.clip(m.ravel(), 0, len(values)), minlength=len(values) + 1)[: len(values)]
        for v in values[1:]:
            if not (m == v).any():
                continue
            n, outside, extent = _components(m, v, full=True)
            comp[v]["n"].append(n)
            comp[v]["outside"].append(outside)
            comp[v]["extent"].append(extent)
            comp[v]["rel"].append([e / s for e, s in zip(extent, m.shape)])
    total = max(int(counts.sum()), 1)
    fp["class_share"] = {names[i]: float(counts[i] / total) for i in range(len(values))}
    fp["empty_masks"] = sum(1 for i in labelled if not (i.mask > 0).any())
    fp["components"] = _component_stats(comp, values, names)
    if layout.kind != "nifti":
        fp["width_sampled"] = _add_widths(fp["components"], labelled, values, names)
    fp["intensity"] = _intensity(layout, labelled, sample_cases, sample_pixels)
    return fp


def _component_stats(comp: dict[int, dict[str, list]], values: list[int], names: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for v in values[1:]:
        c = comp[v]
        if not c["n"]:
            out[names[v]] = {"masks": 0}
            continue
        out[names[v]] = {
            "masks": len(c["n"]), "median": float(np.median(c["n"])), "max": int(np.max(c["n"])),
            "share_multi": float(np.mean(np.asarray(c["n"]) > 1)),
            "outside_largest": float(np.mean(c["outside"])),
            "extent_median": np.median(np.asarray(c["extent"]), 0).tolist(),
            "extent_fraction": np.median(np.asarray(c["rel"]), 0).tolist()}
    return out


def structure_width(mask: np.ndarray, value: int) -> float | None:
    """The width (px) of class ``value``'s structures in one 2D mask: per 8-connected component, 2 × its largest
    Euclidean distance to background (the width of its thickest part); the median over the components."""
    from scipy import ndimage

    fg = np.pad(mask == value, 1)  # the image border counts as background
    if not fg.any():
        return None
    comp, n = ndimage.label(fg, ndimage.generate_binary_structure(2, 2))
    peaks = ndimage.maximum(ndimage.distance_transform_edt(fg), comp, np.arange(1, n + 1))
    return float(np.median(2 * np.asarray(peaks, dtype=np.float64)))


def _add_widths(components: dict[str, dict], labelled: list[CaseInfo], values: list[int], names: list[str],
                sample: int = WIDTH_SAMPLE) -> int:
    """Each class's median structure width over at most ``sample`` evenly spaced labelled masks, as
    ``width_median``; returns the number of masks sampled."""
    if not labelled:
        return 0
    pick = [labelled[int(i)] for i in np.unique(np.linspace(0, len(labelled) - 1, min(sample, len(labelled))).round())]
    for v in values[1:]:
        widths = [w for w in (structure_width(i.mask, v) for i in pick) if w is not None]
        if widths and components[names[v]].get("masks"):
            components[names[v]]["width_median"] = float(np.median(widths))
    return len(pick)


def _intensity(layout: Layout, labelled: list[CaseInfo], sample_cases: int, sample_pixels: int) -> dict | None:
    """Foreground percentiles 0.5/50/99.5 over at most ``sample_cases`` evenly spaced labelled cases and
    ``sample_pixels`` foreground pixels each (seeded), raw file values; and each sampled image's min."""
    if not labelled:
        return None
    rng = np.random.default_rng(0)
    pick = [labelled[int(i)] for i in np.unique(np.linspace(0, len(labelled) - 1, min(sample_cases, len(labelled))).round())]
    path_of = {p.stem: p.image for p in layout.pairs}
    fg_values, mins = [], []
    for info in pick:
        if layout.kind == "nifti":
            import nibabel as nib

            arr = np.asanyarray(nib.load(str(path_of[info.stem])).dataobj).astype(np.float32)
        else:
            arr = _read_2d(path_of[info.stem]).astype(np.float32)
        mins.append(float(np.nanmin(arr)))
        fg = info.mask > 0
        vals = arr[fg].ravel() if arr.shape[: fg.ndim] == fg.shape else np.zeros(0, np.float32)
        vals = vals[np.isfinite(vals)].ravel()
        if vals.size > sample_pixels:
            vals = rng.choice(vals, sample_pixels, replace=False)
        fg_values.append(vals)
    allv = np.concatenate(fg_values) if fg_values else np.zeros(0)
    if not allv.size:
        return {"sampled_cases": len(pick), "image_min": float(min(mins))}
    p = np.percentile(allv, [0.5, 50, 99.5])
    return {"sampled_cases": len(pick), "p0.5": float(p[0]), "p50": float(p[1]), "p99.5": float(p[2]),
            "mean": float(allv.mean()), "std": float(allv.std()), "image_min": float(min(mins))}


def format_fingerprint(fp: dict) -> str:
    """The fingerprint as a few readable lines."""
    def num(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    def axes(d):
        return "  ".join(f"{k} {'×'.join(num(v) for v in d[k])}" for k in ("min", "median", "max"))

    out = [f"fingerprint of {fp['root']} ({'2D images' if fp['layout'] == 'image2d' else '3D NIfTI'}):",
           f"  cases {fp['cases']}, labelled {fp['labelled']}, empty masks {fp['empty_masks']}, "
           f"channels {fp['in_channels']}" + (f", {fp['bit_depth']}-bit" if fp.get("bit_depth") else "")
           + (f", modality {fp['modality']}" if fp.get("modality") else "")]
    if fp.get("size"):
        out.append(f"  size ({'H×W' if fp['layout'] == 'image2d' else 'X×Y×Z'}): {axes(fp['size'])}")
    if fp.get("spacing"):
        out.append(f"  spacing (mm): {axes(fp['spacing'])}")
    it = fp.get("intensity")
    if it and "p50" in it:
        out.append(f"  foreground intensity (raw, {it['sampled_cases']} cases sampled): p0.5 {num(it['p0.5'])}, "
                   f"p50 {num(it['p50'])}, p99.5 {num(it['p99.5'])}; lowest image value {num(it['image_min'])}")
    out.append("  class pixel share: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in fp["class_share"].items()))
    for name, c in fp["components"].items():
        if not c.get("masks"):
            out.append(f"  {name}: in no mask")
            continue
        out.append(f"  {name}: in {c['masks']} masks; connected components (8-/26-connected) per mask median {num(c['median'])}, max "
                   f"{c['max']} ({100 * c['share_multi']:.0f} % of masks > 1); {100 * c['outside_largest']:.1f} % of its pixels outside the largest "
                   f"component; median extent {'×'.join(num(v) for v in c['extent_median'])} px = "
                   f"{'×'.join(f'{100 * v:.0f}%' for v in c['extent_fraction'])} of the image"
                   + (f"; structure width {num(c['width_median'])} px (2 × largest distance to background, median "
                      f"over {fp.get('width_sampled')} sampled masks)" if "width_median" in c else ""))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- deriving

def device_memory() -> tuple[str, int]:
    """("cuda", total GPU memory) when torch sees a GPU, else ("cpu", MemAvailable from /proc/meminfo)."""
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda", int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # torch missing or a broken driver: plan for the CPU
        pass
    from .preflight import available_memory

    return "cpu", int(available_memory() or 4 * 2**30)


def _round16(x: float, down: bool = True) -> int:
    return max(16, int(math.floor(x / 16) if down else round(x / 16)) * 16)


def lcc_decision(fp: dict) -> tuple[bool, str]:
    """Largest-component cleaning on iff every class has one component in the median labelled mask and the
    largest component holds ≥ 95 % of its pixels; the reason states the measured numbers. It decides every
    keep-the-largest-component step: BCP's ``largest_component`` and UPL-SFDA's pseudo-label cleaning (its
    ``largest_component``), which assume one structure per class alike."""
    comps = {k: c for k, c in fp["components"].items() if c.get("masks")}
    if not comps:
        return True, "no labelled foreground to measure: the strategy's default (on)"
    bad = {k: c for k, c in comps.items() if c["median"] > 1 or c["outside_largest"] > LCC_MAX_OUTSIDE}
    desc = "; ".join(f"{k} median {c['median']:g} (max {c['max']}) components, {100 * c['outside_largest']:.1f} % "
                     "outside the largest" for k, c in (bad or comps).items())
    if bad:
        return False, (f"OFF: the labelled masks have several structures per class ({desc}): keeping only the largest "
                       "would erase true structures from every pseudo label")
    return True, (f"ON: one structure per class per mask ({desc}; rule: off when a class's median > 1 or > "
                  f"{100 * LCC_MAX_OUTSIDE:.0f} % lies outside the largest)")


@dataclass
class Plan:
    recipe_path: Path
    text: str
    fingerprint: dict
    problems: list[str]
    split_path: Path | None
    lcc: tuple[bool, str] | None


def _y(v) -> str:
    return json.dumps(v, ensure_ascii=False)


def _split_for(layout: Layout, out_dir: Path, name: str, comments: list[str]) -> tuple[Path | str, dict[str, str],
                                                                                        dict[str, dict[str, str]]]:
    """The split CSV for the recipe (the folder's own where it fits, else one written next to the recipe) and
    ``{stem: split}`` plus each stem's CSV row."""
    stems = [p.stem for p in layout.pairs if p.mask is not None]
    rows = layout.split_rows
    if rows and "split" in rows[0] and ({"stem", "case", "image"} & set(rows[0])):
        if "image" in rows[0]:  # a CSV naming image paths (e.g. several centres): the rows of this image folder
            mine = {}
            for r in rows:
                p = (layout.root / r["image"]).resolve()
                if p.parent == layout.images.resolve():
                    s = _suffix(p.name, IMAGE_SUFFIXES + NIFTI_SUFFIXES) or ""
                    mine[p.name[: -len(s)] if s else p.name] = r
        else:
            key = "stem" if "stem" in rows[0] else "case"
            mine = {r[key]: r for r in rows}
        splits = {r["split"] for s, r in mine.items() if s in set(stems)}
        if "train" in splits and "test" in splits:
            split = {s: r["split"] for s, r in mine.items() if s in set(stems)}
            absent = [s for s in mine if s not in set(stems)]
            if not absent and "image" not in rows[0]:
                comments.append(f"the folder's own split.csv ({len(split)} cases: "
                                + ", ".join(f"{k} {sum(v == k for v in split.values())}" for k in sorted(splits)) + ")")
                return layout.split_csv, split, mine
            path = out_dir / f"{name}_split.csv"
            _write_split(path, {s: mine[s] for s in stems if s in split})
            comments.append(f"the rows of the folder's split.csv that name files of {_rel(layout.images, layout.root)}"
                            f" ({len(split)} of {len(rows)}), copied next to the recipe (image_folder refuses a CSV "
                            "listing files it does not hold)")
            return path, split, mine
        comments.append(f"the folder's split.csv has splits {sorted(splits)} (no train and test): ignored")
    n = len(stems)
    if n < 3:
        raise DataError(f"{layout.root}: {n} labelled case(s); a train/val/test split needs at least 3")
    order = [stems[i] for i in np.random.default_rng(SPLIT_SEED).permutation(n)]
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n)) if n >= 5 else 0
    split = {s: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, s in enumerate(order)}
    path = out_dir / f"{name}_split.csv"
    _write_split(path, {s: {"stem": s, "split": split[s]} for s in stems})
    comments.append(f"no split.csv in the folder: a seeded (numpy default_rng({SPLIT_SEED})) 70/10/20 split by case, "
                    f"train {n - n_test - n_val} / val {n_val} / test {n_test}, written next to the recipe")
    return path, split, {s: {"stem": s, "split": split[s]} for s in stems}


def _write_split(path: Path, rows: dict[str, dict[str, str]]) -> None:
    cols = ["stem", "split"] + (["domain"] if any(r.get("domain") for r in rows.values()) else [])
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for s, r in rows.items():
            w.writerow({"stem": s, "split": r["split"], **({"domain": r.get("domain", "")} if "domain" in cols else {})})
    os.replace(tmp, path)


def plan(data_dir: str | Path, out: str | Path, strategy: str = "supervised", labeled: int | None = None,
         budget_flag: str | None = None, force: bool = False, images: str | None = None, masks: str | None = None,
         name: str | None = None, memory: tuple[str, int] | None = None) -> Plan:
    """Check ``data_dir``, fingerprint it and write a commented recipe to ``out`` (see the module docstring).

    ``memory``: ("cpu" | "cuda", bytes) instead of this machine's (for tests)."""
    if strategy not in STRATEGIES_PLANNED:
        raise DataError(f"--strategy {strategy}: plan writes recipes for {list(STRATEGIES_PLANNED)}; start from one of "
                        "them and change the stage, or copy a shipped recipe (recipes/*.yaml)")
    if labeled is not None and budget_flag is not None:
        raise DataError("give --labeled or --budget-flag, not both")
    if labeled is not None and labeled < 1:
        raise DataError(f"--labeled must be at least 1, got {labeled}")
    out = Path(out).expanduser().resolve()
    root = Path(data_dir).expanduser().resolve()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists: pass --force to overwrite it, or choose another --out")
    if out.is_relative_to(root):
        raise OutputError(f"--out {out} is inside the data folder {root}: plan never writes there; write the recipe "
                          "elsewhere")
    if out.suffix not in (".yaml", ".yml"):
        raise OutputError(f"--out {out}: a recipe is a .yaml file")
    layout, problems = discover(root, images, masks)
    infos, meta = (_check_nifti if layout.kind == "nifti" else _check_2d)(layout, problems)
    values = _check_labels(layout, infos, problems)
    if problems.errors:
        lines = problems.lines()
        raise DataError(f"{problems.errors} problem(s) in {root} (fix them and run plan again):\n" + "\n".join(lines))
    fp = fingerprint(layout, infos, values, meta)
    name = name or out.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    text, split_path, lcc = _render(layout, fp, out, name, strategy, labeled, budget_flag,
                                    memory or device_memory())
    from .recipe import parse_recipe
    import yaml

    parse_recipe(yaml.safe_load(text), source=f"planned recipe {out}")  # a recipe plan wrote must validate
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return Plan(out, text, fp, problems.lines(), split_path, lcc)


def _link_nnunet(layout: Layout, out_dir: Path, name: str) -> Path:
    """nnU-Net v2 names images ``<case>_0000.nii.gz``; nifti_folder matches labels by stem, so link
    ``imagesTr/<case>.nii.gz`` and ``labelsTr/<case>.nii.gz`` in a folder next to the recipe."""
    link = out_dir / f"{name}_data"
    for sub in ("imagesTr", "labelsTr"):
        (link / sub).mkdir(parents=True, exist_ok=True)
    for p in layout.pairs:
        for sub, src in (("imagesTr", p.image), ("labelsTr", p.mask)):
            if src is None:
                continue
            dst = link / sub / f"{p.stem}{_suffix(src.name, NIFTI_SUFFIXES)}"
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            dst.symlink_to(src)
    return link


@dataclass
class Budget:
    text: str  # the YAML value after ``budget:`` (a flow mapping, or "\n    ids: ..." block)
    labelled: int
    why: str


@dataclass
class Size:
    """The data-section lines of the training size (with their comments) and the pixels (voxels) of one sample."""
    lines: list[str]
    pixels: int
    native_2d: bool = False  # 2D patches at native resolution (sliding-window evaluation)


@dataclass
class Geometry:
    """3D: the data-section lines of orientation, spacing and normalisation, and the target spacing (None: native)."""
    lines: list[str]
    spacing: list[float] | None
    normalize: str | None


@dataclass
class Derived:
    """Every derived setting of a recipe, each with the measured numbers its comment states."""
    three_d: bool
    strategy: str
    semi: bool
    has_val: bool
    split_csv: Path | str
    split_notes: list[str]
    budget: Budget
    size: Size
    geometry: Geometry | None
    batch: int
    batch_why: str
    steps: int
    val_every: int
    steps_why: str
    norm_why: str
    data_root: Path
    options: dict[str, Any]
    lcc: tuple[bool, str] | None


def _budget(layout: Layout, train: list[str], rows: dict[str, dict[str, str]], strategy: str, labeled: int | None,
            budget_flag: str | None) -> Budget:
    """The label budget: --budget-flag ids, --labeled count, else 10 % (semi-supervised) or all train cases."""
    semi = strategy in ("mean_teacher", "bcp")
    if budget_flag is not None:
        names = {k for r in rows.values() for k in r} - {"stem", "case", "split"}
        cols = sorted(k for k in names if all(r.get(k, "") in ("0", "1", "") for r in rows.values()))
        if budget_flag not in cols:
            raise DataError(f"--budget-flag {budget_flag}: not a 0/1 column of the split CSV; its flag columns: "
                            f"{cols or 'none'}")
        ids = sorted(s for s in train if rows.get(s, {}).get(budget_flag) == "1")
        if not ids:
            raise DataError(f"--budget-flag {budget_flag}: no train case has {budget_flag} = 1")
        b = Budget("\n    ids:\n" + "\n".join(f"      - {_y(i)}" for i in ids), len(ids),
                   f"--budget-flag {budget_flag}: the {len(ids)} train cases with {budget_flag} = 1 in the split CSV, "
                   "as ids (image_folder / nifti_folder read no flag columns)")
    elif labeled is not None:
        if labeled > len(train):
            raise DataError(f"--labeled {labeled} exceeds the {len(train)} train cases")
        b = Budget(f"{{count: {labeled}}}", labeled,
                   f"--labeled {labeled}: {labeled} train cases picked at random (data.budget.seed 0)")
    elif semi:
        n_lab = max(1, round(0.1 * len(train)))
        b = Budget(f"{{count: {n_lab}}}", n_lab, f"no --labeled given: 10 % of the {len(train)} train cases (the "
                   "SSL4MIS/BCP 10 % setting); the rest is the unlabelled pool")
    else:
        b = Budget("{all: true}", len(train), f"no --labeled given: all {len(train)} train cases labelled")
    if semi and b.labelled >= len(train):
        raise DataError(f"--strategy {strategy} needs unlabelled train cases, but the budget labels all {len(train)}: "
                        "lower --labeled")
    if "patient" in next(iter(rows.values()), {}) and layout.kind != "nifti":
        b.why += ("; NOTE: the split CSV has a 'patient' column but image_folder groups by file, so budgets count "
                  "files, not patients, and evaluation is per image")
    return b


def _memory_text(mem: int, width: int, batch: int | str, streams: int) -> str:
    return f"{MEMORY_SHARE:g} × {mem / 2**30:.1f} GiB / ({ACT_BYTES} B × {width} channels × batch {batch} × " \
           f"{streams} stream(s))"


def _size_3d(fp: dict, target: list[float] | None, device: str, mem: int, streams: int) -> Size:
    """3D patch: the median shape (on the target grid) rounded down to 16, the longest axis cut until it fits."""
    med = _resampled_median_shape(fp, target)
    patch = [max(MIN_PATCH_3D, _round16(m)) for m in med]
    cap = int(min(VOXEL_CAP[device], MEMORY_SHARE * mem / (ACT_BYTES * WIDTH_3D * 2 * streams)))
    while math.prod(patch) > cap and max(patch) > MIN_PATCH_3D:
        patch[int(np.argmax(patch))] -= 16
    grid = (f" on the {'×'.join(f'{t:g}' for t in target)} mm grid (each volume's shape × its spacing / the target "
            "spacing)") if target is not None else ""
    small = any(_round16(m) < MIN_PATCH_3D for m in med)
    floor = (f", at least {MIN_PATCH_3D} (the U-Net's 3 halvings keep a 4-voxel bottleneck, as nnU-Net requires; a "
             "16-voxel axis leaves 2 voxels and training can turn NaN; smaller volumes are zero-padded)") if small else ""
    why = (f"median shape {'×'.join(f'{m:g}' for m in med)}{grid} rounded down to multiples of 16{floor}, then the "
           f"longest axis cut by 16 until ≤ {cap:,} voxels = min({device} cap {VOXEL_CAP[device]:,}"
           f"{' (BCP LA 112×112×80)' if device == 'cpu' else ''}, {_memory_text(mem, WIDTH_3D, 2, streams)})")
    return Size([f"  # {why}", f"  patch_size: {_y(patch)}", FOREGROUND_LINE.format(what="voxel")], math.prod(patch))


def _resampled_median_shape(fp: dict, target: Sequence[float] | None) -> list[float]:
    """Median over the volumes of ``round(n · s / t)`` per axis (the grid CaseStore resamples to; ``target`` None:
    each volume's own shape), in the RAS axis order the run reorients to."""
    shapes, spacings = np.asarray(fp["grid"]["shape"], float), np.asarray(fp["grid"]["spacing"], float)
    if target is None:
        return np.median(shapes, 0).tolist()
    return np.median(np.maximum(1, np.round(shapes * spacings / np.asarray(target, float))), 0).tolist()


def _short_side_2d(fp: dict, device: str, mem: int, streams: int) -> tuple[int, float, str]:
    """Today's resize rule: (short side, aspect, reason); the short side is capped by the device and memory."""
    h, w = fp["size"]["median"]
    short, aspect_long = min(h, w), max(h, w) / max(min(h, w), 1)
    mem_px = MEMORY_SHARE * mem / (ACT_BYTES * WIDTH_2D * 8 * streams)
    s = _round16(min(short, SHORT_SIDE_CAP[device]))
    while s > 32 and s * _round16(s * aspect_long, down=False) > mem_px:
        s -= 16
    why = (f"median H×W {h:g}×{w:g}; aspect kept: short side = min(median short side {short:g}, {device} cap "
           f"{SHORT_SIDE_CAP[device]}, memory: {_memory_text(mem, WIDTH_2D, 8, streams)} = {mem_px:,.0f} px) rounded "
           "down to 16, long side scaled and rounded to 16")
    return max(s, 32), aspect_long, why


def _size_2d(fp: dict, device: str, mem: int, streams: int) -> Size:
    """2D: resize to the short-side rule, or native-resolution patches when resizing would erase thin structures."""
    h, w = fp["size"]["median"]
    s, aspect_long, why = _short_side_2d(fp, device, mem, streams)
    factor = min(h, w) / s
    widths = {k: c["width_median"] for k, c in fp["components"].items() if c.get("width_median") is not None}
    thin = {k: v for k, v in widths.items() if factor > 1 and v / factor < THIN_PX}
    width_text = (f"structure widths (2 × the largest distance to background per connected component, median over "
                  f"{fp.get('width_sampled', 0)} sampled masks): "
                  + ", ".join(f"{k} {v:.3g} px" for k, v in widths.items()))
    if thin:
        width_text += f"; resizing the median short side {min(h, w):g} to {s} divides them by {factor:.3g}"
        return _native_patch_2d(fp, device, mem, streams, width_text, thin, factor)
    long = max(s, _round16(s * aspect_long, down=False))
    size = [s, long] if h <= w else [long, s]
    lines = [f"  # {why}", f"  image_size: {_y(size)}"]
    if widths and factor > 1:
        lines.insert(0, f"  # {width_text}; resizing the median short side {min(h, w):g} to {s} divides them by "
                     f"{factor:.3g}: every class stays ≥ {THIN_PX:g} px wide (below that: native-resolution patches), "
                     "so resized")
    elif widths:
        lines.insert(0, f"  # {width_text}; the median short side {min(h, w):g} is not downscaled, so resized")
    return Size(lines, size[0] * size[1])


def _native_patch_2d(fp: dict, device: str, mem: int, streams: int, width_text: str, thin: dict[str, float],
                     factor: float) -> Size:
    """Square patches cut at each image's own size: side = min(median short side, device cap, memory rule)."""
    h, w = fp["size"]["median"]
    mem_px = MEMORY_SHARE * mem / (ACT_BYTES * WIDTH_2D * 8 * streams)
    p = max(32, _round16(min(min(h, w), SHORT_SIDE_CAP[device], math.sqrt(mem_px))))
    why = (f"{width_text}: " + ", ".join(f"{k} would be {v / factor:.2g} px" for k, v in thin.items())
           + f" (< {THIN_PX:g} px), so native resolution: no image_size, random patches of each image at its own size, "
           "evaluation and predict by a sliding window over the whole image")
    side = (f"patch side = min(median short side {min(h, w):g}, {device} cap {SHORT_SIDE_CAP[device]}, memory: "
            f"√({_memory_text(mem, WIDTH_2D, 8, streams)}) = {math.sqrt(mem_px):,.0f} px) rounded down to 16")
    return Size([f"  # {why}", f"  # {side}", f"  patch_size: {_y([p, p])}", FOREGROUND_LINE.format(what="pixel")],
                p * p, native_2d=True)


def _batch(three_d: bool, device: str, mem: int, pixels: int, streams: int) -> tuple[int, str]:
    """Batch: what a quarter of the memory holds, capped per device, even (BCP halves it), ≥ 2."""
    width, caps = (WIDTH_3D, BATCH_CAP_3D) if three_d else (WIDTH_2D, BATCH_CAP_2D)
    per = ACT_BYTES * width * pixels * streams
    batch = int(max(2, min(caps[device], MEMORY_SHARE * mem // per)) // 2 * 2)
    why = (f"batch rule: floor({MEMORY_SHARE:g} × {mem / 2**30:.1f} GiB ({'GPU' if device == 'cuda' else 'MemAvailable'}) "
           f"/ ({ACT_BYTES} B × {width} channels × {pixels:,} px × {streams} stream(s))), capped at {caps[device]} on "
           f"{device}, even, ≥ 2")
    return batch, why


def _steps(n_lab: int, batch: int) -> tuple[int, int, str]:
    """(steps, val_every, reason): 250 passes over the labelled cases, rounded to 100, clamped to [1000, 5000]."""
    steps = int(min(5000, max(1000, round(250 * n_lab / batch, -2))))
    why = (f"steps = 250 passes over the {n_lab} labelled case(s) at batch {batch} (250·{n_lab}/{batch}), "
           "rounded to 100 and clamped to [1000, 5000]")
    return steps, max(50, int(round(steps / 10 / 50)) * 50), why


def _is_ct(layout: Layout, fp: dict) -> tuple[bool, str]:
    """CT when dataset.json says so or the lowest value is below -500 (Hounsfield units); the reason."""
    it = fp.get("intensity") or {}
    if (layout.modality or "").upper() == "CT":
        return True, "dataset.json modality CT"
    if it.get("image_min", 0) < -500:
        return True, f"intensities in HU: lowest value {it.get('image_min'):g} < -500"
    return False, ""


def _normalisation_2d(fp: dict) -> str:
    it = fp.get("intensity") or {}
    if fp.get("bit_depth", 8) == 8:
        return f"{fp.get('bit_depth', 8)}-bit {'RGB' if fp['in_channels'] == 3 else 'grey'}: image_folder scales by 1/255"
    return (f"{fp['bit_depth']}-bit images: image_folder keeps them raw (foreground p0.5–p99.5 "
            f"{it.get('p0.5', 0):g}–{it.get('p99.5', 0):g}); a per-image z-score is NOT YET an image_folder "
            "option: lower the optimizer lr or convert to 8-bit")


def _normalisation_3d(layout: Layout, fp: dict) -> tuple[str | None, str]:
    """(data.normalize, reason): nnU-Net's CT scheme for CT, else None (nifti_folder's per-volume z-score)."""
    it = fp.get("intensity") or {}
    ct, source = _is_ct(layout, fp)
    if not ct:
        return None, f"{layout.modality or 'MR / non-CT'}: per-volume z-score (nifti_folder intensity: zscore)"
    nan = float("nan")
    return "ct", (f"CT ({source}): nnU-Net's CT scheme: clip to the labelled training foreground's [p0.5, p99.5] and "
                  "z-score with its mean/std, computed by the run on the labelled train cases (here, raw, "
                  f"{it.get('sampled_cases', 0)} cases sampled: [{it.get('p0.5', nan):g}, {it.get('p99.5', nan):g}], "
                  f"{it.get('mean', nan):.4g} / {it.get('std', nan):.4g}); it replaces nifti_folder's intensity option")


def _spread(a: np.ndarray) -> np.ndarray:
    return a.max(0) / np.maximum(a.min(0), 1e-12) - 1


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[list[float] | None, str]:
    """(data.spacing, reason): None when every volume has the same spacing (within ``SPACING_TOL`` per axis), else
    the median spacing; for anisotropic data nnU-Net's rule sets the low-resolution axis to its 10th percentile."""
    sp, sh = np.asarray(spacings, float), np.asarray(shapes, float)
    med, med_shape = np.median(sp, 0), np.median(sh, 0)
    fmt = "×".join(f"{v:.4g}" for v in med)
    if (_spread(sp) <= SPACING_TOL).all():
        return None, (f"every volume has spacing {fmt} mm (within {100 * SPACING_TOL:g} % per axis): no resampling, "
                      "each volume keeps its own grid")
    target = med.copy()
    worst = int(np.argmax(med))
    others = [i for i in range(len(med)) if i != worst]
    why = (f"spacings differ across volumes (up to {100 * _spread(sp).max():.0f} % on an axis, beyond "
           f"{100 * SPACING_TOL:g} %): every volume resampled once to the median spacing {fmt} mm")
    if med[worst] > ANISOTROPY * max(med[others]) and med_shape[worst] * ANISOTROPY < min(med_shape[others]):
        p10 = float(np.percentile(sp[:, worst], 10))
        target[worst] = max(p10, max(med[others]))
        why += (f"; anisotropic (axis {worst} spacing {med[worst]:.4g} > {ANISOTROPY:g} × {max(med[others]):.4g} mm "
                f"and its {med_shape[worst]:g} voxels × {ANISOTROPY:g} < {min(med_shape[others]):g}): nnU-Net's "
                f"rule sets that axis to the 10th percentile of its spacings, {target[worst]:.4g} mm")
    return [round(float(t), 4) for t in target], why


def _geometry_3d(layout: Layout, fp: dict) -> tuple[Geometry, str]:
    """3D orientation, spacing and normalisation lines; the normalisation's reason."""
    spacing, sp_why = target_spacing(fp["grid"]["spacing"], fp["grid"]["shape"])
    normalize, norm_why = _normalisation_3d(layout, fp)
    lines = ["  orientation: RAS   # every volume reoriented to RAS once (a no-op for volumes stored so)",
             f"  # spacing: {sp_why}"]
    if spacing is not None:
        lines.append(f"  spacing: {_y(spacing)}")
    if normalize is not None:
        lines.append(f"  normalize: {normalize}   # {norm_why}")
    return Geometry(lines, spacing, normalize), norm_why


def _dataset_options(layout: Layout, fp: dict, split_csv: Path | str, geometry: Geometry | None) -> dict[str, Any]:
    """``data.options`` of image_folder / nifti_folder: sub-folders, split CSV, class names, intensity."""
    options: dict[str, Any] = {"num_classes": fp["num_classes"]}
    if layout.kind == "nifti":
        if layout.images.name != "imagesTr" or layout.nnunet_v2:
            options["images"] = "imagesTr" if layout.nnunet_v2 else _rel(layout.images, layout.root)
        if layout.masks.name != "labelsTr" or layout.nnunet_v2:
            options["labels"] = "labelsTr" if layout.nnunet_v2 else _rel(layout.masks, layout.root)
        if geometry is None or geometry.normalize is None:  # data.normalize overrides the dataset's intensity
            options["intensity"] = "zscore"
    else:
        options["in_channels"] = fp["in_channels"]
        if _rel(layout.images, layout.root) != "images":
            options["images"] = _rel(layout.images, layout.root)
        if _rel(layout.masks, layout.root) != "masks":
            options["masks"] = _rel(layout.masks, layout.root)
    options["split_csv"] = str(split_csv)
    if layout.declared:
        options["class_names"] = fp["class_names"]
    return options


def _derive(layout: Layout, fp: dict, out: Path, name: str, strategy: str, labeled: int | None,
            budget_flag: str | None, memory: tuple[str, int]) -> Derived:
    device, mem = memory
    three_d = layout.kind == "nifti"
    split_notes: list[str] = []
    split_csv, split, rows = _split_for(layout, out.parent, name, split_notes)
    train = [s for s, v in split.items() if v == "train"]
    semi = strategy in ("mean_teacher", "bcp")
    streams = 2 if semi else 1
    budget = _budget(layout, train, rows, strategy, labeled, budget_flag)
    if three_d:
        geometry, norm_why = _geometry_3d(layout, fp)
        size = _size_3d(fp, geometry.spacing, device, mem, streams)
    else:
        geometry, norm_why = None, _normalisation_2d(fp)
        size = _size_2d(fp, device, mem, streams)
    batch, batch_why = _batch(three_d, device, mem, size.pixels, streams)
    steps, val_every, steps_why = _steps(budget.labelled, batch)
    data_root = _link_nnunet(layout, out.parent, name) if layout.nnunet_v2 else layout.root
    return Derived(three_d, strategy, semi, "val" in set(split.values()), split_csv, split_notes, budget, size,
                   geometry, batch, batch_why, steps, val_every, steps_why, norm_why, data_root,
                   _dataset_options(layout, fp, split_csv, geometry),
                   lcc_decision(fp) if strategy == "bcp" else None)


def _render(layout: Layout, fp: dict, out: Path, name: str, strategy: str, labeled: int | None,
            budget_flag: str | None, memory: tuple[str, int]) -> tuple[str, Path | None, tuple[bool, str] | None]:
    d = _derive(layout, fp, out, name, strategy, labeled, budget_flag, memory)
    lines = (_write_header(layout, fp, name) + _write_data(layout, fp, d) + _write_backbone(d.three_d)
             + _write_stages(d) + _write_trainer(d))
    split_path = Path(d.split_csv) if Path(d.split_csv).parent == out.parent else None
    return "\n".join(_wrap(lines)) + "\n", split_path, d.lcc


def _write_header(layout: Layout, fp: dict, name: str) -> list[str]:
    three_d = layout.kind == "nifti"
    L = [f"# Written by `label-efficient plan {layout.root}` — check the derived values before a long run.",
         f"# Data: {fp['cases']} cases ({fp['labelled']} labelled), {'3D NIfTI' if three_d else '2D images'}, "
         f"{fp['num_classes']} classes {fp['class_names']}; class pixel shares "
         + ", ".join(f"{k} {100 * v:.2f} %" for k, v in fp["class_share"].items()) + "."]
    for k, c in fp["components"].items():
        if c.get("masks"):
            L.append(f"#   {k}: median {c['median']:g} / max {c['max']} connected components per mask, median extent "
                     f"{'×'.join(f'{100 * v:.0f}%' for v in c['extent_fraction'])} of the image")
    return L + [f"name: {_y(name)}", "seed: 1337"]


def _write_options(layout: Layout, fp: dict, d: Derived) -> list[str]:
    o = d.options
    L = ["  options:", f"    num_classes: {fp['num_classes']}   # label values {list(range(fp['num_classes']))}"
         + (" declared in dataset.json" if layout.declared else " found in the masks")]
    if "in_channels" in o:
        L.append(f"    in_channels: {o['in_channels']}   # {'RGB' if o['in_channels'] == 3 else 'grey'} images")
    L += [f"    {k}: {_y(o[k])}" for k in ("images", "masks", "labels") if k in o]
    if "intensity" in o:
        L.append(f"    intensity: {o['intensity']}   # {d.norm_why}")
    L += [f"    # split: {note}" for note in d.split_notes]
    L.append(f"    split_csv: {_y(o['split_csv'])}")
    if "class_names" in o:
        L.append(f"    class_names: {_y(o['class_names'])}")
    return L


def _write_data(layout: Layout, fp: dict, d: Derived) -> list[str]:
    L = ["data:", f"  dataset: {'nifti_folder' if d.three_d else 'image_folder'}"]
    if layout.nnunet_v2:
        L += ["  # nnU-Net v2 names images <case>_0000.nii.gz; nifti_folder matches labels by stem, so the cases are "
              "linked", f"  # as <case>.nii.gz in {d.data_root} (next to the recipe; the data folder is untouched)"]
    L.append(f"  root: {_y(str(d.data_root))}")
    L += _write_options(layout, fp, d)
    if not d.three_d:
        L.append(f"  # intensity: {d.norm_why}")
    if d.geometry is not None:
        L += d.geometry.lines
    L += d.size.lines
    b = d.budget
    L += [f"  # {b.why}", f"  budget:{b.text}" if b.text.startswith("\n") else f"  budget: {b.text}"]
    if not d.has_val:
        L.append("  val_split: null   # the split has no val cases: each stage keeps its last checkpoint")
    return L


def _optimizer(three_d: bool) -> str:
    if three_d:
        return "{name: adamw, lr: 0.003, weight_decay: 0.0001, schedule: poly}   # the shipped LA recipes' optimizer"
    return "{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0001, schedule: constant}   # SSL4MIS/BCP SGD"


def _write_backbone(three_d: bool) -> list[str]:
    if three_d:
        return ["backbone:", "  name: unet   # the shipped 3D recipes' U-Net (recipes/la_*.yaml)",
                "  kwargs: {channels: [16, 32, 64, 128], num_res_units: 0}"]
    return ["backbone:", "  name: basic_unet   # the SSL4MIS/BCP U-Net of the shipped 2D recipes (ACDC-CPU protocol v2)"]


def _write_stages(d: Derived) -> list[str]:
    L = ["stages:", f"  # {d.steps_why}; {d.batch_why}"]
    if d.strategy == "bcp":
        return L + _write_bcp_stages(d)
    L.append(f"  - strategy: {d.strategy}")
    if d.strategy == "mean_teacher":
        L.append("    config: {ema_decay: 0.99, consistency: 0.1}   # SSL4MIS's mean-teacher settings")
    return L + [f"    steps: {d.steps}", f"    val_every: {d.val_every}",
                f"    batch_size: {{labeled: {d.batch}" + (f", unlabeled: {d.batch}}}" if d.semi else "}"),
                f"    optimizer: {_optimizer(d.three_d)}"]


def _write_bcp_stages(d: Derived) -> list[str]:
    """BCP's copy-paste pre-training (1/3 of the steps) and bidirectional copy-paste self-training (2/3)."""
    pre, self_ = int(max(1, round(d.steps / 3, -1))), int(max(1, round(2 * d.steps / 3, -1)))
    opt, lcc = _optimizer(d.three_d), d.lcc
    L = [f"  # BCP's two stages as recipes/{'la' if d.three_d else 'acdc'}_bcp.yaml: copy-paste pre-training (1/3 of "
         "the steps), then bidirectional copy-paste self-training (2/3)",
         "  - name: pretrain", "    strategy: bcp_pretrain", f"    steps: {pre}",
         f"    val_every: {max(50, int(round(pre / 5 / 50)) * 50)}", f"    batch_size: {{labeled: {d.batch}}}",
         f"    optimizer: {opt}",
         "  - name: selftrain", "    strategy: bcp",
         f"    init: {'previous_best' if d.has_val else 'previous_last'}   # "
         + ("the pre-training checkpoint best on val" if d.has_val else "no val split: the last pre-training step"),
         "    config:", "      beta: 0.6666667   # box side 2/3 of each image side (BCP)", "      u_weight: 0.5",
         "      ema_decay: 0.99"]
    if d.three_d:
        L += ["      ema_buffers: false   # the official LA code averages parameters only (recipes/la_bcp.yaml)",
              "      squared_dice: false  # the official LA Dice's linear denominator"]
    L += [f"      # largest_component {lcc[1]}; UPL-SFDA's pseudo-label cleaning (its config largest_component) makes "
          "the same one-structure-per-class assumption",
          f"      largest_component: {'true' if lcc[0] else 'false'}",
          f"    steps: {self_}", f"    val_every: {max(50, int(round(self_ / 10 / 50)) * 50)}",
          f"    batch_size: {{labeled: {d.batch}, unlabeled: {d.batch}}}", f"    optimizer: {opt}"]
    return L


def _write_trainer(d: Derived) -> list[str]:
    L = ["trainer:", "  precision: auto   # bf16 where the device runs it natively, else fp32"]
    if d.three_d:
        L += ["evaluation:", "  sw_overlap: 0.5   # sliding-window evaluation with the training patch"]
    elif d.size.native_2d:
        L += ["evaluation:", "  sw_overlap: 0.5   # sliding-window evaluation over each whole image with the training "
              "patch"]
    return L


def _wrap(lines: list[str], width: int = 118) -> list[str]:
    """Wrap long ``#`` comments at ``width``; a long trailing comment moves above its line."""
    import textwrap

    out = []
    for line in "\n".join(lines).split("\n"):
        if len(line) <= width:
            out.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        body = line.lstrip()
        if body.startswith("#"):
            out += textwrap.wrap(body[1:].strip(), width, initial_indent=indent + "# ", subsequent_indent=indent + "#   ")
        elif "   # " in body:
            value, comment = body.split("   # ", 1)
            out += textwrap.wrap(comment, width, initial_indent=indent + "# ", subsequent_indent=indent + "#   ")
            out.append(indent + value)
        else:
            out.append(line)
    return out
