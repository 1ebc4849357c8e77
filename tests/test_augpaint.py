"""AugPaint: exact foreground and mask in every generated pair, new backgrounds, RePaint jumps, generate → train."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from label_efficient.backbones import build_backbone
from label_efficient.data import DataError
from label_efficient.strategies import build_strategy

from conftest import tiny_recipe

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "train_timesteps": 100,
        "repaint_steps": 10, "jump_length": 2, "jump_n_sample": 3, "ddim_steps": 6, "variants": 3}


def _strategy(**config):
    torch.manual_seed(0)
    s = build_strategy("augpaint", build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3, {**TINY, **config})
    s.setup(10)
    return s


def _pair(size=16):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, size, size, generator=g)
    label = torch.zeros(size, size, dtype=torch.long)
    label[4:9, 5:11], label[9:12, 5:8] = 1, 2
    return image, label


def _ready(s):
    """An untrained denoiser with the intensity range training would fit: enough to test the sampler's mechanics."""
    s.intensity.copy_(torch.tensor([0.0, 1.0]))
    s.eval()


@pytest.mark.parametrize("sampler", ["repaint", "ddim"])
def test_generated_images_keep_the_exact_foreground_and_get_new_backgrounds(sampler):
    s = _strategy(sampler=sampler)
    _ready(s)
    image, label = _pair()
    out = s.generate(image, label, 3, seed=5)
    fg = (label > 0).expand(3, 1, *label.shape)
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(out[fg], image.expand(3, 1, 16, 16)[fg])  # bit-identical foreground
    bg = ~fg[0, 0]
    assert (out[0, 0][bg] - image[0][bg]).abs().mean() > 0.05  # the background is generated
    assert (out[0, 0][bg] - out[1, 0][bg]).abs().mean() > 0.05  # and differs between variants
    assert torch.equal(s.generate(image, label, 3, seed=5), out)  # one seed, one result


def test_repaint_eta_adds_noise_to_each_reverse_step():
    image, label = _pair()
    runs = {}
    for eta in (0.0, 1.0):
        s = _strategy(eta=eta, jump_n_sample=1)
        _ready(s)
        runs[eta] = s.generate(image, label, 2, seed=5)
    bg = ~(label > 0)
    assert (runs[0.0][0, 0][bg] - runs[1.0][0, 0][bg]).abs().mean() > 0.01


def test_dilation_grows_the_kept_region_and_multiclass_masks_are_their_union():
    s = _strategy(dilate=1)
    _, label = _pair()
    m = s.known_mask(label)[0, 0].bool()
    assert m[label > 0].all() and m.sum() > (label > 0).sum()
    assert m[3, 5] and not m[2, 5]  # one pixel above the top row, not two


def test_repaint_jumps_happen_as_configured(monkeypatch):
    from diffusers import RePaintScheduler

    undo, calls = [], []
    real_undo = RePaintScheduler.undo_step
    monkeypatch.setattr(RePaintScheduler, "undo_step", lambda self, *a, **k: undo.append(1) or real_undo(self, *a, **k))
    s = _strategy()
    _ready(s)
    s.ema.register_forward_hook(lambda *a: calls.append(1))
    s.generate(*_pair(), 2, seed=0)
    # 10 steps, jump length 2, 3 samples per jump: jumps start at t = 0, 2, 4, 6 (range(0, 10 − 2, 2)), each
    # repeated 3 − 1 times and 2 steps long → 16 forward (undo) steps, each re-denoised
    assert len(undo) == 4 * 2 * 2 and len(calls) == 10 + len(undo)
    undo.clear()
    s.config.jump_n_sample = 1
    s.generate(*_pair(), 2, seed=0)
    assert undo == []


def test_denoiser_loss_decreases_on_a_fixed_batch_and_the_ema_follows():
    s = _strategy()
    s.train()
    opt = torch.optim.Adam(s.trainable_parameters(), lr=3e-3)
    x = torch.rand(8, 1, 16, 16)
    batch = {"unlabeled": {"image": x}}
    losses = []
    before = [p.clone() for p in s.ema.parameters()]
    for step in range(30):
        torch.manual_seed(step % 3)  # the same noise and timesteps every third step: a fixed objective
        out = s.training_step(batch, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        s.after_optimizer_step(step)
        losses.append(out.loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert s.intensity.tolist() == pytest.approx([x.min().item(), x.max().item()])  # fitted on the first batch
    assert all(not torch.equal(a, b) for a, b in zip(before, s.ema.parameters()))
    assert not any(p.requires_grad for p in s.ema.parameters())
    assert all(p.grad is None for p in s.model.parameters())  # the recipe's backbone is not trained here


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        _strategy(block_out_channels=[6, 16])
    s = _strategy()
    with pytest.raises(RuntimeError, match="untrained"):
        s.generate(*_pair(), 1, 0)
    with pytest.raises(ValueError, match="2D"):
        s.training_step({"unlabeled": {"image": torch.rand(2, 1, 8, 8, 8)}}, 0)
    with pytest.raises(ValueError, match="constant"):  # no [−1, 1] map can be fitted on it
        s.training_step({"unlabeled": {"image": torch.zeros(2, 1, 16, 16)}}, 0)


def test_generate_then_supervised_runs_end_to_end(image_folder, tmp_path):
    from label_efficient.recipe import parse_recipe
    from label_efficient.runner import run_recipe

    raw = tiny_recipe(image_folder)
    gen = {"name": "gen", "strategy": "augpaint", "steps": 3, "val_every": 3, "batch_size": {"unlabeled": 4},
           "config": {**TINY, "sampler": "ddim", "variants": 2}, "data": {"augment": False},
           "optimizer": {"name": "adamw", "lr": 1e-3, "schedule": "constant"}}
    seg = {**raw["stages"][0], "name": "seg", "data": {"synthetic": {"from_stage": "gen", "ratio": 0.5}}}
    raw["stages"] = [gen, seg]
    out = tmp_path / "run"
    metrics = run_recipe(parse_recipe(raw), out)
    assert metrics["mean_dice"] is not None  # the segmenting stage was evaluated
    folder = out / "stage0_gen" / "generated"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["cases"]) + len(manifest["skipped_empty"]) == 4 and manifest["variants"] == 2
    assert (folder / "preview.png").stat().st_size > 1000

    from label_efficient.data import CaseStore, build_dataset

    spec = build_dataset("image_folder", image_folder, num_classes=3, split_csv="split.csv")
    store = CaseStore(spec, (32, 32))
    for cid in manifest["cases"]:
        case = next(c for c in spec.select("train") if c.id == cid)
        src = store.get(case, True)
        with np.load(folder / f"{cid}.npz") as z:
            assert np.array_equal(z["label"], src.label)  # the original mask, unchanged
            fg = src.label > 0
            assert all(np.array_equal(img[:, fg], src.image[:, fg]) for img in z["images"])
    # the generator never saw a mask: its stage ran label-free on every train image
    assert json.loads((out / "stage0_gen" / "done.json").read_text())["best_score"] is None

    # a generation killed before its manifest resumes at the missing cases, with the same images (seeded per case)
    first = folder / f"{manifest['cases'][0]}.npz"
    kept = np.load(first)["images"]
    first.unlink()
    (folder / "manifest.json").unlink()
    run_recipe(parse_recipe(raw), out, resume=True)
    assert np.array_equal(np.load(first)["images"], kept) and (folder / "manifest.json").is_file()

    manifest["num_classes"] = 2  # a folder made for another class count is refused, named
    (folder / "manifest.json").write_text(json.dumps(manifest))
    reuse = tiny_recipe(image_folder)
    reuse["data"]["synthetic"] = {"path": str(folder)}
    with pytest.raises(DataError, match="num_classes=2"):
        run_recipe(parse_recipe(reuse), tmp_path / "reuse")


def test_empty_masks_are_skipped_and_counted(image_folder, tmp_path):
    from label_efficient.data import CaseStore, build_dataset
    from label_efficient.data.synthetic import generate_pairs

    spec = build_dataset("image_folder", image_folder, num_classes=3, split_csv="split.csv")
    store = CaseStore(spec, (16, 16))
    cases = store.load(spec.select("train")[:3], True)
    store.get(cases[0], True).label[:] = 0
    s = _strategy(sampler="ddim", variants=2)
    _ready(s)
    m = generate_pairs(s.generate, store, cases, tmp_path / "g", 2, 0, "augpaint")
    assert m["skipped_empty"] == [cases[0].id] and m["cases"] == [c.id for c in cases[1:]]
