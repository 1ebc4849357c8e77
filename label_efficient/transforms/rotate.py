"""Quarter-turn rotations of batches, per sample, in a plane where they keep the shape."""
from __future__ import annotations

import torch


def rotation_dims(spatial: tuple[int, ...]) -> tuple[int, int]:
    """Tensor dims of the first pair of equal-sized spatial axes (90° rotations keep the shape there).

    Without a square pair, (2, 3) is returned and only half turns (k ∈ {0, 2}) keep the shape.
    """
    for i in range(len(spatial)):
        for j in range(i + 1, len(spatial)):
            if spatial[i] == spatial[j]:
                return 2 + i, 2 + j
    return 2, 3


def rotate_quarter(x: torch.Tensor, k: torch.Tensor | int, dims: tuple[int, int]) -> torch.Tensor:
    """Rotate sample n of ``x`` by ``k[n]``·90° in ``dims`` (an int ``k`` rotates every sample)."""
    if isinstance(k, int):
        return torch.rot90(x, k, dims)
    out = x.clone()
    for kk in k.unique().tolist():
        idx = (k == kk).nonzero().flatten()
        out[idx] = torch.rot90(x[idx], kk, dims)
    return out
