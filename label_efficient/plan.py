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
    dj_path = root / "dataset.json"
    dj = None
    if dj_path.is_file():
        try:
            dj = json.loads(dj_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{dj_path} is not valid JSON ({e}): fix it or remove it") from None
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
    files = [p for p in img_dir.iterdir() if not p.name.startswith(".")]
    nifti = dj is not None or any(_suffix(p.name, NIFTI_SUFFIXES) for p in files) and \
        sum(bool(_suffix(p.name, NIFTI_SUFFIXES)) for p in files) >= sum(bool(_suffix(p.name, IMAGE_SUFFIXES)) for p in files)
    v2 = nifti and any(p.name.lower().endswith(("_0000.nii.gz", "_0000.nii")) for p in files)
    imgs = _scan(img_dir, root, problems, strip="_0000" if v2 else "")
    msks = _scan(msk_dir, root, problems)
    layout = Layout("nifti" if nifti else "image2d", root, img_dir, msk_dir, [], dataset_json=dj, nnunet_v2=v2)
    if v2:
        extra = [p for p in img_dir.iterdir() if p.name.lower().endswith((".nii.gz", ".nii"))
                 and "_" in p.name and p.name.split("_")[-1].split(".")[0].isdigit()
                 and not p.name.lower().endswith(("_0000.nii.gz", "_0000.nii"))]
        for p in sorted(extra):
            problems.error("extra channel", f"{_rel(p, root)} is a second input channel (nnU-Net _000k): nifti_folder "
                           "reads one channel per case; remove the extra channels or merge them")
        imgs = {s: p for s, p in imgs.items() if p not in extra}
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
        info = CaseInfo(pair.stem, shape, spacing=zooms[:3])
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
    fp["components"] = {}
    for v in values[1:]:
        c = comp[v]
        if not c["n"]:
            fp["components"][names[v]] = {"masks": 0}
            continue
        fp["components"][names[v]] = {
            "masks": len(c["n"]), "median": float(np.median(c["n"])), "max": int(np.max(c["n"])),
            "share_multi": float(np.mean(np.asarray(c["n"]) > 1)),
            "outside_largest": float(np.mean(c["outside"])),
            "extent_median": np.median(np.asarray(c["extent"]), 0).tolist(),
            "extent_fraction": np.median(np.asarray(c["rel"]), 0).tolist()}
    fp["intensity"] = _intensity(layout, labelled, sample_cases, sample_pixels)
    return fp


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
                   f"{'×'.join(f'{100 * v:.0f}%' for v in c['extent_fraction'])} of the image")
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


def _lcc_decision(fp: dict) -> tuple[bool, str]:
    """Largest-component cleaning on iff every class has one component in the median labelled mask and the
    largest component holds ≥ 95 % of its pixels; the reason states the measured numbers."""
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


def _render(layout: Layout, fp: dict, out: Path, name: str, strategy: str, labeled: int | None,
            budget_flag: str | None, memory: tuple[str, int]) -> tuple[str, Path | None, tuple[bool, str] | None]:
    device, mem = memory
    three_d = layout.kind == "nifti"
    split_notes: list[str] = []
    split_csv, split, rows = _split_for(layout, out.parent, name, split_notes)
    train = [s for s, v in split.items() if v == "train"]
    has_val = "val" in set(split.values())
    semi = strategy in ("mean_teacher", "bcp")

    # label budget
    if budget_flag is not None:
        names = {k for r in rows.values() for k in r} - {"stem", "case", "split"}
        cols = sorted(k for k in names if all(r.get(k, "") in ("0", "1", "") for r in rows.values()))
        if budget_flag not in cols:
            raise DataError(f"--budget-flag {budget_flag}: not a 0/1 column of the split CSV; its flag columns: "
                            f"{cols or 'none'}")
        ids = sorted(s for s in train if rows.get(s, {}).get(budget_flag) == "1")
        if not ids:
            raise DataError(f"--budget-flag {budget_flag}: no train case has {budget_flag} = 1")
        budget = "\n    ids:\n" + "\n".join(f"      - {_y(i)}" for i in ids)
        why = (f"--budget-flag {budget_flag}: the {len(ids)} train cases with {budget_flag} = 1 in the split CSV, as ids "
               "(image_folder / nifti_folder read no flag columns)")
        n_lab = len(ids)
    elif labeled is not None:
        if labeled > len(train):
            raise DataError(f"--labeled {labeled} exceeds the {len(train)} train cases")
        budget, n_lab = f"{{count: {labeled}}}", labeled
        why = f"--labeled {labeled}: {labeled} train cases picked at random (data.budget.seed 0)"
    elif semi:
        n_lab = max(1, round(0.1 * len(train)))
        budget, why = f"{{count: {n_lab}}}", (f"no --labeled given: 10 % of the {len(train)} train cases (the SSL4MIS/BCP "
                                              "10 % setting); the rest is the unlabelled pool")
    else:
        budget, n_lab, why = "{all: true}", len(train), f"no --labeled given: all {len(train)} train cases labelled"
    if semi and n_lab >= len(train):
        raise DataError(f"--strategy {strategy} needs unlabelled train cases, but the budget labels all {len(train)}: "
                        "lower --labeled")
    if "patient" in next(iter(rows.values()), {}) and not three_d:
        why += ("; NOTE: the split CSV has a 'patient' column but image_folder groups by file, so budgets count "
                "files, not patients, and evaluation is per image")

    # size, batch
    streams = 2 if semi else 1
    if three_d:
        med = fp["size"]["median"]
        patch = [_round16(m) for m in med]
        mem_cap = MEMORY_SHARE * mem / (ACT_BYTES * WIDTH_3D * 2 * streams)
        cap = int(min(VOXEL_CAP[device], mem_cap))
        while math.prod(patch) > cap and max(patch) > 16:
            i = int(np.argmax(patch))
            patch[i] -= 16
        per = ACT_BYTES * WIDTH_3D * math.prod(patch) * streams
        batch = int(max(2, min(BATCH_CAP_3D[device], MEMORY_SHARE * mem // per)) // 2 * 2)
        size_line = f"  patch_size: {_y(patch)}"
        size_why = (f"median shape {'×'.join(f'{m:g}' for m in med)} rounded down to multiples of 16, then the longest "
                    f"axis cut by 16 until ≤ {cap:,} voxels = min({device} cap {VOXEL_CAP[device]:,}"
                    f"{' (BCP LA 112×112×80)' if device == 'cpu' else ''}, {MEMORY_SHARE:g} × {mem / 2**30:.1f} GiB / "
                    f"({ACT_BYTES} B × {WIDTH_3D} channels × batch 2 × {streams} stream(s)))")
        pixels = math.prod(patch)
    else:
        h, w = fp["size"]["median"]
        short, aspect_long = min(h, w), max(h, w) / max(min(h, w), 1)
        mem_px = MEMORY_SHARE * mem / (ACT_BYTES * WIDTH_2D * 8 * streams)
        s = _round16(min(short, SHORT_SIDE_CAP[device]))
        while s > 32 and s * _round16(s * aspect_long, down=False) > mem_px:
            s -= 16
        s = max(s, 32)
        long = max(s, _round16(s * aspect_long, down=False))
        size = [s, long] if h <= w else [long, s]
        size_line = f"  image_size: {_y(size)}"
        size_why = (f"median H×W {h:g}×{w:g}; aspect kept: short side = min(median short side {short:g}, {device} cap "
                    f"{SHORT_SIDE_CAP[device]}, memory: {MEMORY_SHARE:g} × {mem / 2**30:.1f} GiB / ({ACT_BYTES} B × "
                    f"{WIDTH_2D} channels × batch 8 × {streams} stream(s)) = {mem_px:,.0f} px) rounded down to 16, long "
                    "side scaled and rounded to 16")
        pixels = size[0] * size[1]
        per = ACT_BYTES * WIDTH_2D * pixels * streams
        batch = int(max(2, min(BATCH_CAP_2D[device], MEMORY_SHARE * mem // per)) // 2 * 2)
    batch_why = (f"batch rule: floor({MEMORY_SHARE:g} × {mem / 2**30:.1f} GiB ({'GPU' if device == 'cuda' else 'MemAvailable'}) "
                 f"/ ({ACT_BYTES} B × {WIDTH_3D if three_d else WIDTH_2D} channels × {pixels:,} px × {streams} "
                 f"stream(s))), capped at {(BATCH_CAP_3D if three_d else BATCH_CAP_2D)[device]} on {device}, even, ≥ 2")

    # steps
    steps = int(min(5000, max(1000, round(250 * n_lab / batch, -2))))
    steps_why = (f"steps = 250 passes over the {n_lab} labelled case(s) at batch {batch} (250·{n_lab}/{batch}), "
                 "rounded to 100 and clamped to [1000, 5000]")
    val_every = max(50, int(round(steps / 10 / 50)) * 50)

    # normalisation
    it = fp.get("intensity") or {}
    ct = (layout.modality or "").upper() == "CT" or it.get("image_min", 0) < -500
    if three_d:
        intensity = "zscore"
        if ct:
            norm_why = (f"CT ({'dataset.json modality CT' if (layout.modality or '').upper() == 'CT' else 'intensities in HU: lowest value ' + format(it.get('image_min'), 'g') + ' < -500'}): "
                        f"nnU-Net's rule clips to the foreground percentiles [p0.5, p99.5] = [{it.get('p0.5', float('nan')):g}, "
                        f"{it.get('p99.5', float('nan')):g}] and z-scores with the foreground mean/std ({it.get('mean', float('nan')):.4g} / "
                        f"{it.get('std', float('nan')):.4g}); NOT YET SUPPORTED by nifti_folder (needs a clipping option), so per-volume z-score")
        else:
            norm_why = f"{layout.modality or 'MR / non-CT'}: per-volume z-score (nifti_folder intensity: zscore)"
    else:
        intensity = None
        if fp.get("bit_depth", 8) == 8:
            norm_why = f"{fp.get('bit_depth', 8)}-bit {'RGB' if fp['in_channels'] == 3 else 'grey'}: image_folder scales by 1/255"
        else:
            norm_why = (f"{fp['bit_depth']}-bit images: image_folder keeps them raw (foreground p0.5–p99.5 "
                        f"{it.get('p0.5', 0):g}–{it.get('p99.5', 0):g}); a per-image z-score is NOT YET an image_folder "
                        "option: lower the optimizer lr or convert to 8-bit")

    # dataset
    data_root = _link_nnunet(layout, out.parent, name) if layout.nnunet_v2 else layout.root
    options = {"num_classes": fp["num_classes"]}
    if three_d:
        if layout.images.name != "imagesTr" or layout.nnunet_v2:
            options["images"] = "imagesTr" if layout.nnunet_v2 else _rel(layout.images, layout.root)
        if layout.masks.name != "labelsTr" or layout.nnunet_v2:
            options["labels"] = "labelsTr" if layout.nnunet_v2 else _rel(layout.masks, layout.root)
        options["intensity"] = intensity
    else:
        options["in_channels"] = fp["in_channels"]
        if _rel(layout.images, layout.root) != "images":
            options["images"] = _rel(layout.images, layout.root)
        if _rel(layout.masks, layout.root) != "masks":
            options["masks"] = _rel(layout.masks, layout.root)
    options["split_csv"] = str(split_csv)
    if layout.declared:
        options["class_names"] = fp["class_names"]
    lcc = _lcc_decision(fp) if strategy == "bcp" else None

    L: list[str] = []
    a = L.append
    a(f"# Written by `label-efficient plan {layout.root}` — check the derived values before a long run.")
    a(f"# Data: {fp['cases']} cases ({fp['labelled']} labelled), {'3D NIfTI' if three_d else '2D images'}, "
      f"{fp['num_classes']} classes {fp['class_names']}; class pixel shares "
      + ", ".join(f"{k} {100 * v:.2f} %" for k, v in fp["class_share"].items()) + ".")
    for k, c in fp["components"].items():
        if c.get("masks"):
            a(f"#   {k}: median {c['median']:g} / max {c['max']} connected components per mask, median extent "
              f"{'×'.join(f'{100 * v:.0f}%' for v in c['extent_fraction'])} of the image")
    a(f"name: {_y(name)}")
    a("seed: 1337")
    a("data:")
    a(f"  dataset: {'nifti_folder' if three_d else 'image_folder'}")
    if layout.nnunet_v2:
        a(f"  # nnU-Net v2 names images <case>_0000.nii.gz; nifti_folder matches labels by stem, so the cases are linked")
        a(f"  # as <case>.nii.gz in {data_root} (next to the recipe; the data folder is untouched)")
    a(f"  root: {_y(str(data_root))}")
    a("  options:")
    a(f"    num_classes: {fp['num_classes']}   # label values {list(range(fp['num_classes']))}"
      + (" declared in dataset.json" if layout.declared else " found in the masks"))
    if "in_channels" in options:
        a(f"    in_channels: {options['in_channels']}   # {'RGB' if options['in_channels'] == 3 else 'grey'} images")
    for k in ("images", "masks", "labels"):
        if k in options:
            a(f"    {k}: {_y(options[k])}")
    if "intensity" in options:
        a(f"    intensity: {options['intensity']}   # {norm_why}")
    for note in split_notes:
        a(f"    # split: {note}")
    a(f"    split_csv: {_y(options['split_csv'])}")
    if "class_names" in options:
        a(f"    class_names: {_y(options['class_names'])}")
    if not three_d:
        a(f"  # intensity: {norm_why}")
    a(f"  # {size_why}")
    a(size_line)
    a(f"  # {why}")
    a(f"  budget:{budget}" if budget.startswith("\n") else f"  budget: {budget}")
    if not has_val:
        a("  val_split: null   # the split has no val cases: each stage keeps its last checkpoint")
    a("backbone:")
    if three_d:
        a("  name: unet   # the shipped 3D recipes' U-Net (recipes/la_*.yaml)")
        a("  kwargs: {channels: [16, 32, 64, 128], num_res_units: 0}")
        opt = "{name: adamw, lr: 0.003, weight_decay: 0.0001, schedule: poly}   # the shipped LA recipes' optimizer"
    else:
        a("  name: basic_unet   # the SSL4MIS/BCP U-Net of the shipped 2D recipes (ACDC-CPU protocol v2)")
        opt = "{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0001, schedule: constant}   # SSL4MIS/BCP SGD"
    a("stages:")
    a(f"  # {steps_why}; {batch_why}")
    if strategy == "bcp":
        pre, self_ = max(1, round(steps / 3, -1)), max(1, round(2 * steps / 3, -1))
        a(f"  # BCP's two stages as recipes/{'la' if three_d else 'acdc'}_bcp.yaml: copy-paste pre-training (1/3 of the "
          f"steps), then bidirectional copy-paste self-training (2/3)")
        a("  - name: pretrain")
        a("    strategy: bcp_pretrain")
        a(f"    steps: {int(pre)}")
        a(f"    val_every: {max(50, int(round(pre / 5 / 50)) * 50)}")
        a(f"    batch_size: {{labeled: {batch}}}")
        a(f"    optimizer: {opt}")
        a("  - name: selftrain")
        a("    strategy: bcp")
        a(f"    init: {'previous_best' if has_val else 'previous_last'}   # "
          + ("the pre-training checkpoint best on val" if has_val else "no val split: the last pre-training step"))
        a("    config:")
        a("      beta: 0.6666667   # box side 2/3 of each image side (BCP)")
        a("      u_weight: 0.5")
        a("      ema_decay: 0.99")
        if three_d:
            a("      ema_buffers: false   # the official LA code averages parameters only (recipes/la_bcp.yaml)")
            a("      squared_dice: false  # the official LA Dice's linear denominator")
        a(f"      # largest_component {lcc[1]}")
        a(f"      largest_component: {'true' if lcc[0] else 'false'}")
        a(f"    steps: {int(self_)}")
        a(f"    val_every: {max(50, int(round(self_ / 10 / 50)) * 50)}")
        a(f"    batch_size: {{labeled: {batch}, unlabeled: {batch}}}")
        a(f"    optimizer: {opt}")
    else:
        a(f"  - strategy: {strategy}")
        if strategy == "mean_teacher":
            a("    config: {ema_decay: 0.99, consistency: 0.1}   # SSL4MIS's mean-teacher settings")
        a(f"    steps: {steps}")
        a(f"    val_every: {val_every}")
        a(f"    batch_size: {{labeled: {batch}" + (f", unlabeled: {batch}}}" if semi else "}"))
        a(f"    optimizer: {opt}")
    a("trainer:")
    a("  precision: auto   # bf16 where the device runs it natively, else fp32")
    if three_d:
        a("evaluation:")
        a("  sw_overlap: 0.5   # sliding-window evaluation with the training patch")
    return "\n".join(_wrap(L)) + "\n", (Path(split_csv) if Path(split_csv).parent == out.parent else None), lcc


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
