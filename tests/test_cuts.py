"""CUTS: SSIM-checked positives near their anchors, NT-Xent pairing, reconstruction targets, diffusion condensation
that recovers separated clusters, label-free and oracle choices, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from label_efficient.backbones import build_backbone
from label_efficient.strategies import build_strategy
from label_efficient.strategies.cuts import (centre_cluster, nt_xent, oracle_cluster, patch_ssim, patches_at,
                                             sample_pairs)
from label_efficient.transforms.condensation import diffusion_condensation, persistent_label, silhouette


def test_positives_are_near_similar_and_never_the_anchor():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    x[:, :, :, 16:] = 0.8  # a flat right half: every candidate there is similar
    a, p = sample_pairs(x, anchors=8, patch=5)
    assert a.shape == p.shape == (3, 8, 2)
    assert ((p - a).abs() <= 5).all() and (p != a).any(-1).all()
    assert (a >= 2).all() and (a <= 29).all() and (p >= 2).all() and (p <= 29).all()
    flat = a[..., 1] >= 19  # anchors whose whole search window lies in the flat half
    ssim = patch_ssim(patches_at(x, a, 5), patches_at(x, p, 5))
    assert (ssim[flat] > 0.5).all()


def test_patches_at_reads_the_centred_window():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float).reshape(2, 3, 10, 10)
    yx = torch.tensor([[[4, 6]], [[2, 2]]])
    got = patches_at(x, yx, 3)
    assert torch.equal(got[0, 0], x[0, :, 3:6, 5:8]) and torch.equal(got[1, 0], x[1, :, 1:4, 1:4])


def test_nt_xent_pairs_each_anchor_with_its_own_positive():
    torch.manual_seed(0)
    za = torch.randn(2, 8, 16)
    assert nt_xent(za, za + 0.01 * torch.randn_like(za), 0.1) < 0.01
    assert nt_xent(za, za[:, torch.roll(torch.arange(8), 1)], 0.1) > 1.0


def test_cuts_step_trains_embedder_and_reconstruction_without_labels():
    torch.manual_seed(0)
    net = build_backbone("cuts_cnn", 2, 3, 2, features=(8, 16))
    s = build_strategy("cuts", net, 2)
    assert s.requires.label_free and "labeled" not in s.requires.streams
    x = torch.rand(2, 3, 24, 24)
    opt = torch.optim.AdamW(s.trainable_parameters(), 1e-2)
    s.setup(8)
    s.train()
    losses = []
    for i in range(8):
        out = s.training_step({"unlabeled": {"image": x}}, i)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.logs["loss_recon"]))
    assert losses[-1] < losses[0]
    assert s.recon[0].in_features == 16 and s.recon[-1].out_features == 3 * 25


def test_too_small_images_and_downsampling_backbones_are_refused():
    s = build_strategy("cuts", build_backbone("cuts_cnn", 2, 1, 2, features=(4,)), 2)
    with pytest.raises(ValueError, match="larger than its 5×5 patches"):
        s.training_step({"unlabeled": {"image": torch.rand(2, 1, 6, 6)}}, 0)
    with pytest.raises(ValueError, match="patch must be odd"):
        build_strategy("cuts", build_backbone("cuts_cnn", 2, 1, 2, features=(4,)), 2, {"patch": 4})


def test_condensation_recovers_separated_clusters_and_silhouette_picks_them():
    torch.manual_seed(0)
    centres = 4 * torch.eye(8)[:3]
    truth = np.repeat([0, 1, 2], [150, 150, 100])
    x = centres[truth] + torch.randn(len(truth), 8)
    levels = diffusion_condensation(x)
    counts = [len(np.unique(lab)) for lab in levels]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1
    three = levels[counts.index(3)]
    purity = sum(np.bincount(three[truth == c]).max() for c in range(3)) / len(truth)
    assert purity > 0.97
    best = max((silhouette(x, lab), len(np.unique(lab))) for lab in levels if 2 <= len(np.unique(lab)) <= 10)
    assert best[1] == 3


def test_persistent_label_keeps_persistent_large_clusters_and_paints_the_finer_on_top():
    # 10×10 image, fine → coarse: {bg, ring, square, speck, dot} → {bg, ring ∪ square ∪ speck, dot} → {everything}
    fine = np.zeros((10, 10), int)
    fine[2:8, 2:8] = 4  # a ring (20 %) around
    fine[3:7, 3:7] = 1  # a square (16 %)
    fine[8, 8] = 2  # a one-pixel speck, one level only
    fine[0, 9] = 3  # a dot present in two levels but covering 1 % < min_area
    mid = np.where(np.isin(fine, (1, 2, 4)), 1, fine)  # ring, square and speck merge; the ring holds the first pixel
    out = persistent_label([fine, mid, np.zeros_like(fine)], min_area=0.02, min_levels=2)
    # background survives every level (painted first, at 100 %); the ring identity at its largest extent (37 px) on
    # top; the square lived one level only (it lost its identity in the merge): dropped
    assert set(np.unique(out)) == {0, 1}
    assert (out == 1).sum() == 37 and out[8, 8] == 1 and out[0, 9] == 0
    # without the merge the square persists too and is painted over the larger ring
    out = persistent_label([fine, fine, np.zeros_like(fine)], min_area=0.1, min_levels=2)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out == 2).sum() == 16 and (out[3:7, 3:7] == 2).all() and (out == 1).sum() == 20


def test_segment_finds_a_bright_centred_square_label_free():
    torch.manual_seed(0)
    net = build_backbone("cuts_cnn", 2, 1, 2, features=(8, 16))
    s = build_strategy("cuts", net, 2, {"condense_size": 16}).eval()
    x = torch.full((1, 32, 32), 0.1) + 0.02 * torch.rand(1, 32, 32)
    x[:, 10:22, 10:22] = 0.9
    levels, chosen = s.segment(x)
    assert all(lab.shape == (32, 32) for lab in levels)
    truth = np.zeros((32, 32), int)
    truth[10:22, 10:22] = 1
    fg = centre_cluster(levels[chosen])
    dice = 2 * (fg & (truth > 0)).sum() / (fg.sum() + truth.sum())
    assert dice > 0.8
    assert (oracle_cluster(levels[chosen], truth) == fg).all()


def test_cosine_schedule_with_linear_warmup():
    from label_efficient.lightning import build_optimizer
    from label_efficient.recipe import OptimizerConfig

    opt, sched = build_optimizer([torch.nn.Parameter(torch.zeros(1))],
                                 OptimizerConfig(name="adamw", lr=1.0, schedule="cosine", warmup_steps=10), 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == sorted(lrs[:10]) and lrs[0] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.5) and lrs[-1] < 1e-3


def test_cuts_runs_from_a_recipe_as_a_label_free_stage(image_folder, tmp_path):
    from conftest import tiny_recipe

    from label_efficient.recipe import parse_recipe
    from label_efficient.runner import load_bundle, run_recipe

    raw = tiny_recipe(image_folder, strategy="cuts", steps=4, val_every=2, batch_size={"unlabeled": 2})
    raw["backbone"] = {"name": "cuts_cnn", "kwargs": {"features": [4, 8]}}
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    assert m["evaluated"] is False and m["mean_dice"] is None
    net, blob = load_bundle(tmp_path / "run" / "model.pt")
    assert blob["parts"] is None
    levels, chosen = build_strategy("cuts", net, 3).eval().segment(torch.rand(1, 32, 32))
    assert len(levels) >= 2 and 0 <= chosen < len(levels)


def test_val_loss_selection_keeps_the_lowest_val_loss_and_reads_no_mask(image_folder, tmp_path, monkeypatch):
    import json

    from conftest import tiny_recipe

    import label_efficient.data.store as store_mod
    from label_efficient.recipe import RecipeError, parse_recipe
    from label_efficient.runner import run_recipe

    reads, real_read = [], store_mod.read_mask_2d
    monkeypatch.setattr(store_mod, "read_mask_2d", lambda path: reads.append(str(path)) or real_read(path))
    raw = tiny_recipe(image_folder, strategy="cuts", steps=6, val_every=2, batch_size={"unlabeled": 2}, select="val_loss")
    raw["backbone"] = {"name": "cuts_cnn", "kwargs": {"features": [4, 8]}}
    run_recipe(parse_recipe(raw), tmp_path / "run")
    assert reads == []  # neither train nor val masks
    sdir = tmp_path / "run" / "stage0_cuts"
    done = json.loads((sdir / "done.json").read_text())
    lines = (sdir / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("val/loss")
    logged = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    assert len(logged) == 3 and done["select"] == "val_loss" and done["best"] == "best.ckpt"
    assert done["best_score"] == pytest.approx(min(logged), abs=1e-6)
    # the same weights score the same at every validation (the sampled anchors are fixed), and training's random
    # stream is left as it was
    from types import SimpleNamespace

    from label_efficient.lightning import StrategyModule

    s = build_strategy("cuts", build_backbone("cuts_cnn", 2, 1, 3, features=[4, 8]), 3)
    module = StrategyModule(s, parse_recipe(raw).stages[0].optimizer, 6, val_loss=True)
    vols = [SimpleNamespace(image=torch.rand(3, 1, 32, 32)) for _ in range(2)]
    torch.manual_seed(0)
    first, state = module.score(vols), torch.get_rng_state()
    assert first == module.score(vols) and set(first) == {"val/loss"}
    torch.manual_seed(0)
    assert torch.equal(state, torch.get_rng_state())
    raw["stages"][0] = {**raw["stages"][0], "strategy": "supervised", "batch_size": {"labeled": 2}}
    with pytest.raises(RecipeError, match="'supervised' defines no validation loss; strategies that do: \\['cuts'\\]"):
        parse_recipe(raw)


def _official_persistent(labels: np.ndarray) -> np.ndarray:
    """The rule of the official ``get_persistent_structures`` (CUTS diffusion_condensation.py), re-written from
    reading it, as a reference: ``labels`` (B, H, W) = the hierarchy *after* the official ``levels[1:]``. Identity =
    label value; per value over frames 0…B−2: levels present and the first frame of largest area; drop area < 1 % or
    < 2 levels; paint by (−area, −persistence), stably. One change for comparison: pixels left unpainted get the
    first-painted value (the official's zero-initialised map joins them to label value 0)."""
    b, h, w = labels.shape
    kept = []
    for value in np.unique(labels):
        present, best, best_area = 0, None, 0
        for frame in range(b - 1):
            area = int((labels[frame] == value).sum())
            if area > 0:
                present += 1
                if best is None or area > best_area:
                    best, best_area = frame, area
        if best is None or best_area < 1e-2 * h * w or present < 2:
            continue
        kept.append((present, best_area, value, best))
    kept.sort(key=lambda t: (-t[1], -t[0]))
    out = np.full((h, w), -1)
    for _, _, value, frame in kept:
        out[labels[frame] == value] = value
    return np.where(out < 0, kept[0][2], out) if kept else np.zeros((h, w), int)


def _by_first_pixel(lab: np.ndarray) -> np.ndarray:
    """Relabel a partition so each cluster's value is the flat index of its first pixel: then the official identity
    (label value, kept through merges by the representative) and ours (the first pixel) coincide."""
    flat = lab.ravel()
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    return first[inverse].reshape(lab.shape)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_persistent_label_matches_the_official_rule_without_the_all_distinct_level():
    # 10×10, fine → coarse: {bg, ring, square, speck} → {bg, ring ∪ square ∪ speck} → {everything}; msphate's
    # hierarchy also starts with the all-distinct level, which the official code drops (levels[1:])
    fine = np.zeros((10, 10), int)
    fine[2:8, 2:8] = 1  # a ring (20 %), first pixel (2, 2)
    fine[3:7, 3:7] = 2  # a square (16 %) that lives one level
    fine[8, 8] = 3  # a one-pixel speck (1 %), one level
    mid = np.where(fine > 0, 1, 0)
    full = np.stack([_by_first_pixel(lab) for lab in (np.arange(100).reshape(10, 10), fine, mid, np.zeros_like(fine))])
    ref = _official_persistent(full[1:])
    ours = persistent_label(list(full[1:]))
    assert len(np.unique(ref)) == 2 and _same_partition(ours, ref)  # background and the ring at its 37-px extent
    assert (ours == ours[2, 2]).sum() == 37
    # fed the all-distinct level too (what diffusion_condensation used to return), every identity gains a level:
    # the one-level square and speck would be kept, 4 clusters instead of the official 2
    assert len(np.unique(persistent_label(list(full)))) == 4
    # random hierarchies (random merges of a random fine partition): the same maps as the official rule
    rng = np.random.default_rng(0)
    for _ in range(20):
        lab = rng.integers(0, 12, (12, 12))
        chain = [lab]
        while len(np.unique(chain[-1])) > 1:
            ids = np.unique(chain[-1])
            pick = rng.choice(ids, size=min(len(ids), int(rng.integers(2, 4))), replace=False)
            chain.append(np.where(np.isin(chain[-1], pick), pick[0], chain[-1]))
        chain = np.stack([_by_first_pixel(c) for c in chain])
        assert _same_partition(persistent_label(list(chain)), _official_persistent(chain))


def test_condensation_returns_no_all_distinct_level():
    torch.manual_seed(0)
    x = torch.randn(60, 4)
    levels = diffusion_condensation(x)
    assert len(np.unique(levels[0])) < 60 and len(np.unique(levels[-1])) == 1
    # exact duplicates fuse before any diffusion: that partition is a real level (not all-distinct), kept
    dup = diffusion_condensation(torch.cat([x[:10], x[:10]]))
    assert len(np.unique(dup[0])) == 10 and (dup[0][:10] == dup[0][10:]).all()
    assert [len(np.unique(lab)) for lab in diffusion_condensation(torch.ones(1, 3))] == [1]


def _skimage_ssim_one_window(a: np.ndarray, b: np.ndarray) -> float:
    """The official ``range_aware_ssim`` on one 5×5 grayscale patch pair, from skimage's ``structural_similarity``
    rule: win_size 5 (the patch is < 7 px) so a single uniform window (the only valid centre), sample covariance
    (÷ (N − 1)), K1 0.01, K2 0.03, data range = the first (anchor) patch's max − min, 1 where that is 0."""
    r = float(a.max() - a.min()) or 1.0
    c1, c2, n = (0.01 * r) ** 2, (0.03 * r) ** 2, a.size
    ma, mb = a.mean(), b.mean()
    va, vb = a.var() * n / (n - 1), b.var() * n / (n - 1)
    cov = ((a - ma) * (b - mb)).sum() / (n - 1)
    return (2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def test_patch_ssim_uses_the_anchor_patch_range_as_the_official_code():
    rng = np.random.default_rng(0)
    # low-contrast patches (range 0.2 of the [-1, 1] scale): the range-aware constants matter
    a = 0.3 + 0.2 * rng.random((4, 1, 5, 5))
    b = a + 0.08 * rng.standard_normal(a.shape)
    ref = np.array([_skimage_ssim_one_window(a[i, 0], b[i, 0]) for i in range(4)])
    got = patch_ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    flat = torch.full((1, 1, 5, 5), 0.4)  # a flat anchor: range 1
    np.testing.assert_allclose(patch_ssim(flat, flat + 0.1).numpy(),
                               [_skimage_ssim_one_window(flat[0, 0].numpy(), flat[0, 0].numpy() + 0.1)], rtol=1e-6)
    # not symmetric: the range is the first (anchor) patch's
    assert not torch.allclose(patch_ssim(torch.from_numpy(a), torch.from_numpy(b)),
                              patch_ssim(torch.from_numpy(b), torch.from_numpy(a)))
