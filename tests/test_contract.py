"""Contract extensions: sparse labels (label_mask), per-case maps that follow augmentation, named optimizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from label_efficient.data.transforms import Augment2D, Augment3D
from label_efficient.losses import ce_dice, supervised_loss
from label_efficient.recipe import RecipeError, parse_recipe
from label_efficient.strategies import build_strategy
from label_efficient.backbones import build_backbone

from conftest import tiny_recipe, tiny_recipe_3d


def _logits_label(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), torch.randint(0, 3, (2, 8, 8), generator=g)


def test_full_label_mask_equals_the_dense_loss():
    logits, label = _logits_label()
    dense = supervised_loss(ce_dice(), logits, label)
    masked = supervised_loss(ce_dice(), logits, label, torch.ones(2, 8, 8))
    assert masked.item() == pytest.approx(dense.item(), rel=1e-5)


def test_unmarked_voxels_get_exactly_zero_gradient():
    logits, label = _logits_label()
    mask = torch.zeros(2, 8, 8)
    mask[:, 3] = 1  # one annotated row per image
    supervised_loss(ce_dice(), logits, label, mask).backward()
    grad = logits.grad.abs().sum(1)
    assert (grad[mask == 0] == 0).all() and (grad[mask > 0] > 0).all()


def test_a_mask_marking_nothing_gives_zero_loss_not_nan():
    logits, label = _logits_label()
    loss = supervised_loss(ce_dice(), logits, label, torch.zeros(2, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0 and logits.grad.abs().sum() == 0


def test_supervised_refuses_nothing_and_bcp_refuses_sparse_batches():
    net = build_backbone("unet", 2, 1, 3, channels=[4, 8])
    batch = {"labeled": {"image": torch.rand(2, 1, 16, 16), "label": torch.zeros(2, 16, 16).long(),
                         "label_mask": torch.ones(2, 16, 16)}, "unlabeled": {"image": torch.rand(2, 1, 16, 16)}}
    assert torch.isfinite(build_strategy("supervised", net, 3).training_step(batch, 0).loss)
    with pytest.raises(ValueError, match="does not take sparse labels"):
        build_strategy("bcp", net, 3).training_step(batch, 0)


@pytest.mark.parametrize("augment", [Augment2D(), Augment3D((8, 8, 8))])
def test_maps_follow_the_label_through_augmentation(augment):
    rng = np.random.default_rng(0)
    shape = (12, 12) if isinstance(augment, Augment2D) else (12, 12, 12)
    label = rng.integers(0, 3, shape)
    image = rng.random((1, *shape)).astype(np.float32)
    moved = 0
    for seed in range(6):
        img, lab, maps = augment(image, label, seed, {"copy": label.astype(np.float32), "mask": np.ones(shape, np.float32)})
        assert np.array_equal(maps["copy"], lab) and maps["mask"].shape == lab.shape
        moved += not np.array_equal(lab, label[tuple(slice(0, s) for s in lab.shape)])
    assert moved > 0  # the augmentation did something


def test_recipe_checks_optimizer_names_and_sparse_support(tmp_path):
    raw = tiny_recipe_3d(tmp_path, strategy="desco", optimizers={"net3": {"lr": 0.1}})
    with pytest.raises(RecipeError, match="no optimizer 'net3'. Did you mean 'net"):
        parse_recipe(raw)
    raw["stages"][0]["optimizers"] = {"net2": {"schedule": "constant", "lr": 0.5}}
    opts = parse_recipe(raw).stage_optimizers(0)
    assert opts["net2"].lr == 0.5 and opts["net1"].lr == 0.01 and opts["net1"].schedule == "constant"
    raw["stages"][0]["optimizers"] = {"net2": {"lr": "fast"}}
    with pytest.raises(RecipeError, match="optimizers.net2"):
        parse_recipe(raw)
    sparse = tiny_recipe(tmp_path, strategy="bcp")
    sparse["data"]["annotation"] = {"kind": "slices", "axes": [0]}
    with pytest.raises(RecipeError, match="does not take sparse labels"):
        parse_recipe(sparse)
    sparse["data"]["annotation"] = {"kind": "slice"}
    with pytest.raises(RecipeError, match="annotation.kind"):
        parse_recipe(sparse)


def test_a_strategy_must_bind_its_optimizers_before_stepping():
    s = build_strategy("desco", build_backbone("unet", 3, 1, 2, channels=[4, 8]), 2)
    with pytest.raises(RuntimeError, match="not bound"):
        s.optimizer_step("net1", torch.tensor(1.0, requires_grad=True))
    with pytest.raises(KeyError, match="missing \\['net2'\\]"):
        s.bind_optimizers({"net1": torch.optim.SGD(s.model.parameters(), lr=0.1)})
