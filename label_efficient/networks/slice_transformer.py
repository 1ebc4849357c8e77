"""SDC-UDA's 2.5D translation networks (Shin, Kim et al., CVPR 2023; official code ``Generator_shallow``, spec
``sdc_uda.md``): a per-slice CNN, transformer blocks whose attention is intra-slice (over a slice's positions) plus
inter-slice (over the slab's slices at each position), a CNN decoder; and a per-slice discriminator. No library has
them (MONAI's ``PatchDiscriminator`` gives a score map, not one logit per slice, and returns every layer's features),
so they are ours. Used by ``strategies.sdc_uda``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) → (B, heads, L, D / heads)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(2)


class SliceAttention(nn.Module):
    """Intra-slice + inter-slice self-attention (the paper's IISA; official ``EfficientSelfAttention``), summed, then
    projected; every projection bias-free, as the official.

    Tokens ``(S, N, D)``: S slices of one slab (the batch axis), N = h·w positions. Intra-slice: each position attends
    to every position of its own slice, keys/values from a strided conv (kernel = stride = ``reduction``) over the
    slice. Inter-slice: each position attends to the same position in the S slices."""

    def __init__(self, dim: int, heads: int, reduction: int = 2, inter_slice: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.inter_slice = heads, inter_slice
        self.q_intra = nn.Linear(dim, dim, bias=False)
        self.kv_intra = nn.Conv2d(dim, 2 * dim, reduction, reduction, bias=False)
        self.qkv_inter = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        s, n, d = x.shape
        kv = self.kv_intra(x.transpose(1, 2).reshape(s, d, h, w)).flatten(2).transpose(1, 2)
        k, v = kv.chunk(2, -1)
        out = _merge(F.scaled_dot_product_attention(*(_heads(t, self.heads) for t in (self.q_intra(x), k, v))))
        if self.inter_slice:
            q, k, v = self.qkv_inter(x).transpose(0, 1).chunk(3, -1)  # (N, S, D): sequences over the slices
            out = out + _merge(F.scaled_dot_product_attention(*(_heads(t, self.heads) for t in (q, k, v)))).transpose(0, 1)
        return self.proj(out)


class Block(nn.Module):
    """x + Attn(LN(x)); x + MixFFN(LN(x)), MixFFN = 1×1 → depthwise 3×3 → pointwise 1×1 → GELU → 1×1 (the official
    ``MixFeedForward`` with its depthwise-separable ``DsConv2d``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, reduction: int, inter_slice: bool):
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm1, self.attn = nn.LayerNorm(dim), SliceAttention(dim, heads, reduction, inter_slice)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.pwconv = nn.Conv2d(hidden, hidden, 1)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        y = self.fc1(self.norm2(x)).transpose(1, 2).unflatten(2, (h, w))
        return x + self.fc2(F.gelu(self.pwconv(self.dwconv(y))).flatten(2).transpose(1, 2))


def _conv(cin: int, cout: int, k: int, stride: int = 1, reflect: bool = False) -> nn.Sequential:
    """Conv + InstanceNorm + ReLU (official ``ConvBlock`` / ``DownConvBlock``; ``reflect``: ``ConvBlockFirst``)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, padding_mode="reflect" if reflect else "zeros"),
                         nn.InstanceNorm2d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    """×2 transposed conv (kernel 3, output padding 1) + InstanceNorm + ReLU (official ``TransposeConvBlock``)."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(cout),
                         nn.ReLU(inplace=True))


class SliceGenerator(nn.Module):
    """2.5D generator ``(S, C, H, W) -> (S, C, H, W)`` in [-1, 1]: the S slices of one slab exchange information only
    through inter-slice attention (the official ``Generator_shallow``, scaled by ``width``/``dim``/``blocks``).

    Stem at full resolution (7×7 reflect conv, two 3×3 convs; ``width`` channels), stride-2 conv (H/2, 2·width),
    overlapping patch embedding (k3 s2, H/4, ``dim``), transformer blocks, two ×2 transposed convs (dim/2, then
    width), skip-concat with the stem output, two 3×3 convs (2·width), 7×7 reflect conv (2·width) + InstanceNorm +
    ReLU, 1×1 conv, tanh. At the official width 32 and dim 128 every layer has the official's shape."""

    def __init__(self, channels: int = 1, width: int = 16, dim: int = 32, blocks: int = 1, heads: int = 4,
                 mlp_ratio: int = 4, reduction: int = 2, inter_slice: bool = True):
        super().__init__()
        self.stem = nn.Sequential(_conv(channels, width, 7, reflect=True), _conv(width, width, 3),
                                  _conv(width, width, 3))
        self.down = _conv(width, 2 * width, 3, 2)
        self.embed = nn.Conv2d(2 * width, dim, 3, 2, 1)  # official: Unfold(3, 2, 1) + 1×1 conv, the same map
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, reduction, inter_slice) for _ in range(blocks))
        self.up1, self.up2 = _up(dim, dim // 2), _up(dim // 2, width)
        self.fuse = nn.Sequential(_conv(2 * width, 2 * width, 3), _conv(2 * width, 2 * width, 3))
        self.head = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 7, padding=3, padding_mode="reflect"),
                                  nn.InstanceNorm2d(2 * width), nn.ReLU(inplace=True),
                                  nn.Conv2d(2 * width, channels, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"the SDC-UDA generator needs H and W divisible by 4, got {tuple(x.shape[-2:])}")
        skip = self.stem(x)
        t = self.embed(self.down(skip))
        h, w = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t, h, w)
        t = self.up2(self.up1(t.transpose(1, 2).unflatten(2, (h, w))))
        return self.head(self.fuse(torch.cat([t, skip], 1)))


class SliceDiscriminator(nn.Module):
    """One logit per slice: four 4×4 stride-2 convs, each + InstanceNorm + LeakyReLU 0.2, 1×1 conv, spatial mean.

    Padding 1 (the official convs have none) so that 64² CPU-sized slices survive four halvings."""

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        layers, cin = [], channels
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2)]
            cin = cout
        self.body, self.out = nn.Sequential(*layers), nn.Conv2d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"the SDC-UDA discriminator halves the image 4 times: it needs H, W ≥ 32, got "
                             f"{tuple(x.shape[-2:])}")
        return self.out(self.body(x)).mean((1, 2, 3))
