import json
import math

import numpy as np
import pytest
import torch

from label_efficient.backbones import batchnorm_layers, build_backbone, get_head
from label_efficient.recipe import RecipeError, parse_recipe
from label_efficient.runner import run_recipe
from label_efficient.strategies import BNSFDA, UPLSFDA, LabelLeakError
from label_efficient.strategies.bn_sfda import NoBatchNormError
from label_efficient.strategies.upl_sfda import masked_dice_loss
from label_efficient.transforms.components import largest_component_mask

from conftest import sfda_recipe, write_two_domain_folder
from test_strategies import disc_batch


_TRAINED = {}


def source_model():
    """A small U-Net trained for a few steps on the source discs (cached; a fresh copy each call)."""
    import copy

    from label_efficient.strategies import Supervised
    from test_strategies import plain_loop

    if "model" not in _TRAINED:
        torch.manual_seed(0)
        s = Supervised(build_backbone("unet", 2, 1, 3, channels=[8, 16, 32]), 3)
        plain_loop(s, 25, lambda i: {"labeled": disc_batch(4, i)})
        _TRAINED["model"] = s.model
    return copy.deepcopy(_TRAINED["model"]).train()


def target_batch(n=4, seed=0):
    b = disc_batch(n, seed, with_label=False)
    return {"unlabeled": {"image": 1.0 - 0.6 * b["image"]}}  # shifted domain


# --- BN-SFDA -------------------------------------------------------------------------------------------
def test_bn_sfda_momentum_decays_with_time_constant():
    s = BNSFDA(source_model(), 3, eta0=0.1, tau=10)
    assert s.momentum(0) == pytest.approx(0.1) and s.momentum(10) == pytest.approx(0.1 / math.e)


def test_bn_sfda_statistics_move_to_target_and_source_is_a_copy():
    s = BNSFDA(source_model(), 3, tau=50)
    name, bn = batchnorm_layers(s.model)[0]
    src_mean = s._src("running_mean", name).clone()
    s.train()
    x = target_batch()
    out = s.training_step(x, 0)
    assert not torch.allclose(bn.running_mean, src_mean)  # low-order stats re-estimated (η_0 of the batch)
    assert torch.equal(s._src("running_mean", name), src_mean)  # the source copy is untouched
    with torch.no_grad():
        bn.weight.add_(1.0)
    assert not torch.equal(s._src("weight", name), bn.weight)
    assert out.logs["eta"] == pytest.approx(0.1)


def test_bn_sfda_anchor_and_transferability():
    s = BNSFDA(source_model(), 3)
    s.train()
    assert s.training_step(target_batch(), 0).logs["loss_hbs"] == 0  # T = S at the start
    name, bn = batchnorm_layers(s.model)[0]
    a = s.transferability(name, bn)
    assert a.sum().item() == pytest.approx(a.numel(), rel=1e-5)  # α sums to C_l
    with torch.no_grad():
        bn.running_mean[0] += 100.0  # channel 0 shifted a lot
        bn.bias.add_(0.5)
    a = s.transferability(name, bn)
    assert a[0] < a[1:].min()
    assert s.training_step(target_batch(), 1).logs["loss_hbs"] > 0


def test_bn_sfda_trains_bn_affine_only_by_default():
    s = BNSFDA(source_model(), 3)
    bn_params = {id(p) for _, m in batchnorm_layers(s.model) for p in (m.weight, m.bias)}
    assert {id(p) for p in s.trainable_parameters()} == bn_params
    s_all = BNSFDA(source_model(), 3, train_params="all")
    assert len(s_all.trainable_parameters()) == len(list(s_all.model.parameters()))


def test_bn_sfda_entropy_drives_and_anchor_holds():
    s = BNSFDA(source_model(), 3, entropy_weight=1.0)
    s.train()
    out = s.training_step(target_batch(4, 0), 0)
    out.loss.backward()  # T = S: the anchor has zero gradient, the entropy term moves γ/β
    assert any(m.weight.grad.abs().sum() > 0 for _, m in batchnorm_layers(s.model))
    opt = torch.optim.Adam(s.trainable_parameters(), lr=1e-2)
    for step in range(1, 30):
        out = s.training_step(target_batch(4, step), step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    name, bn = batchnorm_layers(s.model)[0]
    drift = (bn.weight - s._src("weight", name)).abs().max().item()
    assert 0 < drift < 0.1  # L1 anchor keeps γ near the source value (Adam steps of 1e-2)


def test_bn_sfda_needs_batchnorm():
    with pytest.raises(NoBatchNormError, match="InstanceNorm2d"):
        BNSFDA(build_backbone("unet", 2, 1, 3, channels=[8, 16], norm="instance"), 3)


def test_source_free_batches_refuse_labels():
    s = BNSFDA(source_model(), 3)
    with pytest.raises(LabelLeakError, match="source-free"):
        s.training_step({"labeled": disc_batch(2, 0), **target_batch()}, 0)


# --- UPL-SFDA ------------------------------------------------------------------------------------------
def test_upl_heads_cloned_from_source_head():
    model = source_model()
    head = get_head(model)
    s = UPLSFDA(model, 3)
    assert len(s.heads) == 4 and s.rotations == [1, 2, 3, 0]
    for h in s.heads:
        assert torch.equal(h.weight, head.weight) and h.weight is not head.weight
    exported = s.export_model()
    assert torch.equal(get_head(exported).weight, head.weight)
    assert exported(torch.rand(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_upl_rotation_heads_are_back_in_frame():
    s = UPLSFDA(source_model(), 3)
    s.eval()
    x = torch.rand(2, 1, 32, 32)
    probs = s.head_probs(x)
    # head 4 (no rotation) sees x itself; head 2 (180°) sees the rotated image, output rotated back
    assert torch.allclose(probs[3], s.heads[3](s.model(x)).softmax(1), atol=1e-6)
    rot = torch.rot90(s.heads[1](s.model(torch.rot90(x, 2, (2, 3)))).softmax(1), -2, (2, 3))
    assert torch.allclose(probs[1], rot, atol=1e-6)
    assert torch.allclose(s.predict(x).softmax(1), torch.stack(probs).mean(0), atol=1e-6)  # logits, as every predict


def test_upl_head_group_and_frozen_bn():
    s = UPLSFDA(source_model(), 3, bn_mode="frozen")
    groups = s.trainable_parameters()
    opt = torch.optim.Adam(groups, lr=1e-3)
    assert opt.param_groups[1]["betas"] == (0.5, 0.999) and opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in s.heads.parameters()}
    bn = batchnorm_layers(s.model)[0][1]
    before = bn.running_mean.clone()
    s.train()
    s.training_step(target_batch(), 0)
    assert not bn.training and torch.equal(bn.running_mean, before)  # frozen: statistics kept
    s2 = UPLSFDA(source_model(), 3)
    s2.train()
    s2.training_step(target_batch(), 0)
    assert not torch.equal(batchnorm_layers(s2.model)[0][1].running_mean, before)  # train mode: re-estimated


def test_masked_dice_counts_only_pseudo_labelled_pixels():
    p = torch.zeros(1, 2, 4, 4)
    p[:, 1] = 1.0
    p[:, 0] = 0.0
    y = torch.zeros(1, 2, 4, 4)
    y[0, 1, :2] = 1  # class 1 on the top half; nothing pseudo-labelled elsewhere
    # predicted class 1 everywhere: no penalty for the false positives outside Y (class 0 has no pixel)
    assert masked_dice_loss(p, y).item() == pytest.approx(0.0, abs=1e-4)
    assert masked_dice_loss(p, torch.zeros_like(y)).item() == pytest.approx(0.0, abs=1e-6)


def test_upl_threshold_leaving_no_pixel_is_finite():
    s = UPLSFDA(source_model(), 3, tau=1.0)
    s.train()
    out = s.training_step(target_batch(), 0)
    assert torch.isfinite(out.loss) and out.logs["pl_fraction"] == 0


def test_upl_per_class_thresholds():
    s = UPLSFDA(source_model(), 3, tau=[1.0, 0.0, 1.0], largest_component=False)  # only class 1 can pass
    s.train()
    out = s.training_step(target_batch(), 0)
    assert torch.isfinite(out.loss) and out.logs["pl_fraction"] > 0.99  # p > 0 for class 1 at every pixel
    with pytest.raises(ValueError, match="2 per-class thresholds for 3 classes"):
        UPLSFDA(source_model(), 3, tau=[0.9, 0.9])


def test_largest_component_mask():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, :2, :2] = 1
    m[0, 0, 4:8, 4:8] = 1
    out = largest_component_mask(m)
    assert out[0, 0, :2, :2].sum() == 0 and out[0, 0, 4:, 4:].sum() == 16


# --- the source -> target workflow ------------------------------------------------------------------------
@pytest.mark.parametrize("adapt", ["bn_sfda", "upl_sfda"])
def test_workflow_is_source_free(tmp_path, monkeypatch, adapt):
    import label_efficient.data.store as store_mod
    import label_efficient.stage as runner_mod  # the module that builds the stage batches

    root = write_two_domain_folder(tmp_path / "two")
    reads, streams = [], []
    real_read, real_sb = store_mod.read_mask_2d, runner_mod.StepBatches

    def spy_read(path):
        reads.append(str(path))
        return real_read(path)

    class SpyBatches(real_sb):
        def __init__(self, store, s, *a, **k):
            streams.append({name: [c.domain for c in st.cases] for name, st in s.items()})
            super().__init__(store, s, *a, **k)

    monkeypatch.setattr(store_mod, "read_mask_2d", spy_read)
    monkeypatch.setattr(runner_mod, "StepBatches", SpyBatches)
    m = run_recipe(parse_recipe(sfda_recipe(root, adapt)), tmp_path / "run")
    assert streams[1] == {"unlabeled": ["b"] * 8}  # stage 2: unlabelled target train images only
    target_train_masks = {f"b{i:02d}.png" for i in range(8)}
    assert not [r for r in reads if r.rsplit("/", 1)[-1] in target_train_masks]
    assert m["stages"][1]["best_score"] is None  # no selection on target labels
    assert set(m["cases"]) == {"b10", "b11"}  # evaluated on the target test split


def test_label_free_selection_reads_no_target_mask(tmp_path, monkeypatch):
    import label_efficient.data.store as store_mod

    root = write_two_domain_folder(tmp_path / "two")
    reads, real_read = [], store_mod.read_mask_2d
    monkeypatch.setattr(store_mod, "read_mask_2d", lambda path: reads.append(str(path)) or real_read(path))
    raw = sfda_recipe(root, "upl_sfda")
    raw["stages"][1]["select"] = "label_free"
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    read_names = {r.rsplit("/", 1)[-1] for r in reads}
    assert not read_names & {f"b{i:02d}.png" for i in range(10)}  # neither target train nor target val masks
    sdir = tmp_path / "run" / "stage1_upl_sfda"
    done = json.loads((sdir / "done.json").read_text())
    assert done["select"] == "label_free" and m["stages"][1]["select"] == "label_free"
    # candidates: the starting weights (initial.ckpt, "do not adapt") and every validated step; the best is kept
    lines = (sdir / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("val/label_free")
    logged = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    initial = json.loads((sdir / "initial.json").read_text())["score"]
    assert len(logged) == 2 and (sdir / "initial.ckpt").is_file()
    assert done["best_score"] == pytest.approx(max(logged + [initial]), abs=1e-6)
    assert done["best"] == ("initial.ckpt" if initial > max(logged) else "best.ckpt")


def test_recipe_rules_for_source_free_stages(tmp_path):
    root = write_two_domain_folder(tmp_path / "two")
    raw = sfda_recipe(root, "bn_sfda")
    raw["stages"][1]["data"]["budget"] = {"all": True}
    with pytest.raises(RecipeError, match="takes no target labels"):
        parse_recipe(raw)
    raw = sfda_recipe(root, "bn_sfda")
    raw["stages"][1]["data"]["domain"] = "a"
    with pytest.raises(RecipeError, match="source data must not reach a source-free stage"):
        parse_recipe(raw)
    raw = sfda_recipe(root, "upl_sfda")
    raw["stages"] = raw["stages"][1:]
    with pytest.raises(RecipeError, match="needs a source model"):
        parse_recipe(raw)


def test_selection_rules_keep_target_labels_out(tmp_path):
    root = write_two_domain_folder(tmp_path / "two")
    raw = sfda_recipe(root, "upl_sfda")
    raw["stages"][1]["select"] = "val_dice"
    with pytest.raises(RecipeError, match="stages.1.select: 'upl_sfda' trains without labels"):
        parse_recipe(raw)
    raw["stages"][1]["select"] = "label_free"
    raw["stages"][1]["data"]["val_split"] = None
    with pytest.raises(RecipeError, match="stages.1.select: label_free scores the val split"):
        parse_recipe(raw)
    raw["stages"][1]["select"] = "best"
    with pytest.raises(RecipeError, match="select"):
        parse_recipe(raw)
    r = parse_recipe(sfda_recipe(root, "upl_sfda"))
    assert [r.select(0), r.select(1)] == ["val_dice", "last"]


def test_checkpoint_with_other_class_count_is_refused(tmp_path):
    from label_efficient.lightning import CheckpointMismatchError

    root = write_two_domain_folder(tmp_path / "two")
    run_recipe(parse_recipe(sfda_recipe(root, "bn_sfda")), tmp_path / "src")
    raw = sfda_recipe(root, "bn_sfda")
    raw["stages"] = raw["stages"][1:]
    raw["stages"][0]["init"] = str(tmp_path / "src/model.pt")
    raw["data"]["options"]["num_classes"] = 4
    with pytest.raises(CheckpointMismatchError, match="num_classes=3"):
        run_recipe(parse_recipe(raw), tmp_path / "b")


def test_single_image_target(tmp_path):
    root = write_two_domain_folder(tmp_path / "two", n_per_domain=5)  # target train: 1 image
    m = run_recipe(parse_recipe(sfda_recipe(root, "upl_sfda")), tmp_path / "run")
    assert 0 <= m["mean_dice"] <= 1


def test_upl_model_pt_is_the_ensemble_the_run_tested(tmp_path):
    """``model.pt`` holds the K-head rotation ensemble: evaluating it reproduces the run's test Dice, ``predict``
    (with its OOD check) runs on it, and a later stage can start from its plain network."""
    from label_efficient.backbones.rotated_heads import RotatedHeads
    from label_efficient.cli import main
    from label_efficient.runner import load_bundle

    root = write_two_domain_folder(tmp_path / "two")
    out = tmp_path / "run"
    m = run_recipe(parse_recipe(sfda_recipe(root, "upl_sfda")), out)
    model, blob = load_bundle(out / "model.pt")
    assert isinstance(model, RotatedHeads) and len(model.heads) == 4 and blob["ood"] is not None
    assert main(["evaluate", str(out / "recipe.resolved.yaml"), "--model", str(out / "model.pt"),
                 "--output", str(tmp_path / "ev.json")]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["mean_dice"] == pytest.approx(m["mean_dice"], abs=1e-6)
    # the stage checkpoint evaluates as the same ensemble (its strategy rebuilt from the recipe)
    assert main(["evaluate", str(out / "recipe.resolved.yaml"), "--model", str(out / "stage1_upl_sfda/last.ckpt"),
                 "--output", str(tmp_path / "ev_ckpt.json")]) == 0
    assert json.loads((tmp_path / "ev_ckpt.json").read_text())["mean_dice"] == pytest.approx(m["mean_dice"], abs=1e-6)
    with pytest.raises(ValueError, match="checkpoint of stage 'upl_sfda', which recipe"):
        from label_efficient.runner import DataContext, load_for_evaluation

        other = parse_recipe(sfda_recipe(root, "bn_sfda"))
        load_for_evaluation(other, DataContext.build(other.stage_data(1), other.seed), out / "stage1_upl_sfda/last.ckpt")
    assert main(["predict", "--model", str(out / "model.pt"), "--input", str(root / "images"),
                 "--output", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred/ood_scores.csv").is_file()
    raw = sfda_recipe(root, "bn_sfda")
    raw["stages"] = raw["stages"][1:]
    raw["stages"][0]["init"] = str(out / "model.pt")
    run_recipe(parse_recipe(raw), tmp_path / "again")
    again = torch.load(tmp_path / "again/model.pt", weights_only=True)["state_dict"]
    plain = model.plain_network().state_dict()
    assert set(again) == set(plain)  # the plain network (body + unrotated head), not the ensemble


def _official_largest_component(image):
    """UPL-SFDA's ``get_largest_component`` rule (unet.py), re-written from reading it: scipy labelling with
    ``generate_binary_structure(ndim, 1)`` (face connectivity) on a 2D or 3D binary array; the largest by size
    (ties: the first label, where the official ``labeled_array == max_label`` would broadcast all tied labels)."""
    from scipy import ndimage

    if image.sum() == 0:
        return image
    lab, k = ndimage.label(image, ndimage.generate_binary_structure(image.ndim, 1))
    sizes = ndimage.sum(image, lab, range(1, k + 1))
    return (lab == np.argmax(sizes) + 1).astype(np.uint8)


@pytest.mark.parametrize("device_path", ["scipy", "torch"])
def test_largest_component_over_a_stacked_window_with_face_connectivity(device_path):
    from label_efficient.transforms.components import _largest_scipy, _largest_torch

    run = _largest_scipy if device_path == "scipy" else (lambda m, c: _largest_torch(m, connectivity=c))
    # a (10, 12, 12) window, one class: two blobs touching only along a diagonal, and a column across the slices
    w = np.zeros((10, 12, 12), np.uint8)
    w[0:3, 0:3, 0:3] = 1  # 27 voxels
    w[3:6, 3:6, 3:6] = 1  # 27 voxels, corner-touching the first: one 26-connected component of 54
    w[:, 8, 8] = 1  # 10 voxels
    w[2:10, 10, 0:4] = 1  # 32 voxels: the largest face-connected component
    m = torch.from_numpy(w)[None, None].float()
    ref = _official_largest_component(w)
    assert ref.sum() == 32
    assert np.array_equal(run(m, "face")[0, 0].numpy(), ref)
    assert run(m, "full")[0, 0].sum() == 54  # the full (26) rule differs here
    # random windows and 2D images: the same masks as the official rule
    rng = np.random.default_rng(0)
    for shape in [(10, 16, 16), (20, 20)]:
        for _ in range(5):
            x = (rng.random(shape) < 0.35).astype(np.uint8)
            got = run(torch.from_numpy(x)[None, None].float(), "face")[0, 0].numpy()
            assert np.array_equal(got, _official_largest_component(x))


def test_upl_keeps_the_face_connected_largest_component():
    s = UPLSFDA(source_model(), 3)
    assert s.config.connectivity == "face"
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0:3, 0:3] = 1  # 9 px
    m[0, 0, 3:5, 3:8] = 1  # 10 px, touching the first only at a corner
    assert largest_component_mask(m, "face")[0, 0].sum() == 10
    assert largest_component_mask(m)[0, 0].sum() == 19  # the default of the other users: full
