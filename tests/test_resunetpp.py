"""Tests for label_efficient.backbones.resunetpp (ResUNet++, Jha et al. 2019)."""

import pytest
import torch
from torch import nn

from label_efficient.backbones.resunetpp import ResUNetPlusPlus

# Measured: 2D default (in=1, out=1) has 6,497,375 parameters; 3D default 19,072,895.
PARAMS_2D_DEFAULT_RANGE = (6.0e6, 7.0e6)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_output_shape_2d():
    torch.manual_seed(0)
    net = ResUNetPlusPlus(2, 1, 3).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 64, 64))
    assert y.shape == (1, 3, 64, 64)
    assert torch.isfinite(y).all()


def test_output_shape_3d():
    torch.manual_seed(0)
    net = ResUNetPlusPlus(3, 1, 2).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 1, 32, 32, 32))
    assert y.shape == (1, 2, 32, 32, 32)
    assert torch.isfinite(y).all()


def test_gradient_reaches_first_conv():
    torch.manual_seed(0)
    net = ResUNetPlusPlus(2, 1, 1)
    net(torch.randn(2, 1, 32, 32)).square().mean().backward()
    first_conv = net.stem.body[0]
    assert isinstance(first_conv, nn.Conv2d)
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


def _disc_batch(n: int, size: int, gen: torch.Generator):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy = torch.randint(size // 4, 3 * size // 4, (n, 1, 1), generator=gen)
    cx = torch.randint(size // 4, 3 * size // 4, (n, 1, 1), generator=gen)
    r = torch.randint(size // 8, size // 4, (n, 1, 1), generator=gen)
    mask = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2).float().unsqueeze(1)
    img = mask + 0.3 * torch.randn(mask.shape, generator=gen)
    return img, mask


def test_overfits_tiny_disc_task():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    img, mask = _disc_batch(4, 32, gen)
    # Reduced widths/rates keep this test ~1 s on one thread; same block structure as default.
    net = ResUNetPlusPlus(2, 1, 1, features=(8, 16, 32, 64), aspp_rates=(1, 2, 3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(net(img), mask)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], min(losses[-3:])
    assert last < 0.5 * first, f"loss did not drop enough: {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("spatial_dims,shape", [(2, (1, 1, 40, 64)), (3, (1, 1, 16, 16, 20))])
def test_indivisible_size_raises(spatial_dims, shape):
    net = ResUNetPlusPlus(spatial_dims, 1, 1)
    with pytest.raises(ValueError) as exc:
        net(torch.zeros(shape))
    msg = str(exc.value)
    assert str(tuple(shape[2:])) in msg  # names the offending size
    assert "16" in msg  # names the required multiple 2**(5-1)


def test_wrong_ndim_raises():
    with pytest.raises(ValueError, match="expects a 4D input"):
        ResUNetPlusPlus(2, 1, 1)(torch.zeros(1, 1, 16, 16, 16))


def test_named_attributes_and_norm_types():
    net2 = ResUNetPlusPlus(2, 1, 4)
    assert isinstance(net2.head, nn.Conv2d)
    assert net2.head.in_channels == 16 and net2.head.out_channels == 4
    assert net2.head.kernel_size == (1, 1)
    assert isinstance(net2.bottleneck, nn.Module)
    names = dict(net2.named_modules())
    assert names["head"] is net2.head and names["bottleneck"] is net2.bottleneck
    assert any(isinstance(m, nn.BatchNorm2d) for m in net2.modules())

    net3 = ResUNetPlusPlus(3, 1, 2, norm="instance")
    assert isinstance(net3.head, nn.Conv3d)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net3.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in net3.modules())

    with pytest.raises(ValueError, match="norm"):
        ResUNetPlusPlus(2, 1, 1, norm="group")


def test_feature_taps_by_name():
    """Forward hooks on `bottleneck` and `head` see the bridge output and the last decoder
    feature map (the input of `head`)."""
    net = ResUNetPlusPlus(2, 1, 2).eval()
    seen = {}
    net.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("bottleneck", o))
    net.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head_in", i[0]))
    with torch.no_grad():
        net(torch.randn(1, 1, 64, 64))
    assert seen["bottleneck"].shape == (1, 256, 4, 4)
    assert seen["head_in"].shape == (1, 16, 64, 64)


def test_param_count_2d_default():
    n = _n_params(ResUNetPlusPlus(2, 1, 1))
    print(f"ResUNetPlusPlus 2D default params: {n:,}")
    lo, hi = PARAMS_2D_DEFAULT_RANGE
    assert lo < n < hi, n


def test_custom_features_and_rates():
    net = ResUNetPlusPlus(2, 2, 1, features=(8, 16, 32), aspp_rates=(2, 4)).eval()
    assert len(net.bottleneck.branches) == 3  # rate 1 + two atrous rates
    with torch.no_grad():
        assert net(torch.randn(2, 2, 12, 20)).shape == (2, 1, 12, 20)  # multiple of 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 2, 12, 18))
