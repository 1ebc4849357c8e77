"""CycleGAN pseudo labels (Wang et al. TMI 2021): G/D alternation, LSGAN/VAE/DGCC pieces, noise-weighted Dice,
pseudo-label cleaning, the auxiliary-mask stream and its refusals, a recipe run and a plain loop."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_recipe, write_image_folder
from label_efficient.backbones import build_backbone
from label_efficient.data import CaseStore, DataError, StepBatches, Stream, build_dataset
from label_efficient.data.aux_masks import ShapeMasks, build_aux_masks, ellipse_masks
from label_efficient.data.loaders import MaskStream
from label_efficient.recipe import RecipeError, parse_recipe
from label_efficient.runner import run_recipe
from label_efficient.strategies import STRATEGIES, LabelLeakError
from label_efficient.strategies.cyclegan_pl import (clean_labels, label_weights, lsgan_d, lsgan_g,
                                                    noise_weighted_dice)

SMALL = {"gan_steps": 2, "generator_features": [8, 8, 8, 16, 16, 8], "discriminator_width": 8, "latent": 16,
         "pool_size": 2, "rounds": 2}


def strategy(**cfg):
    torch.manual_seed(0)
    model = build_backbone("unet", 2, 1, 2, channels=[8, 16, 32])
    s = STRATEGIES.get("cyclegan_pseudo_labels")(model, 2, {**SMALL, **cfg})
    s.setup(6)
    s.bind_optimizers({n: torch.optim.Adam(p, lr=1e-3) for n, p in s.trainable_parameters().items()})
    return s


def batch(seed=0, n=2, size=32):
    g = torch.Generator().manual_seed(seed)
    masks = torch.from_numpy(np.stack(ellipse_masks(ShapeMasks(kind="shapes", count=n), (size, size), seed)))
    return {"unlabeled": {"image": torch.rand(n, 1, size, size, generator=g)}, "aux_masks": {"label": masks}}


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(module, before):
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before))


def test_lsgan_values():
    one, zero, half = torch.ones(4), torch.zeros(4), torch.full((4,), 0.5)
    assert float(lsgan_d(one, zero)) == 0 and float(lsgan_d(zero, one)) == 2
    assert float(lsgan_d(half, half)) == pytest.approx(0.5)
    assert float(lsgan_g(one)) == 0 and float(lsgan_g(zero)) == 1 and float(lsgan_g(half)) == pytest.approx(0.25)


def test_stage_a_steps_generators_then_discriminators_and_stage_b_only_the_segmenter():
    s = strategy()
    nets = {"g_s": s.g_s, "g_i": s.g_i, "d_x": s.d_x, "d_m": s.d_m, "model": s.model}
    before, dgcc = {k: snapshot(v) for k, v in nets.items()}, snapshot(s.g_s.dgcc)
    out = s.training_step(batch(), 0)
    assert torch.isfinite(out.loss) and out.logs["round"] == 0
    assert {k for k, v in nets.items() if changed(v, before[k])} == {"g_s", "g_i", "d_x", "d_m"}
    assert changed(s.g_s.dgcc, dgcc)  # the DGCC MLP is a generator part
    assert len(s._optimizers["segmenter"].state) == 0  # idle steps leave no optimizer state
    assert len(s.pool_x.items) == 2 and len(s.pool_m.items) == 2
    s.training_step(batch(1), 1)
    before = {k: snapshot(v) for k, v in nets.items()}
    out = s.training_step(batch(2), 2)  # first Stage B step (round 1, labels from G_s)
    assert out.logs["round"] == 1 and out.logs["label_round"] == 0 and 0 <= out.logs["fg_fraction"] <= 1
    assert {k for k, v in nets.items() if changed(v, before[k])} == {"model"}
    for step in (3, 4):
        out = s.training_step(batch(step), step)
    assert out.logs["round"] == 2 and out.logs["label_round"] == 1  # round 2 relabels from the frozen S_1
    assert not all(torch.equal(a, b) for a, b in zip(s.teacher.parameters(), s.model.parameters()))  # S moved on
    fresh = strategy()
    fresh.load_state_dict(s.state_dict())  # pools and round buffers resume from the state dict
    assert all(torch.equal(a, b) for a, b in zip(fresh.pool_m.items, s.pool_m.items)) and int(fresh.round) == 2


def test_discriminator_losses_use_detached_fakes():
    s = strategy(pool_size=0)
    b = batch()
    x = b["unlabeled"]["image"]
    m = F.one_hot(b["aux_masks"]["label"], 2).movedim(-1, 1).float()
    g, x_fake, m_fake = s.generator_losses(x, m)
    d = s.discriminator_losses(x, m, x_fake, m_fake)
    sum(d.values()).backward()
    assert all(p.grad is None for p in [*s.g_s.parameters(), *s.g_i.parameters()])
    assert all(p.grad is not None for p in s.d_x.parameters())
    (g["adv"] + g["cyc"]).backward()
    assert all(p.grad is not None for p in s.g_i.parameters())


def test_vae_discriminator_kl_is_zero_at_the_prior_and_reconstruction_learns():
    s = strategy()
    m = F.one_hot(batch(n=4)["aux_masks"]["label"], 2).movedim(-1, 1).float()
    last = s.d_m.encoder[-1]
    with torch.no_grad():
        last.weight.zero_(), last.bias.zero_()  # μ = 0, log σ² = 0: q(z|m) = N(0, I)
    rec, kl = s.d_m.vae_loss(m, 1.0)
    assert float(kl) == pytest.approx(0.0, abs=1e-7) and 0 < float(rec) <= 1
    torch.manual_seed(0)
    opt = torch.optim.Adam(s.d_m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        rec, kl = s.d_m.vae_loss(m, 1.0)
        first = float(rec) if first is None else first
        opt.zero_grad()
        (rec + kl).backward()
        opt.step()
    assert float(kl) > 0 and float(rec) < 0.6 * first


def test_dgcc_recalibrates_the_generator_output():
    s = strategy()
    x = batch()["unlabeled"]["image"]
    first, second = s.g_s(x, s.d_m)
    assert not torch.allclose(first, second)
    with torch.no_grad():
        s.g_s.dgcc[-1].bias.add_(3.0)
    first2, second2 = s.g_s(x, s.d_m)
    assert torch.equal(first, first2) and not torch.allclose(second, second2)
    plain = strategy(dgcc=False)
    a, b = plain.g_s(x, plain.d_m)
    assert plain.g_s.dgcc is None and torch.equal(a, b)


def test_noise_weights_lower_the_loss_share_of_disagreeing_pixels():
    torch.manual_seed(0)
    y = torch.zeros(1, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12] = 1
    onehot = F.one_hot(y, 2).movedim(-1, 1).float()
    ref = onehot.clone()
    bad = torch.zeros(1, 16, 16, dtype=torch.bool)
    bad[:, 4:12, 4:6] = True  # the reference disagrees with the pseudo label here
    ref[:, 1][bad], ref[:, 0][bad] = 0.1, 0.9
    w = label_weights(ref, onehot)
    assert w.min() >= 0 and w.max() <= 1 and torch.allclose(w[:, 1][bad], torch.tensor(0.1))
    assert torch.equal(w[:, 1][~bad], torch.ones_like(w[:, 1][~bad]))

    def share(weight):
        p = torch.rand(1, 2, 16, 16).softmax(1).requires_grad_(True)
        noise_weighted_dice(p, onehot, weight).backward()
        g = p.grad[:, 1].abs()
        return float(g[bad].sum() / g.sum())

    assert share(w) < 0.5 * share(torch.ones_like(w))
    p = torch.rand(1, 2, 16, 16).softmax(1)  # w = 1: the generic Dice formula
    plain = 1 - (2 * (p[:, 1] * onehot[:, 1]).sum() + 1e-5) / ((p[:, 1] + onehot[:, 1]).sum() + 1e-5)
    assert float(noise_weighted_dice(p, onehot, torch.ones_like(p))) == pytest.approx(float(plain), rel=1e-6)


def test_pseudo_labels_keep_the_largest_component_and_fill_holes():
    lab = torch.zeros(1, 20, 20, dtype=torch.long)
    lab[0, 2:12, 2:12] = 1
    lab[0, 6:8, 6:8] = 0  # a hole
    lab[0, 15:18, 15:18] = 1  # a small second blob
    out = clean_labels(lab, 2)
    want = torch.zeros_like(lab)
    want[0, 2:12, 2:12] = 1
    assert torch.equal(out, want)
    assert torch.equal(clean_labels(lab, 2, largest=False, holes=False), lab)


def test_aux_mask_stream_never_carries_images(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2)
    spec = build_dataset("image_folder", root, num_classes=2, split_csv="split.csv")
    masks = build_aux_masks(ShapeMasks(kind="shapes", count=7), spec, (32, 32), seed=3)
    assert len(masks) == 7 and all(m.shape == (32, 32) and set(np.unique(m)) <= {0, 1} for m in masks)
    assert all(np.array_equal(a, b) for a, b in zip(masks, build_aux_masks(ShapeMasks(kind="shapes", count=7),
                                                                            spec, (32, 32), seed=3)))
    sb = StepBatches(CaseStore(spec, (32, 32)), {"unlabeled": Stream(spec.select("train"), 2, False),
                                                 "aux_masks": MaskStream(masks, 3)}, 4, seed=1)
    b = sb[(0, 0)]
    assert list(b) == ["unlabeled", "aux_masks"] and set(b["aux_masks"]) == {"label"}
    assert b["aux_masks"]["label"].shape == (3, 32, 32) and b["aux_masks"]["label"].dtype == torch.long
    s = strategy()
    with pytest.raises(LabelLeakError, match="aux"):
        s.check_batch({**b, "aux_masks": {**b["aux_masks"], "image": b["unlabeled"]["image"]}})
    with pytest.raises(KeyError, match="aux_masks"):
        s.check_batch({"unlabeled": b["unlabeled"]})


def test_aux_masks_with_another_class_count_are_refused(tmp_path):
    two = build_dataset("image_folder", write_image_folder(tmp_path / "two", classes=2), num_classes=2,
                        split_csv="split.csv")
    write_image_folder(tmp_path / "three", classes=3)
    from label_efficient.data.aux_masks import DatasetMasks

    other = DatasetMasks(kind="dataset", dataset="image_folder", root=str(tmp_path / "three"),
                         options={"num_classes": 3, "split_csv": "split.csv"})
    with pytest.raises(DataError, match="3 classes.*2 classes"):
        build_aux_masks(other, two, (32, 32), 0)
    three = build_dataset("image_folder", tmp_path / "three", num_classes=3, split_csv="split.csv")
    with pytest.raises(DataError, match="binary masks.*3 classes"):
        build_aux_masks(ShapeMasks(kind="shapes", count=2), three, (32, 32), 0)
    assert len(build_aux_masks(other, three, (32, 32), 0)) == 10  # same class count: its 10 train masks


def cyclegan_recipe(root, **cfg):
    raw = tiny_recipe(root, strategy="cyclegan_pseudo_labels", steps=10, val_every=5,
                      config={**SMALL, "gan_steps": 6, **cfg}, optimizers={"segmenter": {"lr": 0.003}})
    raw["data"]["options"]["num_classes"] = 2
    raw["data"]["budget"] = {"all": True}
    raw["data"]["aux_masks"] = {"kind": "shapes", "count": 20, "semi_axis": [0.17, 0.33]}
    return raw


def test_recipes_refuse_aux_masks_where_they_do_not_belong(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2)
    raw = cyclegan_recipe(root)
    parse_recipe(raw)
    no_masks = {**raw, "data": {k: v for k, v in raw["data"].items() if k != "aux_masks"}}
    with pytest.raises(RecipeError, match="set data.aux_masks"):
        parse_recipe(no_masks)
    sup = tiny_recipe(root)
    sup["data"]["aux_masks"] = {"kind": "shapes"}
    with pytest.raises(RecipeError, match="does not use auxiliary masks"):
        parse_recipe(sup)
    with pytest.raises(RecipeError, match="semi_axis"):
        parse_recipe({**raw, "data": {**raw["data"], "aux_masks": {"kind": "shapes", "semi_axis": [0.5, 0.1]}}})


def test_recipe_runs_end_to_end_without_training_labels(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=2)
    m = run_recipe(parse_recipe(cyclegan_recipe(root)), tmp_path / "out")
    assert "evaluated" not in m and 0 <= m["mean_dice"] <= 1 and "hd95" in m["per_class"]
    rows = list(csv.DictReader(open(next((tmp_path / "out").glob("stage0_*/metrics.csv")))))
    rounds = {float(r["train/round"]) for r in rows if r.get("train/round")}
    assert rounds == {0.0, 1.0, 2.0}
    assert any(r.get("train/fg_fraction") for r in rows)
    done = json.loads(next((tmp_path / "out").glob("stage0_*/done.json")).read_text())
    assert done["best_score"] is None and done["steps"] == 10  # label-free stage: no validation


def test_plain_loop_with_bind_optimizers():
    torch.manual_seed(0)
    model = build_backbone("unet", 2, 1, 2, channels=[8, 16, 32])
    s = STRATEGIES.get("cyclegan_pseudo_labels")(model, 2, {**SMALL, "rounds": 1, "weighting": "none"})
    s.setup(4)
    s.bind_optimizers({n: torch.optim.SGD(p, lr=0.01) for n, p in s.trainable_parameters().items()})
    logs = [s.training_step(batch(k), k).logs for k in range(4)]
    assert [l["round"] for l in logs] == [0, 0, 1, 1] and logs[-1]["mean_weight"] == 1.0
    s.eval()
    assert s.predict(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="gan_steps"):
        s.setup(2)
