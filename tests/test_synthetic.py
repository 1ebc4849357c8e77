"""Data-producing stages: generated pairs written resumably with a manifest, checked, mixed into labelled batches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from label_efficient.data import CaseStore, DataError, StepBatches, Stream, build_dataset
from label_efficient.data.synthetic import generate_pairs, load_pairs
from label_efficient.recipe import RecipeError, parse_recipe

from conftest import tiny_recipe


def _store(folder, classes=3):
    spec = build_dataset("image_folder", folder, num_classes=classes, split_csv="split.csv")
    return spec, CaseStore(spec, (32, 32))


def keep_foreground(image, label, n, seed):
    """A stand-in generator: new noise background, foreground pixels kept."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, *image.shape, generator=g)
    return torch.where(label > 0, image, noise)


def test_generation_skips_empty_masks_resumes_and_writes_the_manifest_last(image_folder, tmp_path):
    spec, store = _store(image_folder)
    cases = store.load(spec.select("train")[:4], True)
    store.get(cases[1], True).label[:] = 0  # an empty mask
    calls = []

    def flaky(image, label, n, seed):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed during the second case it generates
        return keep_foreground(image, label, n, seed)

    out = tmp_path / "generated"
    with pytest.raises(KeyboardInterrupt):
        generate_pairs(flaky, store, cases, out, 3, seed=0, strategy="fake")
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.npz"))) == 1
    with pytest.raises(DataError, match="did not finish"):
        load_pairs(out, store)
    m = generate_pairs(flaky, store, cases, out, 3, seed=0, strategy="fake")
    assert len(calls) == 4  # resumed: the first case was not generated again
    assert m["skipped_empty"] == [cases[1].id] and len(m["cases"]) == 3
    pairs = load_pairs(out, store)
    assert len(pairs) == 9
    for img, lab in pairs:
        src = next(store.get(c, True) for c in cases if np.array_equal(store.get(c, True).label, lab))
        assert np.array_equal(img[:, lab > 0], src.image[:, lab > 0])  # the exact foreground with its exact mask


def test_pairs_from_another_class_count_are_refused(image_folder, tmp_path):
    spec, store = _store(image_folder)
    generate_pairs(keep_foreground, store, store.load(spec.select("train")[:2], True), tmp_path / "g", 1, 0, "fake")
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    manifest["num_classes"] = 2
    (tmp_path / "g" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="num_classes=2"):
        load_pairs(tmp_path / "g", store)


def test_labelled_batches_mix_generated_pairs_at_the_ratio(image_folder):
    spec, store = _store(image_folder)
    marker = (np.zeros((1, 32, 32), np.float32), np.full((32, 32), 2, np.int64))  # an all-class-2 pair
    stream = Stream(spec.select("train")[:4], 4, True, synthetic=[marker], synthetic_ratio=0.5)
    batch = StepBatches(store, {"labeled": stream}, 3, augment=True)[(0, 0)]["labeled"]
    is_marker = (batch["label"] == 2).flatten(1).all(1)
    assert is_marker.tolist() == [True, True, False, False]
    with pytest.raises(DataError, match="labelled stream"):
        Stream(spec.select("train")[:4], 4, False, synthetic=[marker], synthetic_ratio=0.5)


def test_recipe_checks_where_synthetic_pairs_come_from(image_folder):
    raw = tiny_recipe(image_folder)
    raw["stages"] = [{**raw["stages"][0], "name": "gen"}, {**raw["stages"][0], "data": {"synthetic": {"from_stage": "gne"}}}]
    with pytest.raises(RecipeError, match="no earlier stage named 'gne'. Did you mean 'gen'"):
        parse_recipe(raw)
    raw["stages"][1]["data"] = {"synthetic": {"from_stage": "gen", "path": "/x"}}
    with pytest.raises(RecipeError, match="exactly one of from_stage"):
        parse_recipe(raw)
