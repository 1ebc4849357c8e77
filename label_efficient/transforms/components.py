"""Largest-connected-component cleaning of masks and label maps (full connectivity), used for pseudo labels."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def largest_component_mask(mask: torch.Tensor) -> torch.Tensor:
    """Keep the largest connected component of each sample and channel of a 0/1 mask (N, C, *S)."""
    arr = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(arr)
    structure = ndimage.generate_binary_structure(arr.ndim - 2, arr.ndim - 2)
    for n in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            comp, k = ndimage.label(arr[n, c], structure)
            if k:
                out[n, c] = comp == 1 + int(np.bincount(comp.ravel())[1:].argmax())
    return torch.from_numpy(out).to(mask.device, mask.dtype)


def largest_component_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep, per sample and foreground class of a label map (N, *S), only the largest component; the rest is 0."""
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1)[:, 1:]
    kept = largest_component_mask(onehot)
    return (kept * torch.arange(1, num_classes, device=labels.device).view(1, -1, *[1] * (labels.ndim - 1))).sum(1)
