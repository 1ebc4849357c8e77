import numpy as np
import pytest
import torch

from label_efficient.backbones import build_backbone
from label_efficient.strategies import DSAIF
from label_efficient.strategies.dsaif import in_unit_range
from label_efficient.strategies.ema import reinitialised
from label_efficient.transforms.rotate import rotate_quarter, rotation_dims
from label_efficient.transforms.tree_filter import TreeViews

from test_strategies import disc_batch, plain_loop


def with_views(batch):
    out = dict(batch)
    out["image"] = torch.stack([torch.from_numpy(TreeViews(5)(x.numpy())) for x in batch["image"]])
    return out


def make(**kw):
    torch.manual_seed(0)
    return DSAIF(build_backbone("unet", 2, 1, 3, channels=[8, 16, 32]), 3, **kw)


def test_two_independent_networks():
    s = make()
    p1, p2 = list(s.model.parameters()), list(s.model2.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(p1, p2) if a.dim() > 1)
    assert len(s.trainable_parameters()) == len(p1) + len(p2)
    twin = reinitialised(s.model)
    assert type(twin) is type(s.model)


def test_views_follow_the_spec_probabilities():
    s = make(gamma_p=0.0)
    x = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.9)], 1)
    x = x.repeat(2000, 1, 1, 1)  # channels [raw=0.1, max=0.5, min=0.9]
    x[:, :, 0, 0] = 0.0  # give every channel a range so min-max keeps values distinguishable
    x[:, :, 0, 1] = 1.0
    a, b, tag = s.make_views(x)
    frac = torch.bincount(tag, minlength=3).float() / len(tag)
    assert frac[0] == pytest.approx(0.5, abs=0.05) and frac[1] == pytest.approx(0.25, abs=0.04)
    assert torch.allclose(a[tag == 0, 0, 2, 2], torch.tensor(0.1)) and torch.allclose(b[tag == 0, 0, 2, 2], torch.tensor(0.1))
    assert torch.allclose(a[tag == 1, 0, 2, 2], torch.tensor(0.5)) and torch.allclose(b[tag == 1, 0, 2, 2], torch.tensor(0.9))
    assert torch.allclose(a[tag == 2, 0, 2, 2], torch.tensor(0.9)) and torch.allclose(b[tag == 2, 0, 2, 2], torch.tensor(0.5))


def test_rotation_is_undone():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    k = torch.tensor([1, 3])
    dims = rotation_dims((4, 4))
    assert torch.equal(rotate_quarter(rotate_quarter(x, k, dims), -k % 4, dims), x)
    assert torch.equal(rotate_quarter(x, k, dims)[0], torch.rot90(x[0], 1, (1, 2)))
    assert rotation_dims((8, 6, 6)) == (3, 4)


def test_gamma_keeps_range():
    x = torch.rand(3, 1, 5, 5) * 4 - 2
    y = in_unit_range(lambda u: u**0.5, x)
    assert torch.allclose(y.amin((2, 3)), x.amin((2, 3))) and torch.allclose(y.amax((2, 3)), x.amax((2, 3)))


def test_lambda_ramp():
    s = make(lambda_max=1.0, rampup_fraction=0.4)
    s.setup(1000)
    assert s.lam(0) == pytest.approx(np.exp(-5)) and s.lam(400) == pytest.approx(1.0) and s.lam(900) == 1.0


def test_dsaif_plain_loop_and_rotation_equivariance_of_targets():
    s = make()
    losses = plain_loop(s, 12, lambda i: {"labeled": with_views(disc_batch(2, i)),
                                          "unlabeled": with_views(disc_batch(2, 100 + i, False))})
    assert losses[-1] < losses[0]
    out = s.training_step({"labeled": with_views(disc_batch(2, 0)), "unlabeled": with_views(disc_batch(2, 1, False))}, 5)
    assert {"loss_cps1", "loss_cps2", "lambda"} <= set(out.logs)
    assert s.predict(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_needs_view_triples():
    with pytest.raises(ValueError, match="channel triples"):
        make().training_step({"labeled": disc_batch(2, 0), "unlabeled": disc_batch(2, 1, False)}, 0)


def test_dsaif_recipe_runs_with_cached_tree_views(image_folder, tmp_path):
    from conftest import tiny_recipe
    from label_efficient.recipe import parse_recipe
    from label_efficient.runner import run_recipe

    raw = tiny_recipe(image_folder, strategy="dsaif", steps=4, val_every=2, config={"area_threshold": 5})
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    assert 0 <= m["mean_dice"] <= 1 and m["stages"][0]["strategy"] == "dsaif"


@pytest.mark.parametrize("shape", [(8, 12, 12), (8, 12, 10)])
def test_dsaif_3d_step_with_and_without_a_square_plane(shape):
    """3D volumes: quarter turns in the first square plane, only half turns when no plane is square."""
    torch.manual_seed(0)
    s = DSAIF(build_backbone("unet", 3, 1, 2, channels=[4, 8]), 2)
    s.setup(10)
    vol = lambda: torch.rand(2, 1, *shape)
    lab = {"image": vol(), "label": torch.randint(0, 2, (2, *shape))}
    batch = {"labeled": with_views(lab), "unlabeled": with_views({"image": vol()})}
    out = s.training_step(batch, 5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in s.model2.parameters())


def _flat_views(n):
    x = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 0.9)], 1)
    x = x.repeat(n, 1, 1, 1)  # channels [raw=0.1, max=0.5, min=0.9]
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    return x


def test_gamma_is_drawn_per_view_and_only_for_filtered_pairs():
    """Official ``tree_process_3D_higra_final``: each filter call (one per view) contrasts with p = 0.5 and its own
    γ ~ U(0.5, 1.5); raw pairs never reach the filter, so they are never contrasted."""
    s = make()
    a, b, tag = s.make_views(_flat_views(4000))
    raw, filt = tag == 0, tag > 0
    assert torch.allclose(a[raw, 0, 2, 2], torch.tensor(0.1)) and torch.allclose(b[raw, 0, 2, 2], torch.tensor(0.1))
    base_a = torch.where(tag == 1, 0.5, 0.9)[filt]
    base_b = torch.where(tag == 1, 0.9, 0.5)[filt]
    ga = torch.log(a[filt, 0, 2, 2]) / torch.log(base_a)  # the γ each view got
    gb = torch.log(b[filt, 0, 2, 2]) / torch.log(base_b)
    on_a, on_b = (ga - 1).abs() > 1e-4, (gb - 1).abs() > 1e-4
    assert on_a.float().mean() == pytest.approx(0.5, abs=0.04) and on_b.float().mean() == pytest.approx(0.5, abs=0.04)
    assert (on_a & on_b).float().mean() == pytest.approx(0.25, abs=0.04)  # independent coins
    both = on_a & on_b
    assert not torch.allclose(ga[both], gb[both], atol=1e-3)  # independent γ
    assert ga[on_a].min() >= 0.5 - 1e-4 and ga[on_a].max() <= 1.5 + 1e-4


def test_view_b_is_rotated_only_in_filtered_pairs():
    """semi.py draws the angle inside the filtered branch: raw pairs keep k = 0."""
    s = make()
    torch.manual_seed(1)
    tag = torch.randint(0, 3, (4000,))
    k = s.view_b_turns(torch.Size((4000, 1, 8, 8)), tag)
    assert (k[tag == 0] == 0).all()
    frac = torch.bincount(k[tag > 0], minlength=4).float() / (tag > 0).sum()
    assert torch.allclose(frac, torch.full((4,), 0.25), atol=0.03)
    assert (make(rotate_view_b=False).view_b_turns(torch.Size((4000, 1, 8, 8)), tag) == 0).all()
    assert set(s.view_b_turns(torch.Size((4000, 1, 8, 6)), tag).tolist()) == {0, 2}


def test_labelled_and_unlabelled_run_separate_passes():
    """main3D.py: model(labeled) and model(unlabeled) are separate calls, so BN normalises each with its own batch
    statistics (a joint pass would mix them)."""
    s = make()
    s.setup(10)
    s.train()
    calls = {1: [], 2: []}
    s.model.register_forward_pre_hook(lambda m, args: calls[1].append(len(args[0])))
    s.model2.register_forward_pre_hook(lambda m, args: calls[2].append(len(args[0])))
    batch = {"labeled": with_views(disc_batch(2, 0)), "unlabeled": with_views(disc_batch(3, 1, False))}
    out = s.training_step(batch, 0)
    assert calls == {1: [2, 3], 2: [2, 3]} and torch.isfinite(out.loss)
    # the labelled logits do not depend on the unlabelled images (they would through shared BN batch statistics)
    torch.manual_seed(0)
    first = s.training_step(batch, 0).logs["loss_s1"]
    other = {**batch, "unlabeled": with_views(disc_batch(3, 7, False))}
    torch.manual_seed(0)
    assert torch.allclose(s.training_step(other, 0).logs["loss_s1"], first)
