"""The strategy contract, run over every registered strategy (in the spirit of diffusers' ``ModelTesterMixin``).

For each strategy: its batch is built by the stage machinery from a tiny recipe (the streams its ``Requirements``
declare), then
- a plain-loop step runs and gives a finite loss; a Lightning fit of the same stage runs two steps;
- its whole training state is in ``state_dict``: a copy restored from it takes the same next step, bit for bit;
- a label put into its unlabelled stream (or an image into the mask stream) is refused;
- ``predict`` and ``export_inference`` give logits of the input's spatial shape and the class count;
- its named optimizers are exactly the keys of ``trainable_parameters()``.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe, tiny_recipe_3d, write_image_folder, write_nifti_folder
from label_efficient.context import DataContext, streams
from label_efficient.data import StepBatches
from label_efficient.optim import build_optimizers, optimizer_names
from label_efficient.planning import plan_stage
from label_efficient.recipe import parse_recipe
from label_efficient.strategies import STRATEGIES
from label_efficient.strategies.requirements import LabelLeakError
from test_augpaint import TINY as AUGPAINT
from test_cyclegan_pl import SMALL as CYCLEGAN

UNLABELLED = {"batch_size": {"labeled": 2, "unlabeled": 2}}
#: per strategy: the stage overrides of a tiny recipe on the disc folder (3D: the ball volumes)
STAGES = {
    "supervised": {},
    "mean_teacher": UNLABELLED,
    "bcp_pretrain": {},
    "bcp": UNLABELLED,
    "dsaif": {**UNLABELLED, "config": {"area_threshold": 5}},
    "desco": {"config": {"registration": "Rigid", "mc_passes": 2}},
    "cuts": {"batch_size": {"unlabeled": 2}},
    "contrastive_global": {"config": {"volumes": 1, "partitions": 2}},  # on ACDC volumes (partitions of slices)
    "contrastive_local": {"batch_size": {"unlabeled": 2}},
    "augpaint": {"batch_size": {"unlabeled": 2}, "config": AUGPAINT},
    "cyclegan_pseudo_labels": {"batch_size": {"unlabeled": 2}, "config": {**CYCLEGAN, "gan_steps": 1}},
    "sdc_uda_translate": {"batch_size": {"labeled": 1, "unlabeled": 1},
                          "config": {"width": 4, "dim": 8, "heads": 2, "disc_width": 4}},
    "sdc_uda_self_train": UNLABELLED,
    "bn_sfda": {"batch_size": {"unlabeled": 4}},
    "upl_sfda": {"batch_size": {"unlabeled": 4}},
}


def test_every_registered_strategy_is_covered():
    assert set(STAGES) == set(STRATEGIES.names())


def _recipe(name: str, root2d, root3d) -> dict:
    stage = {"strategy": name, "steps": 2, "val_every": 2, "select": "last", **STAGES[name]}
    if name == "desco":
        raw = tiny_recipe_3d(root3d, **stage)
        raw["data"]["annotation"] = {"kind": "slices", "axes": [2, 1]}
        raw["backbone"]["kwargs"]["dropout"] = 0.1
        return raw
    raw = tiny_recipe(root2d, **stage)
    req = STRATEGIES.get(name).requires
    if req.source_free:  # a source stage first: the adapter starts from its weights, on its own split
        raw["stages"] = [{"strategy": "supervised", "steps": 2, "val_every": 2}, {**raw["stages"][0],
                                                                                    "data": {"domain": "b"}}]
        raw["data"].update(domain="a", budget={"all": True})
    if "aux_masks" in req.streams:
        raw["data"]["aux_masks"] = {"kind": "shapes", "count": 4, "semi_axis": [0.17, 0.33]}
        raw["data"]["options"]["num_classes"] = 2
    if name.startswith("contrastive"):
        raw["backbone"] = {"name": "basic_unet", "kwargs": {"features": [4, 8, 8, 16, 16, 4]}}
    if name == "contrastive_global":  # volume-partition sampling needs volumes of several slices
        raw["data"] = {"dataset": "acdc", "image_size": [32, 32], "budget": {"all": True}}
    if req.labels == "none" and not req.source_free:
        raw["data"]["budget"] = {"all": True}
    return raw


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("contract")
    from conftest import write_two_domain_folder

    return {"2d": write_image_folder(base / "discs"), "two": write_two_domain_folder(base / "two"),
            "3d": write_nifti_folder(base / "balls"), "binary": write_image_folder(base / "binary", classes=2)}


def _root2d(name: str, roots):
    req = STRATEGIES.get(name).requires
    return roots["two"] if req.source_free else roots["binary"] if "aux_masks" in req.streams else roots["2d"]


def _stage(name: str, roots):
    req = STRATEGIES.get(name).requires
    recipe = parse_recipe(_recipe(name, _root2d(name, roots), roots["3d"]))
    plan = plan_stage(recipe, len(recipe.stages) - 1)
    ctx = DataContext.for_stage(plan, recipe.seed)
    spec = ctx.spec
    from label_efficient.checkpoints import build_model

    def make(seed: int):
        torch.manual_seed(seed)
        return plan.strategy(build_model(recipe, spec), spec.num_classes, plan.stage.config,
                             in_channels=spec.in_channels, spatial_dims=spec.spatial_dims)

    strategy = make(0)
    strategy.make_another = make
    batches = StepBatches(ctx.store, streams(plan, strategy, ctx, None, 0), 2, seed=1, patch_size=ctx.cfg.patch_size,
                          image_transform=strategy.image_transform(), target_transform=strategy.target_transform(),
                          annotation=_annotation(ctx))
    return recipe, plan, strategy, batches


def _annotation(ctx):
    from label_efficient.data.annotation import SliceAnnotation

    return SliceAnnotation(ctx.cfg.annotation) if ctx.cfg.annotation.kind == "slices" else None


def _step(strategy, batch, step: int):
    """One plain-loop step (the README's loop), optimizers bound when the strategy steps its own."""
    pairs = build_optimizers(strategy, plan_cfg(), total_steps=4)
    names = optimizer_names(strategy)
    if names:
        strategy.bind_optimizers({n: opt for n, (opt, _) in zip(names, pairs)})
        out = strategy.training_step(batch, step)
    else:
        out = strategy.training_step(batch, step)
        pairs[0][0].zero_grad()
        out.loss.backward()
        pairs[0][0].step()
    strategy.after_optimizer_step(step)
    return out


def _same(a, b) -> bool:
    """Equal tensors, or equal nested extra state (a replay pool's images, counters)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _losses(out) -> list[torch.Tensor]:
    """The step's loss (a strategy stepping several optimizers may report one per network)."""
    loss = out.loss
    return [v.detach() for v in (loss.values() if isinstance(loss, dict) else [loss])]


def plan_cfg():
    from label_efficient.recipe import OptimizerConfig

    return OptimizerConfig(name="adam", lr=1e-3, schedule="constant")


def _needs_shared(name: str):
    from conftest import SHARED

    return pytest.param(name, marks=pytest.mark.skipif(name == "contrastive_global" and not (SHARED / "acdc").is_dir(),
                                                        reason="needs shared/data/acdc"))


NAMES = [_needs_shared(n) for n in sorted(STAGES)]


@pytest.mark.parametrize("name", NAMES)
def test_plain_loop_step_and_state_round_trip(name, roots):
    _, plan, strategy, batches = _stage(name, roots)
    assert set(optimizer_names(strategy)) == set(plan.requires.optimizers)
    strategy.setup(total_steps=4)
    strategy.train()
    torch.manual_seed(1)
    assert all(torch.isfinite(v) for v in _losses(_step(strategy, batches[(0, 0)], 0)))
    twin = strategy.make_another(99)  # another initialisation, restored from the state dict alone
    twin.load_state_dict(strategy.state_dict())
    twin.train()
    twin.setup(total_steps=4)
    batch = batches[(0, 1)]
    outs = []
    for s in (strategy, twin):
        torch.manual_seed(2)
        outs.append(_losses(_step(s, batch, 1)))
    assert all(torch.equal(a, b) for a, b in zip(*outs)), name
    a, b = strategy.state_dict(), twin.state_dict()
    assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("name", NAMES)
def test_labels_never_reach_an_unlabelled_stream(name, roots):
    _, plan, strategy, batches = _stage(name, roots)
    batch = batches[(0, 0)]
    if "unlabeled" in batch:
        leaked = {**batch, "unlabeled": {**batch["unlabeled"],
                                         "label": torch.zeros(batch["unlabeled"]["image"].shape[:1] +
                                                              batch["unlabeled"]["image"].shape[2:]).long()}}
        with pytest.raises(LabelLeakError, match="unlabelled stream carries a 'label'"):
            strategy.training_step(leaked, 0)
        assert all("label" not in v for k, v in batch.items() if k == "unlabeled")
    if "aux_masks" in batch:
        with pytest.raises(LabelLeakError, match="unpaired"):
            strategy.training_step({**batch, "aux_masks": {**batch["aux_masks"], "image": batch["unlabeled"]["image"]}}, 0)
    if plan.requires.source_free:
        with pytest.raises(LabelLeakError, match="source-free"):
            strategy.training_step({**batch, "labeled": {"image": batch["unlabeled"]["image"]}}, 0)


@pytest.mark.parametrize("name", NAMES)
def test_predict_and_export_shapes(name, roots):
    recipe, plan, strategy, _ = _stage(name, roots)
    if not plan.evaluates:  # pre-training and generating stages hand on features or pairs, not a segmenter
        pytest.skip(f"{name} is a {plan.requires.role}")
    strategy.eval()
    spec = DataContext.for_stage(plan, recipe.seed).spec
    x = torch.rand(1, spec.in_channels, *([16] * 3 if spec.spatial_dims == 3 else [32, 32]))
    with torch.no_grad():
        logits = strategy.predict(x)
        exported = strategy.export_inference().eval()(x)
    for y in (logits, exported):
        assert y.shape == (1, strategy.num_classes, *x.shape[2:]), name


@pytest.mark.parametrize("name", ["supervised", "mean_teacher", "desco", "cyclegan_pseudo_labels", "bn_sfda"])
def test_a_lightning_fit_runs_two_steps(name, roots, tmp_path):
    """One strategy of each kind (plain, EMA teacher, several optimizers, GAN with masks, source-free) through the
    same Lightning module the runner uses."""
    from label_efficient.runner import run_recipe

    req = STRATEGIES.get(name).requires
    raw = _recipe(name, _root2d(name, roots), roots["3d"])
    m = run_recipe(parse_recipe(raw), tmp_path / "run")
    assert m["stages"][-1]["steps"] == 2 and m["stages"][-1]["strategy"] == name
    last = torch.load(tmp_path / "run" / f"stage{len(raw['stages']) - 1}_{name}" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * max(1, len(req.optimizers))
