"""Largest-connected-component cleaning of masks and label maps, used for pseudo labels.

Connectivity ``full`` (8 in 2D, 26 in 3D; the default) or ``face`` (4 in 2D, 6 in 3D: scipy's
``generate_binary_structure(ndim, 1)``, as UPL-SFDA's ``get_largest_component``). On CPU, scipy's ``ndimage.label``;
on any other device a torch-native labelling (minimum-index propagation with max-pooling until it settles), so a
GPU training step never copies its pseudo labels to the host. Both keep, per sample and channel, the largest
component, ties going to the one met first in raster order.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


Connectivity = Literal["full", "face"]


def _largest_scipy(mask: torch.Tensor, connectivity: Connectivity = "full") -> torch.Tensor:
    arr = mask.detach().cpu().numpy().astype(bool)
    out = np.zeros_like(arr)
    structure = ndimage.generate_binary_structure(arr.ndim - 2, arr.ndim - 2 if connectivity == "full" else 1)
    for n in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            kept = _largest_in(arr[n, c], structure)
            if kept is not None:
                out[n, c] = kept
    return torch.from_numpy(out).to(mask.device, mask.dtype)


def _largest_in(image: np.ndarray, structure: np.ndarray) -> np.ndarray | None:
    """The largest component of one boolean image (ties: the first in raster order), or None when it is empty."""
    comp, k = ndimage.label(image, structure)
    return comp == 1 + int(np.bincount(comp.ravel())[1:].argmax()) if k else None


def _largest_labels_scipy(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    lab = labels.detach().numpy()
    structure = ndimage.generate_binary_structure(lab.ndim - 1, lab.ndim - 1)
    out = np.zeros_like(lab)
    for n in range(lab.shape[0]):
        for c in range(1, num_classes):
            kept = _largest_in(lab[n] == c, structure)
            if kept is not None:
                out[n][kept] = c
    return torch.from_numpy(out)


def _largest_torch(mask: torch.Tensor, check_every: int = 8, connectivity: Connectivity = "full") -> torch.Tensor:
    fg = mask.bool()
    n, c = fg.shape[:2]
    spatial = fg.ndim - 2
    max_pool = F.max_pool2d if spatial == 2 else F.max_pool3d
    if connectivity == "full":
        windows = [((3,) * spatial, (1,) * spatial)]
    else:  # the cross: a 3-long window along each axis alone
        windows = [(tuple(3 if a == b else 1 for b in range(spatial)), tuple(int(a == b) for b in range(spatial)))
                   for a in range(spatial)]
    spread = lambda t: torch.stack([max_pool(t, k, 1, p) for k, p in windows]).amax(0)  # max over the neighbourhood
    big = fg.numel()
    idx = torch.arange(big, device=fg.device).view(fg.shape)
    label = torch.where(fg, idx, big).flatten(0, 1).unsqueeze(1).float()  # float: max-pool kernels; exact < 2^24
    if big >= 2**24:
        raise ValueError(f"torch component labelling handles < 2^24 voxels per call, got {big}")
    keep = fg.flatten(0, 1).unsqueeze(1)
    while True:
        before = label
        for _ in range(check_every):  # each component settles on its minimum (first, in raster order) index
            label = torch.where(keep, -spread(-label), float(big))
        if torch.equal(label, before):
            break
    label = label.long().view(fg.shape)
    counts = torch.bincount(label.flatten(), minlength=big + 1)
    size = torch.where(fg, counts[label], 0)
    best = size.flatten(2).max(-1).values.view(n, c, *[1] * (fg.ndim - 2))
    # among components of the largest size, the one with the smallest index (met first), as scipy's argmax
    first = torch.where(fg & (size == best), label, big).flatten(2).min(-1).values.view_as(best)
    return (fg & (label == first) & (best > 0)).to(mask.dtype)


def largest_component_mask(mask: torch.Tensor, connectivity: Connectivity = "full") -> torch.Tensor:
    """Keep the largest connected component of each sample and channel of a 0/1 mask (N, C, *S)."""
    if connectivity not in ("full", "face"):
        raise ValueError(f"connectivity must be 'full' or 'face', got {connectivity!r}")
    if mask.device.type == "cpu":
        return _largest_scipy(mask, connectivity)
    return _largest_torch(mask, connectivity=connectivity)


def largest_component_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep, per sample and foreground class of a label map (N, *S), only the largest component; the rest is 0.
    On the CPU straight from the label map (``labels == c`` per class: half the time of the one-hot route)."""
    if labels.device.type == "cpu":
        return _largest_labels_scipy(labels, num_classes)
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1)[:, 1:]
    kept = largest_component_mask(onehot)
    return (kept * torch.arange(1, num_classes, device=labels.device).view(1, -1, *[1] * (labels.ndim - 1))).sum(1)


def log_cleaning(strategy: str, largest_component: bool) -> None:
    """Say, once per stage, how a strategy cleans its pseudo labels: the largest-component rule assumes one structure
    per class (a heart per slice) and removes the rest of a vessel tree or of several lesions."""
    import logging

    logging.getLogger("label_efficient").info(
        "%s: pseudo labels %s (config.largest_component: %s)", strategy,
        "cut to the largest connected component per class, which assumes one structure per class; set it false for "
        "data with several (vessels, lesions; `label-efficient plan` measures it)" if largest_component
        else "kept whole, every connected component", str(largest_component).lower())
