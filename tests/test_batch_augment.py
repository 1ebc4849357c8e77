"""The kornia strong view: per-sample, photometric only (geometry kept), identity at p = 0, 2D only."""
import pytest
import torch

from label_efficient.backbones import build_backbone
from label_efficient.data.batch_augment import StrongIntensity
from label_efficient.strategies import MeanTeacher

from test_strategies import disc_batch


def test_strong_view_is_per_sample_and_keeps_geometry():
    torch.manual_seed(0)
    x = torch.zeros(6, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0  # the same square in every sample
    y = StrongIntensity(noise_std=0.0, blur_sigma=(0.1, 0.1))(x)  # no noise, (near-)no blur: pure intensity maps
    assert y.shape == x.shape
    assert not torch.allclose(y[0], y[1]), "samples must draw their own parameters"
    for s in range(6):  # a monotone intensity map keeps the square brighter than the background everywhere
        inside, outside = y[s, 0, 10:22, 10:22], torch.cat([y[s, 0, :6].flatten(), y[s, 0, 26:].flatten()])
        assert inside.min() > outside.max()


def test_strong_view_identity_at_p0_and_2d_only():
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(StrongIntensity(p=0.0)(x), x)
    with pytest.raises(ValueError, match="2D batches"):
        StrongIntensity()(torch.rand(1, 1, 8, 8, 8))


def test_mean_teacher_student_sees_the_strong_view():
    torch.manual_seed(0)
    s = MeanTeacher(build_backbone("unet", 2, 1, 3, channels=[8, 16]), 3, student_view="strong")
    seen = []
    s.model.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    batch = {"labeled": disc_batch(2, 0), "unlabeled": disc_batch(2, 1, False)}
    s.train()
    s.training_step(batch, 0)
    assert torch.equal(seen[0][:2], batch["labeled"]["image"])  # labelled part untouched
    assert not torch.allclose(seen[0][2:], batch["unlabeled"]["image"])  # unlabelled part: strong view
