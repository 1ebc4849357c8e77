"""ResUNet++ for 2D and 3D segmentation.

Reference:
    D. Jha, P. H. Smedsrud, M. A. Riegler, D. Johansen, T. de Lange, P. Halvorsen,
    H. D. Johansen. "ResUNet++: An Advanced Architecture for Medical Image
    Segmentation." IEEE International Symposium on Multimedia (ISM), 2019.
    arXiv:1911.07067.

Independent re-implementation (no official code copied); dims-agnostic through
MONAI's ``Conv`` / ``Norm`` / ``Pool`` factories.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from torch import nn

__all__ = [
    "ResUNetPlusPlus",
    "StemBlock",
    "ResidualBlock",
    "SqueezeExcitation",
    "ASPP",
    "AttentionBlock",
    "DecoderStage",
]

_NORMS = {"batch": Norm.BATCH, "instance": Norm.INSTANCE}


def _norm(norm: str, dims: int, ch: int) -> nn.Module:
    """``nn.BatchNormNd`` (norm="batch") or affine ``nn.InstanceNormNd`` (norm="instance")."""
    if norm == "instance":
        return Norm[Norm.INSTANCE, dims](ch, affine=True)
    return Norm[Norm.BATCH, dims](ch)


def _conv(dims: int, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1,
          bias: bool = True) -> nn.Module:
    """``nn.ConvNd`` with 'same' padding for odd kernels (for stride 1)."""
    return Conv[Conv.CONV, dims](cin, cout, k, stride=stride, padding=dilation * (k - 1) // 2,
                                 dilation=dilation, bias=bias)


def _pre_act_conv(dims: int, norm: str, cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Pre-activation unit: Norm -> ReLU -> 3^d conv."""
    return nn.Sequential(_norm(norm, dims, cin), nn.ReLU(inplace=True),
                         _conv(dims, cin, cout, 3, stride=stride))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): global average pool -> FC -> ReLU -> FC ->
    sigmoid -> channel-wise rescaling of the input."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.flatten(2).mean(-1))  # (N, C)
        return x * w.view(*w.shape, *([1] * (x.ndim - 2)))


class StemBlock(nn.Module):
    """Input stem: conv -> Norm -> ReLU -> conv, plus a 1^d conv + Norm shortcut, summed."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(_conv(dims, cin, cout, 3, bias=False), _norm(norm, dims, cout),
                                  nn.ReLU(inplace=True), _conv(dims, cout, cout, 3))
        self.shortcut = nn.Sequential(_conv(dims, cin, cout, 1, bias=False), _norm(norm, dims, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResidualBlock(nn.Module):
    """Pre-activation residual unit: Norm-ReLU-conv(stride s)-Norm-ReLU-conv, plus a
    projection shortcut (1^d conv, stride s, + Norm) when shape changes."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(_pre_act_conv(dims, norm, cin, cout, stride),
                                  _pre_act_conv(dims, norm, cout, cout))
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(dims, cin, cout, 1, stride=stride, bias=False),
                                          _norm(norm, dims, cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as used in ResUNet++: parallel 3^d convs (rate 1 and
    each of ``rates``), each followed by Norm + ReLU, fused by summation, then a 1^d conv."""

    def __init__(self, dims: int, cin: int, cout: int, rates: Sequence[int], norm: str):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(_conv(dims, cin, cout, 3, dilation=r, bias=False), _norm(norm, dims, cout),
                          nn.ReLU(inplace=True))
            for r in (1, *rates)
        )
        self.project = _conv(dims, cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return self.project(out)


class AttentionBlock(nn.Module):
    """ResUNet++ attention unit. The encoder skip (2x resolution) goes through Norm-ReLU-conv
    and max-pooling, the decoder feature through Norm-ReLU-conv; their sum goes through
    Norm-ReLU-conv and the result multiplies the decoder feature. Output keeps the decoder
    feature's shape (it is upsampled afterwards, as in Fig. 1 of the paper)."""

    def __init__(self, dims: int, skip_ch: int, dec_ch: int, norm: str):
        super().__init__()
        self.skip_path = nn.Sequential(_pre_act_conv(dims, norm, skip_ch, dec_ch),
                                       Pool[Pool.MAX, dims](kernel_size=2, stride=2))
        self.dec_path = _pre_act_conv(dims, norm, dec_ch, dec_ch)
        self.fuse = _pre_act_conv(dims, norm, dec_ch, dec_ch)

    def forward(self, skip: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.skip_path(skip) + self.dec_path(dec)) * dec


class DecoderStage(nn.Module):
    """Decoder stage: attention -> 2x nearest upsampling -> concat with encoder skip ->
    residual block."""

    def __init__(self, dims: int, dec_ch: int, skip_ch: int, out_ch: int, norm: str):
        super().__init__()
        self.attention = AttentionBlock(dims, skip_ch, dec_ch, norm)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.residual = ResidualBlock(dims, dec_ch + skip_ch, out_ch, norm)

    def forward(self, dec: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.upsample(self.attention(skip, dec))
        return self.residual(torch.cat([up, skip], dim=1))


class ResUNetPlusPlus(nn.Module):
    """ResUNet++ (Jha et al., IEEE ISM 2019, arXiv:1911.07067) for 2D or 3D inputs.

    Blocks (attribute names in brackets, usable for feature taps by module name):

    * stem [``stem``]: ``StemBlock`` (conv-Norm-ReLU-conv + 1^d conv shortcut) followed by
      squeeze-and-excitation [``stem_se``], ``features[0]`` channels, full resolution.
    * encoder [``encoder[i]``, i = 0..len(features)-2]: ``ResidualBlock`` with stride-2 first
      conv and projection shortcut [``encoder[i].residual``], then squeeze-and-excitation
      [``encoder[i].se``]; ``features[i+1]`` channels at 1/2**(i+1) resolution.
    * bridge [``bottleneck``]: ``ASPP`` (rates 1 + ``aspp_rates``), ``features[-1]`` channels.
    * decoder [``decoder[j]``]: ``DecoderStage`` = ``AttentionBlock`` (encoder skip + decoder
      feature -> re-weighted decoder feature) -> 2x upsampling -> concat with the skip ->
      ``ResidualBlock``; channels ``features[-2], ..., features[0]``.
    * output: ``ASPP`` [``output_aspp``] on ``features[0]`` channels, whose output (the last
      decoder feature map) feeds the 1^d conv [``head``] giving ``out_channels`` logits.

    Differences from the paper's 2D reference design: every entry of ``features`` after the
    first is a stride-2 encoder stage (so the input must be divisible by
    2**(len(features)-1); the paper uses three downsamplings and lets the bridge ASPP widen to
    the last width), ASPP branches are summed as in the paper but each carries Norm + ReLU, and
    the network returns logits (no sigmoid).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output (logit) channels.
        features: channel widths, stem first; len(features)-1 stride-2 encoder stages.
        aspp_rates: dilation rates of the ASPP branches (a rate-1 branch is always added);
            used by both the bridge and the output ASPP. Reduce for small inputs.
        norm: "batch" (``nn.BatchNormNd``) or "instance" (affine ``nn.InstanceNormNd``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        aspp_rates: Sequence[int] = (6, 12, 18),
        norm: str = "batch",
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"features needs at least 2 entries, got {features}")
        d = spatial_dims
        self.spatial_dims = d
        self.features = features
        self.aspp_rates = tuple(int(r) for r in aspp_rates)
        self.size_multiple = 2 ** (len(features) - 1)

        self.stem = StemBlock(d, in_channels, features[0], norm)
        self.stem_se = SqueezeExcitation(features[0])
        self.encoder = nn.ModuleList(
            nn.ModuleDict({"residual": ResidualBlock(d, cin, cout, norm, stride=2),
                           "se": SqueezeExcitation(cout)})
            for cin, cout in zip(features[:-1], features[1:])
        )
        self.bottleneck = ASPP(d, features[-1], features[-1], self.aspp_rates, norm)
        rev = features[::-1]
        self.decoder = nn.ModuleList(
            DecoderStage(d, dec_ch=rev[i], skip_ch=rev[i + 1], out_ch=rev[i + 1], norm=norm)
            for i in range(len(rev) - 1)
        )
        self.output_aspp = ASPP(d, features[0], features[0], self.aspp_rates, norm)
        self.head = Conv[Conv.CONV, d](features[0], out_channels, kernel_size=1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"ResUNetPlusPlus(spatial_dims={self.spatial_dims}) expects a "
                f"{self.spatial_dims + 2}D input (N, C, *spatial), got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        m = self.size_multiple
        if any(s % m for s in spatial):
            raise ValueError(
                f"ResUNetPlusPlus: input spatial size {spatial} is not divisible by {m} "
                f"(= 2**(len(features)-1) for features={self.features}); pad or crop each "
                f"spatial dim to a multiple of {m}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem_se(self.stem(x))
        skips = [x]
        for stage in self.encoder:
            x = stage["se"](stage["residual"](x))
            skips.append(x)
        x = self.bottleneck(skips.pop())
        for stage in self.decoder:
            x = stage(x, skips.pop())
        return self.head(self.output_aspp(x))
