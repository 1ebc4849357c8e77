"""SDC-UDA's 2.5D translation networks (Shin, Kim et al., CVPR 2023; official code ``Generator_shallow``, spec
``sdc_uda.md``): a per-slice CNN, transformer blocks whose attention is intra-slice (over a slice's positions) plus
inter-slice (over the slab's slices at each position), a CNN decoder; and a per-slice discriminator. No library has
them (MONAI's ``PatchDiscriminator`` gives a score map, not one logit per slice, and returns every layer's features),
so they are ours. Used by ``strategies.sdc_uda``; the state-dict keys are those of the modules defined there before.
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
    """Intra-slice + inter-slice self-attention (the paper's IISA), summed, then projected.

    Tokens ``(S, N, D)``: S slices of one slab (the batch axis), N = h·w positions. Intra-slice: each position attends
    to every position of its own slice, keys/values from the slice reduced ×``reduction`` by a strided conv.
    Inter-slice: each position attends to the same position in the S slices."""

    def __init__(self, dim: int, heads: int, reduction: int = 2, inter_slice: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.inter_slice = heads, inter_slice
        self.q_intra, self.kv_intra = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.reduce = nn.Conv2d(dim, dim, reduction, reduction) if reduction > 1 else None
        self.reduce_norm = nn.LayerNorm(dim)
        self.qkv_inter = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        s, n, d = x.shape
        kv = x
        if self.reduce is not None:
            kv = self.reduce_norm(self.reduce(x.transpose(1, 2).reshape(s, d, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv_intra(kv).chunk(2, -1)
        out = _merge(F.scaled_dot_product_attention(*(_heads(t, self.heads) for t in (self.q_intra(x), k, v))))
        if self.inter_slice:
            q, k, v = self.qkv_inter(x).transpose(0, 1).chunk(3, -1)  # (N, S, D): sequences over the slices
            out = out + _merge(F.scaled_dot_product_attention(*(_heads(t, self.heads) for t in (q, k, v)))).transpose(0, 1)
        return self.proj(out)


class Block(nn.Module):
    """x + Attn(LN(x)); x + MixFFN(LN(x)), MixFFN = Linear → depthwise 3×3 conv → GELU → Linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, reduction: int, inter_slice: bool):
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm1, self.attn = nn.LayerNorm(dim), SliceAttention(dim, heads, reduction, inter_slice)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        y = self.fc1(self.norm2(x))
        y = self.dwconv(y.transpose(1, 2).unflatten(2, (h, w))).flatten(2).transpose(1, 2)
        return x + self.fc2(F.gelu(y))


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, padding_mode="reflect"), nn.InstanceNorm2d(cout),
                         nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.InstanceNorm2d(cout), nn.ReLU(inplace=True))


class SliceGenerator(nn.Module):
    """2.5D generator ``(S, C, H, W) -> (S, C, H, W)`` in [-1, 1]: the S slices of one slab exchange information only
    through inter-slice attention (the paper's ``Generator_shallow``, scaled by ``width``/``dim``/``blocks``)."""

    def __init__(self, channels: int = 1, width: int = 16, dim: int = 32, blocks: int = 1, heads: int = 4,
                 mlp_ratio: int = 4, reduction: int = 2, inter_slice: bool = True):
        super().__init__()
        self.stem = nn.Sequential(_conv(channels, width, 7), _conv(width, width, 3), _conv(width, width, 3))
        self.down = _conv(width, 2 * width, 3, 2)  # level-1 features (H/2)
        self.embed = nn.Conv2d(2 * width, dim, 3, 2, 1)  # overlapping patch embedding (H/4)
        self.embed_norm, self.out_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, reduction, inter_slice) for _ in range(blocks))
        self.up1, self.fuse = _up(dim, 2 * width), _conv(4 * width, 2 * width, 3)
        self.up2 = _up(2 * width, width)
        self.head = nn.Sequential(nn.Conv2d(width, width, 7, padding=3, padding_mode="reflect"), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, channels, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"the SDC-UDA generator needs H and W divisible by 4, got {tuple(x.shape[-2:])}")
        f1 = self.down(self.stem(x))
        t = self.embed(f1)
        h, w = t.shape[-2:]
        t = self.embed_norm(t.flatten(2).transpose(1, 2))
        for block in self.blocks:
            t = block(t, h, w)
        t = self.out_norm(t).transpose(1, 2).unflatten(2, (h, w))
        return self.head(self.up2(self.fuse(torch.cat([self.up1(t), f1], 1))))


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
