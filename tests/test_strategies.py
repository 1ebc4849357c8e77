import math

import pytest
import torch

from label_efficient.backbones import build_backbone
from label_efficient.losses import sigmoid_rampup, weighted_dice
from label_efficient.strategies import STRATEGIES, LabelLeakError, MeanTeacher, Supervised, build_strategy
from label_efficient.strategies.ema import ema_update

from conftest import disc_image


def disc_batch(n, seed, with_label=True):
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = [disc_image(rng, 32) for _ in range(n)]
    x = torch.tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)[:, None] / 255
    y = torch.tensor(np.stack([p[1] for p in pairs]), dtype=torch.long)
    return {"image": x, "label": y} if with_label else {"image": x}


def plain_loop(strategy, steps, make_batch):
    """The README's plain PyTorch loop."""
    opt = torch.optim.Adam(strategy.trainable_parameters(), lr=0.01)
    strategy.setup(steps)
    strategy.train()
    losses = []
    for step in range(steps):
        out = strategy.training_step(make_batch(step), step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        strategy.after_optimizer_step(step)
        losses.append(out.loss.item())
    return losses


def test_registry_names_strategies():
    assert {"supervised", "mean_teacher"} <= set(STRATEGIES.names())
    with pytest.raises(KeyError, match="Did you mean 'mean_teacher'"):
        STRATEGIES.get("mean-teacherr")


def test_supervised_plain_loop_loss_decreases():
    torch.manual_seed(0)
    s = Supervised(build_backbone("unet", 2, 1, 3, channels=[8, 16, 32]), 3)
    losses = plain_loop(s, 30, lambda i: {"labeled": disc_batch(4, i)})
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_ema_update_exact_and_in_place():
    a = torch.nn.BatchNorm1d(3)
    b = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(3.0)
        b.running_mean.fill_(2.0)
        b.num_batches_tracked.fill_(5)
    w = a.weight
    ema_update(a, b, 0.9)
    assert a.weight is w  # in place: the teacher's tensors are updated, not rebound
    assert torch.allclose(a.weight, torch.full((3,), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(a.running_mean, torch.full((3,), 0.1 * 2.0))
    assert a.num_batches_tracked.item() == 5


def test_mean_teacher_teacher_tracks_student():
    torch.manual_seed(0)
    s = MeanTeacher(build_backbone("unet", 2, 1, 3, channels=[8, 16, 32]), 3, ema_decay=0.9)
    t0 = [p.clone() for p in s.teacher.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(t0, s.model.parameters()))
    losses = plain_loop(s, 20, lambda i: {"labeled": disc_batch(2, i), "unlabeled": disc_batch(2, 100 + i, False)})
    moved = sum((a - b).abs().sum().item() for a, b in zip(s.teacher.parameters(), t0))
    assert moved > 0, "EMA teacher did not move"
    dist_t = sum((a - b).norm().item() for a, b in zip(s.teacher.parameters(), s.model.parameters()))
    dist_0 = sum((a - b).norm().item() for a, b in zip(t0, s.model.parameters()))
    assert dist_t < dist_0, "teacher is not closer to the student than its initialisation"
    assert all(not p.requires_grad for p in s.teacher.parameters())
    assert not any(p is q for p in s.trainable_parameters() for q in s.teacher.parameters())
    assert losses[-1] < losses[0]


def test_mean_teacher_rampup_and_logs():
    s = MeanTeacher(build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3, consistency=0.1)
    s.setup(100)
    assert s.consistency_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert s.consistency_weight(100) == pytest.approx(0.1)
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    out = s.training_step({"labeled": disc_batch(2, 0), "unlabeled": disc_batch(2, 1, False)}, 0)
    assert {"loss_sup", "loss_cons", "w_cons"} <= set(out.logs)


@pytest.mark.parametrize("eval_mode", [False, True])
def test_mean_teacher_bn_mode_of_teacher(eval_mode):
    """Default (SSL4MIS): the teacher normalises its noisy input with batch statistics, even in an eval-mode loop."""
    s = MeanTeacher(build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3, teacher_eval_mode=eval_mode)
    seen = []
    s.teacher.register_forward_hook(lambda m, i, o: seen.append(m.training))
    s.eval()
    s.training_step({"labeled": disc_batch(2, 0), "unlabeled": disc_batch(2, 1, False)}, 0)
    assert seen == [not eval_mode]


def test_mean_teacher_separate_student_passes():
    s = MeanTeacher(build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3, student_passes="separate")
    sizes = []
    s.model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    s.train()
    out = s.training_step({"labeled": disc_batch(2, 0), "unlabeled": disc_batch(3, 1, False)}, 0)
    assert sizes == [2, 3] and torch.isfinite(out.loss)


def test_label_leak_and_missing_stream():
    s = build_strategy("mean_teacher", build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3)
    with pytest.raises(LabelLeakError):
        s.training_step({"labeled": disc_batch(2, 0), "unlabeled": disc_batch(2, 1)}, 0)
    with pytest.raises(KeyError, match="needs an 'unlabeled' stream"):
        s.training_step({"labeled": disc_batch(2, 0)}, 0)


def test_config_typo_is_an_error():
    with pytest.raises(Exception, match="ema_decy"):
        MeanTeacher(build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3, ema_decy=0.9)


def test_weighted_dice_ignores_zero_weight_pixels():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1, :, :2] = 10  # predicts class 1 on the left half
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, :, :2] = 1
    right_wrong = target.clone()
    right_wrong[:, :, 2:] = 1  # wrong labels only where the weight is zero
    w = torch.zeros(1, 4, 4)
    w[:, :, :2] = 1
    assert weighted_dice(logits, target, w).item() == pytest.approx(weighted_dice(logits, right_wrong, w).item())
    assert weighted_dice(logits, right_wrong, torch.ones(1, 4, 4)).item() > weighted_dice(logits, target, w).item()


def test_readme_plain_loop_runs():
    """The README's own-loop example, executed as written (needs the ACDC data)."""
    import re
    from pathlib import Path

    from conftest import SHARED

    if not (SHARED / "acdc").is_dir():
        pytest.skip("shared/data/acdc not present")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "training_step" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 4, 128, 128)
    assert torch.isfinite(scope["out"].loss)


def test_mean_teacher_ema_averages_parameters_only_and_teacher_bn_follows_its_own_inputs():
    """SSL4MIS ``update_ema_variables``: ema_param ← α·ema_param + (1 − α)·param over ``parameters()`` only; its
    ema_model stays in train mode, so its BN running statistics move with its own (noisy) forwards and never see
    the student's."""
    import copy

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 1))
    s = MeanTeacher(net, 3, ema_decay=0.9)
    s.setup(10)
    s.train()
    opt = torch.optim.SGD(s.trainable_parameters(), lr=0.1)
    seen = []
    s.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    before = copy.deepcopy(s.teacher)
    batch = {"labeled": disc_batch(2, 0), "unlabeled": disc_batch(2, 1, False)}
    out = s.training_step(batch, 0)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    # the reference: the pre-step teacher run once in train mode on the input it was given (SSL4MIS ema_model(x_u + ξ))
    with torch.no_grad():
        before.train()(seen[0])
    buffers = [b.clone() for b in s.teacher.buffers()]
    for t, r in zip(buffers, before.buffers()):
        assert torch.equal(t, r)
    t_params = [p.clone() for p in s.teacher.parameters()]
    s.after_optimizer_step(0)
    for t, t0, p in zip(s.teacher.parameters(), t_params, s.model.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * p, atol=1e-7)
    for t, b in zip(s.teacher.buffers(), buffers):  # the EMA leaves BN statistics alone
        assert torch.equal(t, b)
    assert not torch.allclose(s.teacher[1].running_mean, s.model[1].running_mean)
    # an eval-mode teacher (beyond SSL4MIS) has no forward that updates them: it averages the student's
    e = MeanTeacher(copy.deepcopy(net), 3, ema_decay=0.9, teacher_eval_mode=True)
    with torch.no_grad():
        e.model[1].running_mean.fill_(1.0)
    e.after_optimizer_step(0)
    assert torch.allclose(e.teacher[1].running_mean, 0.9 * net[1].running_mean + 0.1)


def test_acdc_mean_teacher_recipe_decays_the_lr_as_ssl4mis():
    from pathlib import Path

    from label_efficient.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "acdc_mean_teacher.yaml")
    opt = recipe.stages[0].optimizer
    assert (opt.name, opt.lr, opt.schedule, opt.poly_power) == ("sgd", 0.01, "poly", 0.9)


def test_module_logs_only_the_steps_lightning_writes_and_the_same_values(tmp_path, monkeypatch):
    """``StrategyModule`` calls ``self.log`` only where Lightning writes (every ``log_every_n_steps``): the CSV log
    equals the one from logging every step."""
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from label_efficient.lightning import StrategyModule
    from label_efficient.recipe import OptimizerConfig

    batches = [{"labeled": disc_batch(2, seed)} for seed in range(8)]

    def fit(name):
        torch.manual_seed(0)
        s = build_strategy("supervised", build_backbone("unet", 2, 1, 3, channels=[4, 8]), 3)
        module = StrategyModule(s, OptimizerConfig(name="adam", lr=1e-3), 8)
        trainer = pl.Trainer(accelerator="cpu", max_steps=8, logger=CSVLogger(tmp_path, name=name),
                             log_every_n_steps=3, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        with open(next((tmp_path / name).rglob("metrics.csv"))) as f:
            return list(csv.DictReader(f))

    gated = fit("gated")
    monkeypatch.setattr(StrategyModule, "_writes_logs", lambda self: True)
    every = fit("every")
    assert [r["step"] for r in gated] == ["2", "5"] and gated == every
