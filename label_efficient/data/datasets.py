"""Dataset definitions: a list of cases (image, mask, split, patient group, evaluation volume).

Built-in definitions read the split CSVs of the real datasets in ``shared/data`` (ACDC, LA, Kvasir/CVC).
Generic definitions cover a 2D image folder, a NIfTI folder and HDF5 files, described by a split CSV or
by explicit lists. A root is never copied: it comes from the recipe, ``$LABEL_EFFICIENT_DATA`` or the
``shared/data`` folder beside the repository.
"""
from __future__ import annotations

import csv
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from ..registry import Registry
from .readers import IMAGE_SUFFIXES, DataError

log = logging.getLogger(__name__)
DATASETS: Registry[Callable[..., "DatasetSpec"]] = Registry("dataset")
ENV_ROOT = "LABEL_EFFICIENT_DATA"


@dataclass(frozen=True)
class Case:
    """One sample. ``group`` is the unit a label budget picks (patient); ``volume`` the unit evaluated."""

    id: str
    image: str
    mask: str | None
    split: str
    group: str
    volume: str
    index: int = 0
    domain: str | None = None
    flags: Mapping[str, int] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    name: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    class_names: list[str]
    cases: list[Case]
    format: Literal["image2d", "nifti", "h5"] = "image2d"
    intensity: Literal["unit", "zscore"] = "unit"
    #: per-case image remap ``(image (C, *S), case) -> image`` after preprocessing (e.g. the simulated scanner
    #: of ``simulated_shift``); labels are never remapped
    image_remap: Callable[[np.ndarray, Case], np.ndarray] | None = None

    def select(self, split: str | Sequence[str] | None = None, domain: str | None = None) -> list[Case]:
        splits = {split} if isinstance(split, str) else (set(split) if split else None)
        out = [c for c in self.cases if (splits is None or c.split in splits) and (domain is None or c.domain == domain)]
        if domain is not None and not out:
            domains = sorted({c.domain for c in self.cases if c.domain})
            raise DataError(f"dataset '{self.name}' has no cases of domain '{domain}'; domains: {domains}")
        return out


def default_root(folder: str) -> Path:
    """``$LABEL_EFFICIENT_DATA/<folder>``, else ``shared/data/<folder>`` next to the repository or cwd."""
    candidates = []
    if os.environ.get(ENV_ROOT):
        candidates.append(Path(os.environ[ENV_ROOT]) / folder)
    here = Path(__file__).resolve().parents[3]
    candidates += [here / "shared" / "data" / folder, Path.cwd().parent / "shared" / "data" / folder]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"data root for '{folder}' not found (looked in {', '.join(map(str, candidates))}); "
        f"set data.root in the recipe or the environment variable {ENV_ROOT}"
    )


def _root(root: str | Path | None, folder: str) -> Path:
    if root is None:
        return default_root(folder)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist")
    return root


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"split file {path} not found")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _flags(row: Mapping[str, str], names: Sequence[str]) -> dict[str, int]:
    return {n: int(row[n]) for n in names if row.get(n) not in (None, "")}


@DATASETS.register("acdc")
def acdc(root: str | Path | None = None) -> DatasetSpec:
    """ACDC cine-MRI, 2D slices; evaluated per volume (patient × frame); budget flags labeled_3 / labeled_7."""
    root = _root(root, "acdc")
    cases = [
        Case(id=r["stem"], image=str(root / "images" / f"{r['stem']}.png"), mask=str(root / "masks" / f"{r['stem']}.png"),
             split=r["split"], group=r["patient"], volume=f"{r['patient']}_{r['frame']}", index=int(r["z"]),
             flags=_flags(r, ("labeled_3", "labeled_7")))
        for r in _read_csv(root / "split.csv")
    ]
    return DatasetSpec("acdc", 2, 1, 4, ["background", "RV", "MYO", "LV"], cases)


@DATASETS.register("la_heart")
def la_heart(root: str | Path | None = None) -> DatasetSpec:
    """Left atrium LGE-MRI, 3D NIfTI; budget flags labeled_4 / labeled_8; z-score per volume as UA-MT."""
    root = _root(root, "la_heart")
    cases = [
        Case(id=r["case"], image=str(root / "imagesTr" / f"{r['case']}.nii.gz"),
             mask=str(root / "labelsTr" / f"{r['case']}.nii.gz"), split=r["split"], group=r["case"],
             volume=r["case"], flags=_flags(r, ("labeled_4", "labeled_8")))
        for r in _read_csv(root / "split.csv")
    ]
    return DatasetSpec("la_heart", 3, 1, 2, ["background", "LA"], cases, format="nifti", intensity="zscore")


@DATASETS.register("polyp_kvasir_cvc")
def polyp_kvasir_cvc(root: str | Path | None = None) -> DatasetSpec:
    """Kvasir-SEG + CVC-ClinicDB polyps (RGB); ``domain`` is the centre; CVC groups by video sequence."""
    root = _root(root, "polyp_kvasir_cvc")
    cases = []
    for r in _read_csv(root / "split.csv"):
        group = f"{r['domain']}:seq{r['sequence']}" if r.get("sequence") else f"{r['domain']}:{r['stem']}"
        cases.append(Case(id=f"{r['domain']}/{r['stem']}", image=str(root / r["image"]), mask=str(root / r["mask"]),
                          split=r["split"], group=group, volume=f"{r['domain']}/{r['stem']}", domain=r["domain"]))
    return DatasetSpec("polyp_kvasir_cvc", 2, 3, 2, ["background", "polyp"], cases)


def _stems(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """``{stem: file}`` of the files of ``folder`` with one of ``suffixes``; two files of one stem are an error (a
    mask is matched by stem, and one of them would silently be dropped)."""
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        suffix = next((s for s in suffixes if p.name.lower().endswith(s)), None)
        if suffix is None or p.name.startswith("."):
            continue
        stem = p.name[: -len(suffix)]
        if stem in out:
            raise DataError(f"{folder}: {out[stem].name} and {p.name} share the stem '{stem}' (masks and outputs are matched by "
                            "stem): rename or remove one")
        out[stem] = p
    return out


def _split_of(stems: Sequence[str], split_csv: str | Path | None, splits: Mapping[str, Sequence[str]] | None,
              root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(split of each stem, domain of each stem) from a CSV (columns stem|case, split, optional domain) or lists."""
    if split_csv:
        path = root / split_csv if not Path(split_csv).is_absolute() else Path(split_csv)
        rows = _read_csv(path)
        key = "stem" if rows and "stem" in rows[0] else "case"
        if not rows or key not in rows[0] or "split" not in rows[0]:
            raise DataError(f"split file {path} needs the columns stem (or case) and split; it has "
                            f"{list(rows[0]) if rows else 'no rows'}")
        split, domain, where = {r[key]: r["split"] for r in rows}, {r[key]: r["domain"] for r in rows if r.get("domain")}, path
    elif splits:
        split, domain, where = {s: name for name, ids in splits.items() for s in ids}, {}, "data.options.splits"
    else:
        return {s: "train" for s in stems}, {}
    absent = [s for s in split if s not in set(stems)]
    if absent:
        raise DataError(f"{where} lists {len(absent)} case(s) with no file in {root}, e.g. {absent[:3]}: add the "
                        "files or remove them from the split")
    unlisted = [s for s in stems if s not in split]
    if unlisted:
        log.warning("%d file(s) in %s are in no split of %s and are not used, e.g. %s", len(unlisted), root, where,
                    unlisted[:3])
    return split, domain


@DATASETS.register("image_folder")
def image_folder(root: str | Path, num_classes: int, images: str = "images", masks: str = "masks",
                 in_channels: int = 1, split_csv: str | None = None, splits: Mapping[str, Sequence[str]] | None = None,
                 class_names: Sequence[str] | None = None, allow_missing_masks: bool = False) -> DatasetSpec:
    """A 2D image folder with masks matched by file stem; split (and domain) from a CSV or explicit lists."""
    root = _root(root, "")
    imgs, msks = _stems(root / images, IMAGE_SUFFIXES), _stems(root / masks, IMAGE_SUFFIXES) if (root / masks).is_dir() else {}
    missing = sorted(set(imgs) - set(msks))
    if missing and not allow_missing_masks:
        raise DataError(f"{len(missing)} image(s) in {root / images} have no mask in {root / masks}, "
                        f"e.g. {missing[:3]}; set allow_missing_masks to use them as unlabelled")
    split, domain = _split_of(list(imgs), split_csv, splits, root)
    cases = [Case(id=s, image=str(p), mask=str(msks[s]) if s in msks else None, split=split.get(s, "unused"),
                  group=s, volume=s, domain=domain.get(s)) for s, p in imgs.items()]
    names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
    return DatasetSpec(root.name, 2, in_channels, num_classes, names, cases)


@DATASETS.register("nifti_folder")
def nifti_folder(root: str | Path, num_classes: int, images: str = "imagesTr", labels: str = "labelsTr",
                 split_csv: str | None = None, splits: Mapping[str, Sequence[str]] | None = None,
                 class_names: Sequence[str] | None = None, intensity: str = "zscore") -> DatasetSpec:
    """A folder of NIfTI volumes (``imagesTr/ labelsTr/`` as in the Medical Segmentation Decathlon)."""
    root = _root(root, "")
    imgs = _stems(root / images, (".nii.gz", ".nii"))
    lbls = _stems(root / labels, (".nii.gz", ".nii")) if (root / labels).is_dir() else {}
    split, domain = _split_of(list(imgs), split_csv, splits, root)
    cases = [Case(id=s, image=str(p), mask=str(lbls[s]) if s in lbls else None, split=split.get(s, "unused"),
                  group=s, volume=s, domain=domain.get(s)) for s, p in imgs.items()]
    names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
    return DatasetSpec(root.name, 3, 1, num_classes, names, cases, format="nifti", intensity=intensity)


@DATASETS.register("h5_files")
def h5_files(root: str | Path, num_classes: int, spatial_dims: int = 3, split_csv: str | None = None,
             splits: Mapping[str, Sequence[str]] | None = None, class_names: Sequence[str] | None = None,
             intensity: str = "unit") -> DatasetSpec:
    """SSL4MIS-style HDF5 files (datasets ``image``, ``label``), one case per file."""
    root = _root(root, "")
    files = _stems(root, (".h5",))
    split, domain = _split_of(list(files), split_csv, splits, root)
    cases = [Case(id=s, image=str(p), mask=str(p), split=split.get(s, "unused"), group=s, volume=s,
                  domain=domain.get(s)) for s, p in files.items()]
    names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
    return DatasetSpec(root.name, spatial_dims, 1, num_classes, names, cases, format="h5", intensity=intensity)


def build_dataset(name: str, root: str | Path | None = None, **options) -> DatasetSpec:
    """Build a registered dataset definition (``label-efficient list`` shows the names); ``options`` are checked
    against its arguments first, so a typo in ``data.options`` names the key."""
    from ..errors import RecipeError
    from ..registry import did_you_mean

    fn = DATASETS.get(name)
    params = inspect.signature(fn).parameters
    accepted = [p for p in params if p != "root"]
    for key in options:
        if key not in params or key == "root":
            raise RecipeError(f"data.options: dataset '{name}' has no option '{key}'.{did_you_mean(key, accepted)} "
                              f"Its options: {accepted or 'none'}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p != "root" and p not in options]
    if missing:
        raise RecipeError(f"data.options: dataset '{name}' needs {', '.join(missing)} (e.g. data.options.{missing[0]})")
    return fn(root=root, **options)
