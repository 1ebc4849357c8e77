"""Shared fixtures: one thread per test process, tiny synthetic datasets written to tmp folders."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def disc_image(rng: np.random.Generator, size: int = 32, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a bright disc (class 1) holding a brighter core (class 2), plus noise."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    r = rng.integers(size // 6, size // 3)
    d = np.hypot(yy - cy, xx - cx)
    mask = np.zeros((size, size), np.uint8)
    mask[d < r] = 1
    if classes > 2:
        mask[d < r / 2] = 2
    img = 40 + 80 * (mask > 0) + 60 * (mask == 2) + rng.normal(0, 8, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_image_folder(root: Path, n: int = 16, size: int = 32, seed: int = 0, classes: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        img, mask = disc_image(rng, size, classes)
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
        split = "train" if i < n - 6 else ("val" if i < n - 3 else "test")
        rows.append({"stem": f"case{i:02d}", "split": split})
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["stem", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "discs")


@pytest.fixture
def forbid_mask_reads(monkeypatch):
    """``forbid_mask_reads(paths)``: from now on, reading any of these mask files fails the test (the masks of an
    unlabelled pool must never be read)."""
    from label_efficient.data import readers

    def forbid(paths):
        forbidden, real = {str(p) for p in paths}, readers.read_mask_2d

        def guarded(path):
            assert str(path) not in forbidden, f"mask of unlabelled case read: {path}"
            return real(path)

        monkeypatch.setattr("label_efficient.data.store.read_mask_2d", guarded)

    return forbid


def tiny_recipe(root: Path, **stage) -> dict:
    """A recipe on the synthetic disc folder that trains in seconds."""
    st = {"strategy": "supervised", "steps": 6, "val_every": 3, "batch_size": {"labeled": 2, "unlabeled": 2},
          "optimizer": {"name": "adam", "lr": 0.01, "schedule": "constant"}}
    st.update(stage)
    return {
        "name": "tiny", "seed": 3,
        "data": {"dataset": "image_folder", "root": str(root), "options": {"num_classes": 3, "split_csv": "split.csv"},
                 "image_size": [32, 32], "budget": {"count": 4}},
        "backbone": {"name": "unet", "kwargs": {"channels": [8, 16, 32]}},
        "trainer": {"progress_bar": False, "accelerator": "cpu", "log_every": 1},
        "evaluation": {"metrics": ["dice", "hd95"], "overlays": 1},
        "stages": [st],
    }


def write_nifti_folder(root: Path, n: int = 10, shape: tuple[int, int, int] = (20, 20, 16), seed: int = 0) -> Path:
    """NIfTI volumes (``imagesTr/ labelsTr/``): a bright ball (label 1) at a random place in noise; split 6/2/2."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.mgrid[tuple(slice(0, s) for s in shape)], -1)
    for i in range(n):
        centre = rng.uniform(6, np.array(shape) - 6)
        lab = (np.linalg.norm(grid - centre, axis=-1) < 5).astype(np.uint8)
        img = (0.2 + 0.6 * lab + rng.normal(0, 0.1, shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"v{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"v{i:02d}.nii.gz")
    return root


def tiny_recipe_3d(root: Path, **stage) -> dict:
    """A 3D recipe on :func:`write_nifti_folder` data: random 16³ patches, sliding-window evaluation."""
    ids = [f"v{i:02d}" for i in range(10)]
    raw = tiny_recipe(root, **stage)
    raw["data"] = {"dataset": "nifti_folder", "root": str(root),
                   "options": {"num_classes": 2, "splits": {"train": ids[:6], "val": ids[6:8], "test": ids[8:]}},
                   "patch_size": [16, 16, 16], "budget": {"count": 3}}
    raw["backbone"] = {"name": "unet", "kwargs": {"channels": [4, 8, 16]}}
    return raw


def requires_shared(name: str):
    return pytest.mark.skipif(not (SHARED / name).is_dir(), reason=f"shared/data/{name} not present")


def write_two_domain_folder(root: Path, n_per_domain: int = 12, size: int = 32) -> Path:
    """Domain 'a': discs as in ``disc_image``; domain 'b': the same anatomy with inverted, compressed contrast."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for dom in ("a", "b"):
        for i in range(n_per_domain):
            img, mask = disc_image(rng, size)
            if dom == "b":
                img = (255 - img.astype(np.float32) * 0.6).clip(0, 255).astype(np.uint8)
            stem = f"{dom}{i:02d}"
            Image.fromarray(img).save(root / "images" / f"{stem}.png")
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
            split = "train" if i < n_per_domain - 4 else ("val" if i < n_per_domain - 2 else "test")
            rows.append({"stem": stem, "split": split, "domain": dom})
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["stem", "split", "domain"])
        w.writeheader()
        w.writerows(rows)
    return root


def sfda_recipe(root: Path, adapt: str, adapt_config: dict | None = None) -> dict:
    raw = tiny_recipe(root, steps=8, val_every=4)
    raw["data"]["domain"] = "a"
    raw["data"]["budget"] = {"all": True}
    raw["stages"].append({"strategy": adapt, "steps": 4, "val_every": 2, "init": "previous_best",
                          "data": {"domain": "b"}, "config": adapt_config or {}, "batch_size": {"unlabeled": 4},
                          "optimizer": {"name": "adam", "lr": 0.001, "schedule": "constant"}})
    return raw
