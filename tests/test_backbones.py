import pytest
import torch
from torch import nn

from label_efficient.backbones import (BACKBONES, FeatureTap, batchnorm_layers, build_backbone, get_head,
                                       set_head)

SMALL = {
    "unet": {"channels": [8, 16, 32]},
    "basic_unet": {"features": [8, 8, 16, 16, 32, 8]},
    "unet++": {"features": [8, 8, 16, 16, 32, 8]},
    "attention_unet": {"channels": [8, 16, 32]},
    "segresnet": {"init_filters": 8},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1]},
    "resunet++": {"features": [8, 16, 32], "aspp_rates": [1, 2, 3]},
}


def test_zoo_has_at_least_six():
    assert len(BACKBONES.names()) >= 6 and set(SMALL) <= set(BACKBONES.names())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_zoo_2d_forward_and_taps(name):
    model = build_backbone(name, 2, 1, 3, **SMALL[name])
    x = torch.randn(2, 1, 64, 64)
    with FeatureTap(model) as tap:
        y = model(x)
    assert y.shape == (2, 3, 64, 64)
    assert tap["bottleneck"].shape[0] == 2 and tap["bottleneck"].shape[-1] < 64
    assert tap["decoder"].shape[-2:] == (64, 64)
    head = get_head(model)
    assert isinstance(head, nn.Conv2d) and head.out_channels == 3
    assert torch.allclose(head(tap["decoder"]), y, atol=1e-5)


@pytest.mark.parametrize("name", ["unet", "basic_unet", "segresnet", "resunet++"])
def test_zoo_3d_forward(name):
    model = build_backbone(name, 3, 1, 2, **SMALL[name])
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_basic_unet_is_the_ssl4mis_unet():
    """Max-pool down, two convs per level, encoder dropout 0.05…0.5 (first conv of each level), none in the decoder;
    1.8 M parameters at 16…256 channels like SSL4MIS's U-Net."""
    model = build_backbone("basic_unet", 2, 1, 4)
    assert 1.7e6 < sum(p.numel() for p in model.parameters()) < 1.9e6
    drops = {n: m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}
    assert list(drops.values()) == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert all("upcat" not in n for n in drops)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), model(x))  # eval: dropout off
    with pytest.raises(ValueError, match="one p per encoder level"):
        build_backbone("basic_unet", 2, 1, 4, dropout=[0.1, 0.2])


def test_channels_last_keeps_outputs_and_reaches_copies():
    import copy

    from label_efficient.utils import use_channels_last

    torch.manual_seed(0)
    model = build_backbone("basic_unet", 2, 1, 3, features=[8, 8, 16, 16, 32, 8]).eval()
    x = torch.randn(2, 1, 32, 32)
    ref = model(x)
    use_channels_last(model)
    out = model(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5)
    assert copy.deepcopy(model)(x).is_contiguous(memory_format=torch.channels_last)  # an EMA teacher keeps it
    model.load_state_dict(build_backbone("basic_unet", 2, 1, 3, features=[8, 8, 16, 16, 32, 8]).state_dict())
    assert model(x).is_contiguous(memory_format=torch.channels_last)


def test_batchnorm_layers_found():
    assert len(batchnorm_layers(build_backbone("unet", 2, 1, 2, channels=[8, 16]))) > 0
    assert batchnorm_layers(build_backbone("unet", 2, 1, 2, channels=[8, 16], norm="instance")) == []


def test_set_head_replaces_module():
    model = build_backbone("unet", 2, 1, 2, channels=[8, 16])
    new = nn.Conv2d(8, 2, 1)
    set_head(model, new)
    assert get_head(model) is new


class UserNet(nn.Module):
    def __init__(self, spatial_dims=2, in_channels=1, num_classes=2, width=4):
        super().__init__()
        self.enc = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.out(torch.relu(self.enc(x)))


def test_user_module_by_dotted_path_and_tap_points():
    model = build_backbone("test_backbones.UserNet", 2, 1, 3, tap_points={"head": "out", "bottleneck": "enc"}, width=5)
    with FeatureTap(model) as tap:
        model(torch.randn(1, 1, 8, 8))
    assert tap["bottleneck"].shape == (1, 5, 8, 8) and get_head(model) is model.out
    with pytest.raises(KeyError, match="does not have"):
        FeatureTap(model, {"head": "outt"})


def test_unknown_backbone_suggests():
    with pytest.raises(KeyError, match="Did you mean 'unet'"):
        build_backbone("unett")


def test_dimension_and_stride_errors():
    model = build_backbone("unet", 3, 1, 2, channels=[8, 16, 32])
    with pytest.raises(ValueError, match="3D network got a tensor of shape"):
        model(torch.randn(1, 1, 32, 32))
    model2d = build_backbone("unet", 2, 1, 2, channels=[8, 16, 32])
    with pytest.raises(ValueError, match="not divisible by the network stride 4"):
        model2d(torch.randn(1, 1, 30, 32))
