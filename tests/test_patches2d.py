"""2D training on patches at the images' own size: random (foreground-centred) crops, sliding-window evaluation
and prediction over the whole image, metrics at each image's own size; every strategy sees fixed-size patches."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import disc_image, tiny_recipe
from label_efficient.cli import main
from label_efficient.data.transforms import PatchAugment2D
from label_efficient.recipe import RecipeError, parse_recipe
from label_efficient.runner import run_recipe


def _native_folder(root, n=16):
    """Disc images of several sizes (larger than the patch, one smaller), not resized anywhere."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    sizes = [(48, 64), (64, 48), (56, 56), (40, 72)]
    rows = []
    for i in range(n):
        h, w = sizes[i % 4] if i != 5 else (24, 28)
        img, mask = disc_image(rng, max(h, w))
        img, mask = img[:h, :w], mask[:h, :w]
        Image.fromarray(img).save(root / "images" / f"c{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"c{i:02d}.png")
        rows.append({"stem": f"c{i:02d}", "split": "train" if i < n - 6 else ("val" if i < n - 3 else "test")})
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["stem", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


def _patch_recipe(root, **stage):
    raw = tiny_recipe(root, **stage)
    raw["data"].pop("image_size")
    raw["data"]["patch_size"] = [32, 32]
    raw["data"]["foreground_ratio"] = 0.5
    return raw


def test_patches_are_cropped_at_native_size_and_centred_on_foreground():
    rng = np.random.default_rng(0)
    image = rng.random((1, 60, 90)).astype(np.float32)
    label = np.zeros((60, 90), np.int64)
    label[50:54, 80:84] = 1  # a small structure in a corner
    always = PatchAugment2D([16, 16], enabled=False, foreground_ratio=1.0)
    never = PatchAugment2D([16, 16], enabled=False, foreground_ratio=0.0)
    hits = [always(image, label, s)[1].any() for s in range(20)]
    misses = [never(image, label, s)[1].any() for s in range(200)]
    assert all(hits) and np.mean(misses) < 0.2
    img, lab, _ = always(image, label, 3)
    assert img.shape == (1, 16, 16) and lab.shape == (16, 16)
    # the patch is a crop of the image itself, not a resized copy
    window = [(y0, x0) for y0 in range(45) for x0 in range(75)
              if np.array_equal(image[0, y0:y0 + 16, x0:x0 + 16], img[0])]
    assert window, "the patch must be an unresized crop"
    small = always(image[:, :10, :12], label[:10, :12], 0)[0]  # smaller than the patch: zero-padded
    assert small.shape == (1, 16, 16)
    assert np.array_equal(always(image, label, 7)[0], always(image, label, 7)[0])  # seeded: exact resume


@pytest.mark.parametrize("strategy", ["supervised", "bcp"])
def test_patch_training_and_sliding_window_evaluation_at_native_size(tmp_path, strategy):
    root = _native_folder(tmp_path / "native")
    stage = {"strategy": strategy, "steps": 4, "val_every": 2}
    if strategy == "bcp":
        stage["batch_size"] = {"labeled": 2, "unlabeled": 2}
    m = run_recipe(parse_recipe(_patch_recipe(root, **stage)), tmp_path / "run")
    assert 0 <= m["mean_dice"] <= 1 and set(m["cases"]) == {"c13", "c14", "c15"}
    blob = torch.load(tmp_path / "run/model.pt", weights_only=True)
    assert blob["data"]["patch_size"] == [32, 32] and blob["data"]["image_size"] is None
    # predict writes each mask at its image's own size, through the same sliding window
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for stem in ("c00", "c01", "c03", "c05"):
        (inputs / f"{stem}.png").write_bytes((root / "images" / f"{stem}.png").read_bytes())
    assert main(["predict", "--model", str(tmp_path / "run/model.pt"), "--input", str(inputs), "--output",
                 str(tmp_path / "pred")]) == 0
    for stem in ("c00", "c01", "c03", "c05"):
        src = np.asarray(Image.open(inputs / f"{stem}.png"))
        assert np.asarray(Image.open(tmp_path / "pred" / f"{stem}.png")).shape == src.shape


def test_patch_size_must_match_the_data(tmp_path):
    root = _native_folder(tmp_path / "native")
    raw = _patch_recipe(root)
    raw["data"]["patch_size"] = [32, 32, 8]
    with pytest.raises(RecipeError, match=r"data.patch_size \[32, 32, 8\] has 3 axes, but dataset 'native' is 2D"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
    raw["data"].pop("patch_size")
    from label_efficient.errors import DataError

    with pytest.raises(DataError, match="set data.image_size .* or data.patch_size to train on patches"):
        run_recipe(parse_recipe(raw), tmp_path / "run2")
