"""Backbone zoo: MONAI networks (and ours) as plain ``nn.Module`` segmenters with tap points.

Every zoo model is ``SegmentationNet(body, head)``: ``body`` maps the image to a full-resolution
feature map, ``head`` is a 1×1 convolution to class logits. This uniform split is what lets
strategies clone or perturb the head (UPL-SFDA) and read decoder features (contrastive, OOD).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


class SegmentationNet(nn.Module):
    """``head(body(x))`` with declared tap points and the stride the input must be divisible by."""

    def __init__(self, body: nn.Module, head: nn.Module, bottleneck: str, stride: int):
        super().__init__()
        self.spatial_dims = 2 if isinstance(head, nn.Conv2d) else 3
        self.body = body
        self.head = head
        self.stride = stride
        self.tap_points = {"bottleneck": f"body.{bottleneck}" if bottleneck else "body", "head": "head"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"a {self.spatial_dims}D network got a tensor of shape {tuple(x.shape)}; expected "
                f"(N, C, {', '.join('DHW'[3 - self.spatial_dims:])}). Build the backbone with spatial_dims={x.ndim - 2}"
                " for this data"
            )
        bad = [s for s in x.shape[2:] if s % self.stride]
        if bad:
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} is not divisible by the network stride {self.stride}; "
                "pad it (label_efficient.evaluation.pad_to_multiple) or resize it"
            )
        out = self.body(x)
        if isinstance(out, (list, tuple)):  # e.g. UNet++ returns a list of outputs
            out = out[-1]
        return self.head(out)


def _conv1x1(spatial_dims: int, cin: int, cout: int) -> nn.Module:
    return (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(cin, cout, kernel_size=1)


def _deepest_skip(module: nn.Module, prefix: str = "") -> str:
    """Name of the innermost block of a MONAI ``UNet``/``AttentionUnet`` (its bottleneck)."""
    from monai.networks.layers.simplelayers import SkipConnection

    best = ""
    for name, m in module.named_modules():
        if isinstance(m, SkipConnection) and len(name) > len(best):
            best = name
    return f"{best}.submodule" if best else ""


@BACKBONES.register("unet")
def unet(spatial_dims, in_channels, num_classes, channels: Sequence[int] = (16, 32, 64, 128, 256),
         num_res_units: int = 0, norm: str = "batch", dropout: float = 0.0, **kw) -> nn.Module:
    """MONAI ``UNet`` (Ronneberger 2015 / Kerfoot 2018). ``num_res_units=0`` is 2.5× faster on CPU."""
    from monai.networks.nets import UNet

    body = UNet(spatial_dims, in_channels, channels[0], channels=tuple(channels), strides=(2,) * (len(channels) - 1),
                num_res_units=num_res_units, norm=norm, dropout=dropout, **kw)
    return SegmentationNet(body, _conv1x1(spatial_dims, channels[0], num_classes), _deepest_skip(body),
                           2 ** (len(channels) - 1))


#: SSL4MIS/BCP U-Net encoder dropout, one p per level (shallow → deep); the decoder has none
SSL4MIS_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


@BACKBONES.register("basic_unet")
def basic_unet(spatial_dims, in_channels, num_classes, features: Sequence[int] = (16, 32, 64, 128, 256, 16),
               norm: str = "batch", dropout: float | Sequence[float] = SSL4MIS_DROPOUT, negative_slope: float = 0.01,
               upsample: str = "nontrainable", **kw) -> nn.Module:
    """MONAI ``BasicUNet`` set up as the U-Net of SSL4MIS/BCP/UniMatch (Ronneberger 2015): max-pool down, two
    3×3 conv + BN + LeakyReLU(0.01) per level, 1×1 conv + bilinear up, 16…256 channels, encoder dropout
    0.05…0.5 (a float applies one p to every block, encoder and decoder). Strong at few labels."""
    from monai.networks.nets import BasicUNet

    per_level = isinstance(dropout, (list, tuple))
    if per_level and len(dropout) != 5:
        raise ValueError(f"basic_unet: dropout takes one p per encoder level (5), got {list(dropout)}")
    body = BasicUNet(spatial_dims, in_channels, num_classes, features=tuple(features), norm=norm,
                     act=("LeakyReLU", {"negative_slope": negative_slope, "inplace": True}),
                     dropout=0.0 if per_level else dropout, upsample=upsample, **kw)
    if per_level:  # SSL4MIS ConvBlock: conv-BN-act-dropout-conv-BN-act (dropout commutes with LeakyReLU)
        for level, p in zip(("conv_0", "down_1.convs", "down_2.convs", "down_3.convs", "down_4.convs"), dropout):
            body.get_submodule(level).conv_0.adn.D.p = float(p)
    head, body.final_conv = body.final_conv, nn.Identity()
    net = SegmentationNet(body, head, "down_4", 16)
    encoder = ["conv_0", "down_1", "down_2", "down_3", "down_4"]
    net.tap_points.update({f"encoder_{i + 1}": f"body.{n}" for i, n in enumerate(encoder)})
    net.tap_points.update({f"decoder_{i + 1}": f"body.upcat_{4 - i}" for i in range(4)})
    return net


@BACKBONES.register("cuts_cnn")
def cuts_cnn(spatial_dims, in_channels, num_classes, features: Sequence[int] = (16, 32, 64, 128),
             kernel_size: int = 5) -> nn.Module:
    """The CUTS pixel embedder (Liu et al., MICCAI 2024): ``len(features)`` × [conv k×k 'same' with replicate
    padding → BN → LeakyReLU], never downsampling, so the head's input (tap ``decoder``) is an embedding per pixel."""
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    layers, c = [], in_channels
    for f in features:
        layers += [conv(c, f, kernel_size, padding=kernel_size // 2, padding_mode="replicate"), bn(f), nn.LeakyReLU()]
        c = f
    return SegmentationNet(nn.Sequential(*layers), conv(c, num_classes, 1), "", 1)


@BACKBONES.register("unet++")
def unet_plus_plus(spatial_dims, in_channels, num_classes, features: Sequence[int] = (16, 32, 64, 128, 256, 16),
                   norm: str = "batch", dropout: float = 0.0, **kw) -> nn.Module:
    """MONAI ``BasicUNetPlusPlus`` (Zhou et al. 2018), last output."""
    from monai.networks.nets import BasicUNetPlusPlus

    body = BasicUNetPlusPlus(spatial_dims, in_channels, features[-1], features=tuple(features),
                             norm=norm, dropout=dropout, **kw)
    return SegmentationNet(body, _conv1x1(spatial_dims, features[-1], num_classes), "conv_4_0", 16)


@BACKBONES.register("attention_unet")
def attention_unet(spatial_dims, in_channels, num_classes, channels: Sequence[int] = (16, 32, 64, 128, 256),
                   dropout: float = 0.0, **kw) -> nn.Module:
    """MONAI ``AttentionUnet`` (Oktay et al. 2018); batch norm."""
    from monai.networks.nets import AttentionUnet

    body = AttentionUnet(spatial_dims, in_channels, channels[0], channels=tuple(channels),
                         strides=(2,) * (len(channels) - 1), dropout=dropout, **kw)
    bottleneck = max((n for n, _ in body.named_modules() if n.endswith(".submodule")), key=len, default="")
    return SegmentationNet(body, _conv1x1(spatial_dims, channels[0], num_classes), bottleneck,
                           2 ** (len(channels) - 1))


@BACKBONES.register("segresnet")
def segresnet(spatial_dims, in_channels, num_classes, init_filters: int = 16, norm: str = "batch", **kw) -> nn.Module:
    """MONAI ``SegResNet`` (Myronenko 2018); batch norm by default so BN adaptation applies."""
    from monai.networks.nets import SegResNet

    body = SegResNet(spatial_dims, init_filters, in_channels, init_filters, norm=norm, **kw)
    depth = len(body.down_layers) - 1
    return SegmentationNet(body, _conv1x1(spatial_dims, init_filters, num_classes), f"down_layers.{depth}", 2 ** depth)


@BACKBONES.register("swin_unetr")
def swin_unetr(spatial_dims, in_channels, num_classes, feature_size: int = 12, **kw) -> nn.Module:
    """MONAI ``SwinUNETR`` (Hatamizadeh et al. 2022), trained from scratch (no hub weights)."""
    from monai.networks.nets import SwinUNETR

    body = SwinUNETR(in_channels=in_channels, out_channels=feature_size, feature_size=feature_size,
                     spatial_dims=spatial_dims, **kw)
    return SegmentationNet(body, _conv1x1(spatial_dims, feature_size, num_classes), "encoder10", 32)


@BACKBONES.register("resunet++")
def resunet_plus_plus(spatial_dims, in_channels, num_classes, **kw) -> nn.Module:
    """ResUNet++ (Jha et al. 2019): residual blocks, squeeze-excitation, ASPP, attention. Ours."""
    from .resunetpp import ResUNetPlusPlus

    net = ResUNetPlusPlus(spatial_dims, in_channels, num_classes, **kw)
    net.tap_points = {"bottleneck": "bottleneck", "head": "head"}
    net.stride = 2 ** (len(kw.get("features", (16, 32, 64, 128, 256))) - 1)
    return net


def _import(path: str) -> Any:
    module, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise KeyError(f"cannot import backbone '{path}': {e}") from e


def build_backbone(name: str | nn.Module, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2,
                   tap_points: dict[str, str] | None = None, **kwargs) -> nn.Module:
    """Build a zoo backbone by name, import a user class by dotted path, or accept an ``nn.Module``.

    A dotted path (``my_pkg.nets:MyNet`` or ``my_pkg.nets.MyNet``) is called with
    ``spatial_dims, in_channels, num_classes`` only if it accepts them, else with ``**kwargs`` alone.
    ``tap_points`` names the modules of a user model (``{"head": ..., "bottleneck": ...}``).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if isinstance(name, nn.Module):
        model = name
    elif "." in name or ":" in name:
        cls = _import(name)
        try:
            model = cls(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kwargs)
        except TypeError:
            model = cls(**kwargs)
    else:
        model = BACKBONES.get(name)(spatial_dims, in_channels, num_classes, **kwargs)
    if tap_points:
        model.tap_points = {**getattr(model, "tap_points", {}), **tap_points}
    return model
