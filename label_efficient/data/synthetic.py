"""Generated image/label pairs: written by a data-producing stage, read by later stages' labelled streams.

A generating stage (``Requirements.role == "generator"``, e.g. AugPaint) calls ``strategy.generate(image, label, n, seed)`` for each
labelled case of its label budget after training, and writes into ``<stage>/generated/``::

    <case id>.npz      images (n, C, *S) float32 and label (*S) int64, written atomically, one per source case
    manifest.json      dataset, class count, channels, image size, cases, skipped: written last

A folder without ``manifest.json`` is unfinished: it is never read, and generation resumes at the first missing case.
A later stage adds the pairs to its labelled stream with ``data.synthetic: {from_stage: <name>, ratio: 0.5}``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..utils import atomic_save_npz, atomic_write_json
from .datasets import Case
from .loaders import group_by_volume
from .readers import DataError
from .store import CaseStore

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class SyntheticConfig(BaseModel):
    """Generated pairs for the labelled stream: from an earlier stage of the recipe (its name) or a folder."""

    model_config = ConfigDict(extra="forbid")
    from_stage: str | None = None
    path: str | None = None
    #: share of each labelled batch drawn from generated pairs (AugPaint R: 1:1); 1: generated pairs only
    ratio: float = Field(0.5, gt=0, le=1)


def dataset_identity(store: CaseStore) -> dict:
    spec = store.spec
    return {"dataset": spec.name, "num_classes": spec.num_classes, "in_channels": spec.in_channels,
            "image_size": list(store.image_size) if store.image_size else None}


def _generate_volumes(generate, store: CaseStore, cases: Sequence[Case], out: Path, variants: int, seed: int):
    """Volume-wise generation (``Requirements.generates_volumes``): one call per volume, pairs written per slice."""
    for k, volume in enumerate(group_by_volume(cases).values()):
        if all((out / f"{c.id}.npz").is_file() for c in volume):
            continue
        t0, items = time.perf_counter(), [store.get(c, True) for c in volume]
        images = generate(torch.from_numpy(np.stack([it.image for it in items])),
                          torch.from_numpy(np.stack([it.label for it in items])), variants, seed * 100_003 + k)
        if tuple(images.shape[:2]) != (variants, len(volume)):
            raise ValueError(f"generate() returned shape {tuple(images.shape)} for a volume of {len(volume)} slices; "
                             f"expected ({variants}, {len(volume)}, C, H, W)")
        for z, (c, it) in enumerate(zip(volume, items)):
            atomic_save_npz(out / f"{c.id}.npz", {"images": images[:, z].float().numpy(),
                                                  "label": it.label.astype(np.int64)})
        log.info("generated volume %d (%d slices, %.1f s; resumable)", k + 1, len(volume), time.perf_counter() - t0)


def generate_pairs(generate: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor], store: CaseStore,
                   cases: Sequence[Case], out: Path, variants: int, seed: int, strategy: str,
                   volumes: bool = False) -> dict:
    """Generate ``variants`` images per labelled case into ``out`` (resumable), then write the manifest;
    ``volumes``: 2D cases go to ``generate`` a whole volume at a time (see ``Requirements.generates_volumes``)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        return json.loads((out / MANIFEST).read_text())
    if volumes and store.spec.spatial_dims == 2:
        _generate_volumes(generate, store, cases, out, variants, seed)
    done, skipped, t0, made = [], [], time.perf_counter(), 0
    for k, case in enumerate(cases):
        item = store.get(case, True)
        if not item.label.any():
            skipped.append(case.id)
            continue
        path = out / f"{case.id}.npz"
        if not path.is_file():
            images = generate(torch.from_numpy(item.image), torch.from_numpy(item.label), variants, seed * 100_003 + k)
            atomic_save_npz(path, {"images": images.float().numpy(), "label": item.label.astype(np.int64)})
            made += 1
            rate = (time.perf_counter() - t0) / made
            log.info("generated %d/%d labelled cases (%.1f s per case, ~%.0f s left; resumable)", k + 1, len(cases),
                     rate, rate * (len(cases) - k - 1))
        done.append(case.id)
    if skipped:
        log.warning("%d labelled case(s) with an empty mask were skipped (no foreground to keep): %s%s",
                    len(skipped), skipped[:5], " …" if len(skipped) > 5 else "")
    manifest = {**dataset_identity(store), "strategy": strategy, "variants": variants, "cases": done,
                "skipped_empty": skipped, "seconds": round(time.perf_counter() - t0, 1), "generated_now": made}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def load_pairs(folder: Path, store: CaseStore) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs of a finished generation folder, refused (named) when made for another dataset or class count."""
    if not (folder / MANIFEST).is_file():
        raise DataError(f"{folder} has no {MANIFEST}: its generation did not finish (resume the generating stage)")
    manifest = json.loads((folder / MANIFEST).read_text())
    mine = dataset_identity(store)
    for key, value in mine.items():
        if manifest.get(key) != value:
            raise DataError(f"generated pairs in {folder} were made with {key}={manifest.get(key)!r}, but this stage "
                            f"has {key}={value!r}: regenerate them for this dataset")
    pairs = []
    for cid in manifest["cases"]:
        with np.load(folder / f"{cid}.npz") as z:
            pairs += [(img, z["label"]) for img in z["images"]]
    if not pairs:
        raise DataError(f"{folder} holds no generated pair (every labelled mask was empty?)")
    return pairs
