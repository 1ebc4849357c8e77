"""SDC-UDA: slice attention continuity, pseudo-label refinement, GAN alternation, slabs, simulated shift, recipe runs
and that no target label is read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import requires_shared, write_image_folder
from label_efficient.data import CaseStore, StepBatches, Stream, build_dataset, train_loader
from label_efficient.data.datasets import Case
from label_efficient.data.shift import SOURCE, TARGET
from label_efficient.data.synthetic import generate_pairs, load_pairs
from label_efficient.backbones import build_backbone
from label_efficient.recipe import RecipeError, parse_recipe
from label_efficient.strategies import build_strategy
from label_efficient.networks.slice_transformer import SliceAttention, SliceGenerator
from label_efficient.strategies.sdc_uda import refine_pseudo_labels


# -- attention ----------------------------------------------------------------------------------------
def test_attention_keeps_shape_and_only_inter_slice_attention_links_neighbouring_slices():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 8)  # 3 slices, 4×4 positions, 8 channels
    for inter, linked in ((True, True), (False, False)):
        attn = SliceAttention(8, heads=2, reduction=2, inter_slice=inter).eval()
        y = attn(x, 4, 4)
        assert y.shape == x.shape
        x2 = x.clone()
        x2[1] += torch.randn(16, 8)  # perturb slice k = 1
        y2 = attn(x2, 4, 4)
        for k in (0, 2):  # slices k ± 1
            assert (not torch.allclose(y[k], y2[k], atol=1e-6)) == linked
        assert not torch.allclose(y[1], y2[1])


def test_generator_slice_continuity_comes_from_inter_slice_attention():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    x2 = x.clone()
    x2[0] = torch.randn(1, 16, 16)
    for inter in (True, False):
        g = SliceGenerator(1, width=4, dim=8, blocks=1, heads=2, inter_slice=inter).eval()
        out, out2 = g(x), g(x2)
        assert out.shape == x.shape and out.abs().max() <= 1
        assert (not torch.allclose(out[1], out2[1], atol=1e-6)) == inter  # slice 0 → slice 1 only through attention
        assert not torch.allclose(out[0], out2[0])


#: sum of the parameter sizes of the official ``Generator_shallow(1, 1, args)`` (hyeongyu-kim/SDC-UDA@61926e8,
#: models/SDC_UDA.py: width 32, dims 128, 4 layers, 8 heads, ff ×4, reduction 2), counted with its own code
OFFICIAL_GENERATOR_PARAMETERS = 2_931_361


def test_generator_has_the_official_layers_and_a_full_resolution_skip():
    g = SliceGenerator(1, width=32, dim=128, blocks=4, heads=8, mlp_ratio=4, reduction=2)
    assert sum(p.numel() for p in g.parameters()) == OFFICIAL_GENERATOR_PARAMETERS
    attentions = [m for m in g.modules() if isinstance(m, SliceAttention)]
    assert len(attentions) == 4
    assert all(p.bias is None for a in attentions for p in (a.q_intra, a.kv_intra, a.qkv_inter, a.proj))
    small, seen = SliceGenerator(1, width=4, dim=8, blocks=1, heads=2), {}
    small.fuse.register_forward_hook(lambda m, inp, out: seen.update(fuse=inp[0].shape))
    small(torch.randn(3, 1, 16, 20))
    assert seen["fuse"] == (3, 8, 16, 20)  # up-sampled features + the stem output, at the input's own size


def test_intra_slice_attention_sees_other_positions_of_its_slice():
    torch.manual_seed(0)
    attn = SliceAttention(8, heads=2, reduction=2, inter_slice=False).eval()
    x = torch.randn(3, 16, 8)
    x2 = x.clone()
    x2[0, 0] += 5.0  # one position of slice 0
    y, y2 = attn(x, 4, 4), attn(x2, 4, 4)
    assert not torch.allclose(y[0, 15], y2[0, 15])  # the far corner of the same slice sees it
    assert torch.allclose(y[1:], y2[1:])


# -- refinement on synthetic blobs --------------------------------------------------------------------
def _blob_case():
    """A 2-class 12×12 image: a confident disc (class 1, intensity 0.8); an uncertain ring around it whose left half
    has the disc's intensity and right half 0.1; an uncertain in-range patch far from the disc; uncertain disc-labelled
    voxels at intensity 0.1."""
    yy, xx = np.mgrid[:12, :12]
    d = np.hypot(yy - 6, xx - 6)
    intensity = torch.full((1, 12, 12), 0.1)
    p_fg = torch.full((1, 12, 12), 0.02)  # confident background
    disc, ring = torch.from_numpy(d < 3), torch.from_numpy((d >= 3) & (d < 4))
    intensity[0][disc] = torch.linspace(0.75, 0.85, int(disc.sum()))
    p_fg[0][disc] = 0.98
    p_fg[0][ring] = 0.45  # uncertain, predicted background
    left = torch.from_numpy(xx < 6)
    intensity[0][ring & left] = 0.8
    p_fg[0, 0, 0] = 0.45  # uncertain, far away, in range
    intensity[0, 0, 0] = 0.8
    wrong = torch.zeros(12, 12, dtype=torch.bool)
    wrong[6, 4] = wrong[6, 8] = True  # inside the disc: uncertain class-1 voxels at background intensity
    p_fg[0][wrong], intensity[0][wrong] = 0.55, 0.1
    probs = torch.stack([1 - p_fg, p_fg], 1)
    return intensity, probs, disc, ring, left, wrong


def test_uncertainty_filter_keeps_only_confident_voxels():
    intensity, probs, *_ = _blob_case()
    label, weight = refine_pseudo_labels(intensity, probs, threshold=0.5, sensitivity=False, specificity=False)
    entropy = -(probs * probs.log()).sum(1) / np.log(2)
    assert torch.equal(weight.bool(), entropy <= 0.5)
    assert torch.equal(label, probs.argmax(1))
    assert 0 < weight.mean() < 1


def test_sensitivity_adds_uncertain_in_range_voxels_touching_the_structure():
    intensity, probs, disc, ring, left, wrong = _blob_case()
    label, weight = refine_pseudo_labels(intensity, probs, threshold=0.5, quantiles=(0.0, 1.0), specificity=False)
    touching = ring & torch.from_numpy(np.hypot(*np.mgrid[:12, :12] - 6) < 3.9)  # ring voxels 8-adjacent to the disc
    added = (label[0] == 1) & ~disc
    assert added.any() and not (added & ~left).any()  # only the in-range (left) side is added
    assert not (added & ~ring).any() and label[0, 0, 0] == 0 and weight[0, 0, 0] == 0  # far voxel left uncertain
    assert weight[0][added].eq(1).all()
    assert (label[0][wrong] == 1).all()  # specificity off: kept as class 1 (but still uncertain: weight 0)
    assert weight[0][wrong].eq(0).all()
    assert touching.any()


def test_specificity_removes_uncertain_structure_voxels_outside_its_intensity_range():
    intensity, probs, disc, ring, left, wrong = _blob_case()
    label, weight = refine_pseudo_labels(intensity, probs, threshold=0.5, quantiles=(0.0, 1.0), sensitivity=False)
    assert (label[0][wrong] == 0).all() and weight[0][wrong].eq(1).all()
    assert (label[0][disc & ~wrong] == 1).all()
    assert (label[0][ring] == 0).all() and weight[0][ring].eq(0).all()  # sensitivity off: ring stays uncertain


# -- slabs, simulated shift, translation stage ---------------------------------------------------------
def test_slab_stream_stacks_neighbours_in_slice_order_with_the_centre_label(tmp_path):
    root = write_image_folder(tmp_path / "d", n=8)
    spec = build_dataset("image_folder", root, num_classes=3, split_csv="split.csv")
    # one volume of 4 slices, listed out of order
    spec.cases = [Case(c.id, c.image, c.mask, "train", "p", "vol", index=z)
                  for z, c in zip([2, 0, 3, 1], spec.cases[:4])]
    store = CaseStore(spec, (32, 32))
    stream = Stream(spec.cases, 4, True, slab=3)
    batches = StepBatches(store, {"labeled": stream}, 2, augment=False)
    by_index = {c.index: c for c in spec.cases}
    img = lambda z: store.get(by_index[z], True).image[0]
    draw = batches[(0, 0)]["labeled"]
    assert draw["image"].shape == (4, 3, 32, 32)
    for image, label in zip(draw["image"], draw["label"]):
        z = next(k for k in range(4) if np.allclose(image[1].numpy(), img(k)))
        assert np.allclose(image[0].numpy(), img(max(z - 1, 0))) and np.allclose(image[2].numpy(), img(min(z + 1, 3)))
        assert np.array_equal(label.numpy(), store.get(by_index[z], True).label)
    with pytest.raises(Exception, match="odd"):
        Stream(spec.cases, 1, True, slab=2)


def test_simulated_shift_splits_patients_and_remaps_only_target_images(tmp_path):
    root = write_image_folder(tmp_path / "d", n=16)
    opts = {"base": "image_folder", "base_options": {"num_classes": 3, "split_csv": "split.csv"}, "seed": 1}
    spec = build_dataset("simulated_shift", root, **opts)
    base = build_dataset("image_folder", root, num_classes=3, split_csv="split.csv")
    assert [c.domain for c in spec.cases] == [c.domain for c in build_dataset("simulated_shift", root, **opts).cases]
    for split in ("train", "val", "test"):
        doms = [c.domain for c in spec.cases if c.split == split]
        assert abs(doms.count(TARGET) - doms.count(SOURCE)) <= 1
    assert not {c.group for c in spec.select(None, SOURCE)} & {c.group for c in spec.select(None, TARGET)}
    shifted, plain = CaseStore(spec, (32, 32)), CaseStore(base, (32, 32))
    for c, b in zip(spec.cases, base.cases):
        s, p = shifted.get(c, True), plain.get(b, True)
        assert np.array_equal(s.label, p.label)
        assert np.array_equal(s.image, p.image) == (c.domain == SOURCE)
        if c.domain == TARGET:  # contrast inverted: bright disc becomes dark
            assert np.corrcoef(s.image.ravel(), p.image.ravel())[0, 1] < -0.5


def _translator(**cfg):
    model = build_backbone("unet", 2, 1, 3, channels=[4, 8])
    return build_strategy("sdc_uda_translate", model, 3,
                          {"width": 4, "dim": 8, "blocks": 1, "heads": 2, "disc_width": 4, "r1_every": 2, **cfg})


def test_gan_step_alternates_generator_then_discriminator_with_lazy_r1():
    torch.manual_seed(0)
    s = _translator()
    order = []

    class Recorder(torch.optim.SGD):
        def __init__(self, name, params):
            super().__init__(params, lr=0.01)
            self.name_ = name

        def step(self, closure=None):
            order.append((self.name_, all(p.grad is not None for p in self.param_groups[0]["params"])))
            return super().step(closure)

    params = s.trainable_parameters()
    s.bind_optimizers({n: Recorder(n, list(p)) for n, p in params.items()})
    before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
    ema_before = [p.clone() for p in s.g_ab_ema.parameters()]
    batch = {"labeled": {"image": torch.rand(1, 3, 32, 32), "label": torch.zeros(1, 32, 32, dtype=torch.long)},
             "unlabeled": {"image": torch.rand(1, 3, 32, 32)}}
    logs = [s.training_step(batch, step).logs for step in range(2)]
    assert order == [("generator", True), ("discriminator", True)] * 2
    for n, ps in params.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[n], ps))
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, s.g_ab_ema.parameters()))
    assert logs[0]["r1"] >= 0 and np.isnan(logs[1]["r1"])  # R1 on every r1_every-th step only
    with pytest.raises(ValueError, match="one 3-slice slab"):
        s.training_step({**batch, "labeled": {"image": torch.rand(2, 3, 32, 32), "label": batch["labeled"]["label"]}}, 0)


def test_r1_penalty_sums_over_every_slice_of_the_slab():
    """Official ``d_r1_loss``: one slab is a batch of 1, so ‖∇D‖² is summed over all its slices' pixels."""
    torch.manual_seed(0)
    s = _translator()
    slab, fake = torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32)
    _, whole = s._disc_loss(s.d_a, slab, fake, r1=True)
    per_slice = [s._disc_loss(s.d_a, slab[i:i + 1], fake[i:i + 1], r1=True)[1] for i in range(3)]
    assert whole > 0
    torch.testing.assert_close(whole, torch.stack(per_slice).sum())


def test_volume_translation_keeps_labels_and_the_source_intensity_range(tmp_path):
    root = write_image_folder(tmp_path / "d", n=8)
    spec = build_dataset("image_folder", root, num_classes=3, split_csv="split.csv")
    spec.cases = [Case(c.id, c.image, c.mask, "train", "p", "vol", index=z) for z, c in enumerate(spec.cases[:5])]
    store = CaseStore(spec, (16, 16))
    s = _translator().eval()
    vol = torch.from_numpy(np.stack([store.get(c, True).image for c in spec.cases]))
    out = s.translate_volume(vol)
    assert out.shape == vol.shape and out.min() >= vol.min() - 1e-6 and out.max() <= vol.max() + 1e-6
    calls = []
    gen = lambda image, label, n, seed: calls.append(image.shape) or s.generate(image, label, n, seed)
    m = generate_pairs(gen, store, spec.cases, tmp_path / "gen", 1, 0, "sdc_uda_translate", volumes=True)
    assert calls == [(5, 1, 16, 16)]  # one call with the whole volume
    pairs = load_pairs(tmp_path / "gen", store)
    assert len(pairs) == len(m["cases"])
    for (img, lab), cid in zip(pairs, m["cases"]):
        c = next(c for c in spec.cases if c.id == cid)
        assert np.array_equal(lab, store.get(c, True).label) and np.allclose(img, out[c.index].numpy(), atol=1e-5)


def test_self_training_rounds_hand_the_student_to_the_teacher():
    torch.manual_seed(0)
    model = build_backbone("unet", 2, 1, 3, channels=[4, 8])
    s = build_strategy("sdc_uda_self_train", model, 3, {"rounds": 2})
    s.setup(total_steps=4)
    opt = torch.optim.SGD(s.trainable_parameters(), lr=0.1)
    batch = {"labeled": {"image": torch.rand(2, 1, 16, 16), "label": torch.randint(0, 3, (2, 16, 16))},
             "unlabeled": {"image": torch.rand(2, 1, 16, 16)}}
    teacher0 = [p.clone() for p in s.teacher.parameters()]
    for step in range(4):
        out = s.training_step(batch, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        same = all(torch.equal(a, b) for a, b in zip(teacher0, s.teacher.parameters()))
        assert same == (step < 2) and out.logs["round"] == (step >= 2)
    assert 0 <= out.logs["kept_fraction"] <= 1


# -- recipes -------------------------------------------------------------------------------------------
def _acdc_recipe(tmp_steps: int = 4) -> dict:
    stage = lambda **kw: {"steps": tmp_steps, "val_every": tmp_steps, **kw}
    return {
        "name": "tiny_sdc", "seed": 5,
        "data": {"dataset": "simulated_shift", "options": {"base": "acdc"}, "domain": "target",
                 "labeled_domain": "source", "image_size": [32, 32], "val_split": None,
                 "budget": {"count": 1}, "max_unlabeled": 24, "max_test_cases": 2},
        "backbone": {"name": "unet", "kwargs": {"channels": [4, 8, 16]}},
        "trainer": {"progress_bar": False, "accelerator": "cpu", "precision": "32", "log_every": 1},
        "evaluation": {"metrics": ["dice"], "overlays": 0},
        "stages": [
            stage(name="translate", strategy="sdc_uda_translate", batch_size={"labeled": 1, "unlabeled": 1},
                  config={"width": 4, "dim": 8, "heads": 2, "disc_width": 4},
                  optimizer={"name": "adam", "lr": 2e-4, "betas": [0.0, 0.99], "schedule": "constant"}),
            stage(name="teacher", strategy="supervised", init="none", batch_size={"labeled": 2},
                  data={"synthetic": {"from_stage": "translate", "ratio": 1.0}}),
            stage(name="self_train", strategy="sdc_uda_self_train", batch_size={"labeled": 2, "unlabeled": 2},
                  data={"synthetic": {"from_stage": "translate", "ratio": 1.0}}),
        ],
    }


def test_recipe_refuses_model_selection_on_the_unlabelled_target():
    raw = _acdc_recipe()
    raw["data"]["val_split"] = "val"
    with pytest.raises(RecipeError, match="val_split: null"):
        parse_recipe(raw)
    parse_recipe(_acdc_recipe())
    parse_recipe(_acdc_recipe(), ["stages.0.config.inter_slice=false"])


@requires_shared("acdc")
def test_recipe_runs_end_to_end_and_never_reads_a_target_training_mask(tmp_path, monkeypatch):
    import label_efficient.data.store as store_mod
    from label_efficient.runner import run_recipe

    read = []
    original = store_mod.read_mask_2d
    monkeypatch.setattr(store_mod, "read_mask_2d", lambda path: read.append(str(path)) or original(path))
    recipe = parse_recipe(_acdc_recipe())
    metrics = run_recipe(recipe, tmp_path / "run")
    spec = build_dataset("simulated_shift", base="acdc")
    target_train = {c.mask for c in spec.cases if c.domain == TARGET and c.split != "test"}
    assert read and not target_train & set(read)  # every mask read is a source mask or a target *test* mask
    target_test = {c.mask for c in spec.cases if c.domain == TARGET and c.split == "test"}
    assert set(read) - {c.mask for c in spec.select(None, SOURCE)} <= target_test
    assert metrics["mean_dice"] is not None and len(metrics["cases"]) == 2
    manifest = json.loads((tmp_path / "run" / "stage0_translate" / "generated" / "manifest.json").read_text())
    assert manifest["cases"] and all(cid in {c.id for c in spec.select("train", SOURCE)} for cid in manifest["cases"])
    assert [s["stage"] for s in metrics["stages"]] == ["translate", "teacher", "self_train"]


def test_plain_loop_translate_then_self_train(tmp_path):
    torch.manual_seed(0)
    root = write_image_folder(tmp_path / "d", n=16)
    spec = build_dataset("simulated_shift", root, base="image_folder",
                         base_options={"num_classes": 3, "split_csv": "split.csv"})
    store = CaseStore(spec, (32, 32))
    source, target = spec.select("train", SOURCE), spec.select("train", TARGET)
    model = build_backbone("unet", 2, 1, 3, channels=[4, 8])
    translator = build_strategy("sdc_uda_translate", model, 3, {"width": 4, "dim": 8, "heads": 2, "disc_width": 4})
    slab = translator.stream_options()
    batches = StepBatches(store, {"labeled": Stream(source, 1, True, **slab["labeled"]),
                                  "unlabeled": Stream(target, 1, False, **slab["unlabeled"])}, 3, seed=1)
    translator.bind_optimizers({n: torch.optim.Adam(p, lr=2e-4, betas=(0.0, 0.99))
                                for n, p in translator.trainable_parameters().items()})
    translator.setup(3)
    translator.train()
    for step, batch in enumerate(train_loader(batches)):
        assert "label" not in batch["unlabeled"]
        out = translator.training_step(batch, step)
        assert torch.isfinite(out.loss)
    translator.eval()
    generate_pairs(translator.generate, store, source, tmp_path / "gen", 1, 0, "sdc_uda_translate", volumes=True)
    pairs = load_pairs(tmp_path / "gen", store)
    student = build_strategy("sdc_uda_self_train", model, 3, {"rounds": 2})
    student.setup(2)
    opt = torch.optim.AdamW(student.trainable_parameters(), lr=1e-3)
    batches = StepBatches(store, {"labeled": Stream(source, 2, True, synthetic=pairs, synthetic_ratio=1.0),
                                  "unlabeled": Stream(target, 2, False)}, 2, seed=2)
    for step, batch in enumerate(train_loader(batches)):
        out = student.training_step(batch, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    student.eval()
    assert student.predict(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)
