import numpy as np
import pytest
import torch

from label_efficient.backbones import build_backbone
from label_efficient.strategies import BCP, BCPPretrain
from label_efficient.strategies.bcp import box_mask, copy_paste, region_loss
from label_efficient.transforms.components import largest_component_labels, largest_component_mask

from test_strategies import disc_batch, plain_loop


@pytest.mark.parametrize("shape,ratio", [((96, 96), 4 / 9), ((30, 60), (20 * 40) / (30 * 60)),
                                         ((24, 24, 12), 8 / 27)])
def test_box_mask_area_ratio(shape, ratio):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m = box_mask(shape, 2 / 3, generator=g)
        inside = (m == 0).float().mean().item()
        assert inside == pytest.approx(ratio, abs=1e-6)
        idx = (m == 0).nonzero()
        spans = (idx.max(0).values - idx.min(0).values + 1).tolist()
        assert spans == [int(s * 2 / 3) for s in shape]  # one axis-aligned box


def test_both_mix_directions_place_pixels():
    m = box_mask((16, 16), 2 / 3, generator=torch.Generator().manual_seed(1))
    a, b = torch.full((2, 1, 16, 16), 1.0), torch.full((2, 1, 16, 16), 2.0)
    u, v = torch.full((2, 1, 16, 16), 3.0), torch.full((2, 1, 16, 16), 4.0)
    x_in, x_out = copy_paste(u, a, m), copy_paste(b, v, m)
    inside = m == 0
    assert (x_in[:, 0][:, inside] == 1).all() and (x_in[:, 0][:, ~inside] == 3).all()  # labelled crop in unlabelled
    assert (x_out[:, 0][:, inside] == 4).all() and (x_out[:, 0][:, ~inside] == 2).all()  # unlabelled crop in labelled
    ya, yu = torch.ones(2, 16, 16, dtype=torch.long), torch.full((2, 16, 16), 2)
    y_in = copy_paste(yu, ya, m)
    assert y_in.dtype == torch.long and (y_in[:, inside] == 1).all() and (y_in[:, ~inside] == 2).all()


def test_region_loss_weights_land_on_the_right_pixels():
    torch.manual_seed(0)
    m = box_mask((8, 8), 0.5, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(1, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (1, 8, 8))
    # weight 0 on the outside: gradients reach only the inside pixels, and vice versa
    region_loss(logits, target, m, 0.0, 1.0).backward()
    g = logits.grad.abs().sum(1)[0]
    assert g[m == 1].sum() == 0 and g[m == 0].sum() > 0
    logits.grad = None
    region_loss(logits, target, m, 0.5, 0.0).backward()
    g = logits.grad.abs().sum(1)[0]
    assert g[m == 0].sum() == 0 and g[m == 1].sum() > 0
    # α scales the pseudo-labelled region linearly
    full = region_loss(logits, target, m, 1.0, 0.0).item()
    assert region_loss(logits, target, m, 0.5, 0.0).item() == pytest.approx(0.5 * full)


@pytest.mark.parametrize("autocast,squared", [(False, True), (True, True), (False, False)])
def test_region_loss_equals_two_weighted_calls_per_region(autocast, squared):
    """The fused loss (one CE, softmax and one-hot for both regions, batch-summed maps) gives the values and
    gradients of the ``weighted_ce`` + ``weighted_dice`` form in fp32; under bf16 autocast it is computed in fp32
    from the bf16 logits (the two-call form rounds its softmax and Dice sums to bf16 there)."""
    from label_efficient.losses import weighted_ce, weighted_dice

    def two_calls(logits, target, mask, w_out, w_in, squared):
        logits = logits.float()
        m = mask.unsqueeze(0).expand_as(target).to(logits.dtype)
        return sum(w * (weighted_ce(logits, target, r) + weighted_dice(logits, target, r, squared))
                   for r, w in ((m, w_out), (1 - m, w_in))) / 2

    torch.manual_seed(3)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    x, target = torch.randn(2, 1, 24, 24), torch.randint(0, 4, (2, 24, 24))
    m = box_mask((24, 24), 2 / 3, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (region_loss, two_calls):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(conv(x), target, m, 0.5, 1.0, squared)
        loss.backward()
        results.append((loss.detach(), conv.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=0)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


def test_largest_component_per_class():
    lab = torch.zeros(1, 10, 10, dtype=torch.long)
    lab[0, 0:2, 0:2] = 1  # small blob of class 1
    lab[0, 5:9, 5:9] = 1  # large blob of class 1
    lab[0, 0, 9] = 2
    out = largest_component_labels(lab, 3)
    assert out[0, 0:2, 0:2].sum() == 0 and (out[0, 5:9, 5:9] == 1).all() and out[0, 0, 9] == 2


def _reference_lcc(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """BCP's get_ACDC_2DLargestCC / LA LargestCC, per sample and class with skimage-like full connectivity."""
    from scipy import ndimage

    out = np.zeros_like(labels)
    for n in range(labels.shape[0]):
        for c in range(1, num_classes):
            comp, k = ndimage.label(labels[n] == c, ndimage.generate_binary_structure(labels.ndim - 1, labels.ndim - 1))
            if k:
                out[n][comp == 1 + np.argmax(np.bincount(comp.ravel())[1:])] = c
    return out


@pytest.mark.parametrize("shape, classes", [((6, 40, 40), 4), ((3, 12, 12, 10), 2), ((5, 9, 9), 3)])
def test_batched_largest_component_matches_reference(shape, classes):
    rng = np.random.default_rng(0)
    for trial in range(5):  # random maps with many small blobs and ties
        labels = rng.integers(0, classes, shape) * (rng.random(shape) < 0.6)
        labels[1] = 0 if trial == 1 else labels[1]  # an empty image between others (the per-image numbering)
        labels[-1] = 0 if trial == 2 else labels[-1]
        got = largest_component_labels(torch.from_numpy(labels), classes).numpy()
        assert np.array_equal(got, _reference_lcc(labels, classes)), trial
        # the one-hot route (the one other devices take) agrees with the CPU's label-map route
        onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), classes).movedim(-1, 1)[:, 1:]
        ids = torch.arange(1, classes).view(1, -1, *[1] * (labels.ndim - 1))
        assert np.array_equal((largest_component_mask(onehot) * ids).sum(1).numpy(), got), trial
    empty = torch.zeros(2, 8, 8, dtype=torch.long)
    assert largest_component_labels(empty, 4).sum() == 0


@pytest.mark.parametrize("shape", [(4, 2, 40, 40), (2, 1, 12, 12, 10)])
def test_device_native_component_labelling_equals_scipy(shape):
    """The torch path (used off CPU, e.g. on a GPU) gives scipy's answer, ties included."""
    from label_efficient.transforms.components import _largest_scipy, _largest_torch

    rng = np.random.default_rng(1)
    for trial in range(5):
        mask = torch.from_numpy((rng.random(shape) < 0.5).astype(np.float32))
        assert torch.equal(_largest_torch(mask), _largest_scipy(mask)), trial
    assert _largest_torch(torch.zeros(1, 1, 5, 5)).sum() == 0


def test_teacher_starts_at_pretrained_student_then_follows_ema():
    torch.manual_seed(0)
    pre = BCPPretrain(build_backbone("unet", 2, 1, 3, channels=[8, 16, 32]), 3)
    losses = plain_loop(pre, 15, lambda i: {"labeled": disc_batch(4, i)})
    assert losses[-1] < losses[0]
    s = BCP(pre.export_model(), 3, ema_decay=0.9)
    assert all(torch.equal(t, p) for t, p in zip(s.teacher.state_dict().values(), s.model.state_dict().values()))
    t_before = [p.clone() for p in s.teacher.parameters()]
    out = s.training_step({"labeled": disc_batch(4, 50), "unlabeled": disc_batch(4, 60, False)}, 0)
    out.loss.backward()
    with torch.no_grad():
        for p in s.trainable_parameters():
            p -= 0.1 * p.grad
    s.after_optimizer_step(0)
    for t, t0, st in zip(s.teacher.parameters(), t_before, s.model.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * st, atol=1e-6)


def test_bcp_plain_loop_and_batch_checks():
    torch.manual_seed(0)
    s = BCP(build_backbone("unet", 2, 1, 3, channels=[8, 16, 32]), 3)
    losses = plain_loop(s, 8, lambda i: {"labeled": disc_batch(4, i), "unlabeled": disc_batch(4, 100 + i, False)})
    assert all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ValueError, match="even"):
        s.training_step({"labeled": disc_batch(3, 0), "unlabeled": disc_batch(4, 1, False)}, 0)
    with pytest.raises(ValueError, match="must match"):
        s.training_step({"labeled": disc_batch(4, 0), "unlabeled": disc_batch(2, 1, False)}, 0)


def test_bcp_3d_step():
    s = BCP(build_backbone("unet", 3, 1, 2, channels=[4, 8]), 2, squared_dice=False)
    x = torch.randn(2, 1, 12, 12, 12)
    y = (x[:, 0] > 0.5).long()
    out = s.training_step({"labeled": {"image": x, "label": y}, "unlabeled": {"image": torch.randn(2, 1, 12, 12, 12)}}, 0)
    assert torch.isfinite(out.loss)


def test_two_stage_recipe_teacher_from_best_pretrain(image_folder, tmp_path, monkeypatch):
    from conftest import tiny_recipe
    from label_efficient.recipe import parse_recipe
    from label_efficient.runner import run_recipe

    seen = {}
    real_init = BCP.__init__

    def spy(self, model, num_classes, config=None, **kw):
        real_init(self, model, num_classes, config, **kw)
        seen["teacher"] = {k: v.clone() for k, v in self.teacher.state_dict().items()}

    monkeypatch.setattr(BCP, "__init__", spy)
    raw = tiny_recipe(image_folder, strategy="bcp_pretrain", steps=6, val_every=2)
    raw["stages"].append({**raw["stages"][0], "strategy": "bcp", "steps": 2, "init": "previous_best"})
    raw["data"]["budget"] = {"count": 4}
    run_recipe(parse_recipe(raw), tmp_path / "run")
    best = torch.load(tmp_path / "run/stage0_bcp_pretrain/best.ckpt", weights_only=True)["state_dict"]
    for k, v in seen["teacher"].items():
        assert torch.equal(v, best[f"strategy.model.{k}"]), k


def test_bcp_says_how_it_cleans_pseudo_labels(caplog):
    """The largest-component default assumes one structure per class: the stage says which rule it runs with."""
    from label_efficient.backbones import build_backbone
    from label_efficient.strategies import build_strategy

    net = build_backbone("unet", 2, 1, 3, channels=[4, 8])
    with caplog.at_level("INFO", logger="label_efficient"):
        build_strategy("bcp", net, 3).setup(10)
        build_strategy("bcp", net, 3, {"largest_component": False}).setup(10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bcp: pseudo labels")]
    assert "cut to the largest connected component per class" in lines[0] and "(config.largest_component: true)" in lines[0]
    assert "kept whole" in lines[1] and "(config.largest_component: false)" in lines[1]
