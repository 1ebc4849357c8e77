"""Diffusion condensation (Brugnone et al., IEEE Big Data 2019), the clustering of CUTS' stage 2.

Points repeatedly move to their diffusion-weighted local mean, c ← P c with P the row-normalised Gaussian affinity
whose bandwidth ε grows a little every iteration, and points closer than a merge distance fuse into one weighted
point. Every change of the partition is one *level*: a fine-to-coarse hierarchy from many clusters to one, without
fixing the number of clusters. The starting partition, every point its own cluster, is not a level: the official
code drops it (``levels = levels[1:]``, "ignore finest resolution of all-distinct labels") before anything reads
the hierarchy, its persistent map included. Our implementation (the official code calls the multiscale_phate
package, which the spec marks incidental): exact pairwise affinities on the current cluster
centroids, which stay few after the first merges. Every partition change is returned; multiscale PHATE returns
only its salient levels (``embed.get_levels``: iterations whose movement is a new running minimum and below the
next one's), which on CUTS' parity images are about half as many: the persistent map, which counts levels, differs
accordingly (``benchmarks/parity_cuts.py``). The salient rule does not transfer as is: our ε schedule condenses in
a few dozen iterations, on which it keeps fewer levels than multiscale PHATE does; tried on the parity embeddings,
that brought the persistent map to the official one's Dice but cost the best single level more, so every change
stays.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


def _fuse(c: torch.Tensor, w: torch.Tensor, assign: np.ndarray, radius: float):
    """Fuse points closer than ``radius`` (connected components) into their weighted centroid; the new points,
    weights and point → cluster assignment."""
    close = (torch.cdist(c, c) < radius).cpu().numpy()
    m, labels = connected_components(csr_matrix(close), directed=False)
    if m == len(c):
        return c, w, assign
    idx = torch.from_numpy(labels)
    mass = torch.bincount(idx, w, m)
    total = torch.zeros(m, c.shape[1], dtype=c.dtype).index_add_(0, idx, c * w[:, None])
    return total / mass[:, None], mass, labels[assign]


def diffusion_condensation(x: torch.Tensor, growth: float = 1.1, merge_fraction: float = 1e-3,
                           max_iter: int = 1000) -> list[np.ndarray]:
    """Cluster labels of the rows of ``x`` (n, d) at every level, fine → coarse, ending with a single cluster; the
    all-distinct start is not returned (as the official code).

    Rows are L2-normalised first. The Gaussian bandwidth ε starts at the median nearest-neighbour distance and
    grows by ``growth`` each iteration, so structure merges scale by scale; points fuse when closer than
    ``merge_fraction`` × the median distance of the initial points."""
    c = torch.nn.functional.normalize(x.double(), dim=1)
    n = len(c)
    sample = c[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:1000]]
    d0 = torch.cdist(sample, sample)
    radius = merge_fraction * float(d0.median().clamp_min(1e-12))
    eps = float(d0.fill_diagonal_(float("inf")).min(1).values.median().clamp_min(radius))
    c, w, assign = _fuse(c, torch.ones(n, dtype=c.dtype), np.arange(n), radius)
    # the all-distinct start is no level (official: levels[1:]); points fused at once (duplicates) make one
    levels = [assign.copy()] if len(c) < n else []
    for _ in range(max_iter):
        if len(c) == 1:
            break
        affinity = torch.exp(-(torch.cdist(c, c) / eps) ** 2) * w[None, :]
        c = (affinity / affinity.sum(1, keepdim=True)) @ c
        eps *= growth
        before = len(c)
        c, w, assign = _fuse(c, w, assign, radius)
        if len(c) < before:
            levels.append(assign.copy())
    if not levels or len(np.unique(levels[-1])) > 1:  # max_iter reached (or one point): close with one cluster
        levels.append(np.zeros(n, dtype=np.int64))
    return levels


def silhouette(x: torch.Tensor, labels: np.ndarray, max_points: int = 2000) -> float:
    """Mean silhouette (cosine distance) of ``labels`` on the rows of ``x`` (a deterministic subsample); −1 for
    fewer than 2 clusters."""
    lab = torch.from_numpy(np.asarray(labels)).long()
    if len(lab.unique()) < 2:
        return -1.0
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_points]
    z, lab = torch.nn.functional.normalize(x[keep].double(), dim=1), lab[keep]
    d = 1 - z @ z.t()
    ids, lab = lab.unique(return_inverse=True)
    onehot = torch.nn.functional.one_hot(lab, len(ids)).double()
    counts = onehot.sum(0)
    mean_to = d @ onehot  # (n, k) summed distance to each cluster
    own = counts[lab]
    a = mean_to.gather(1, lab[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    other = (mean_to / counts).masked_fill(onehot.bool(), float("inf"))
    b = other.min(1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
    return float(s.mean())


def persistent_label(levels: list[np.ndarray], min_area: float = 0.01, min_levels: int = 2) -> np.ndarray:
    """CUTS' label-free "persistent" map (official ``get_persistent_structures``): one map from the whole hierarchy.

    ``levels``: fine → coarse, *without* the all-distinct partition (as :func:`diffusion_condensation` returns them
    and as the official code passes them). Were it included, every identity would count one level more, so
    ``min_levels=2`` would keep clusters that lived one level. A cluster keeps its identity through a merge when it
    holds the merged cluster's first pixel (the representative that survives; the official identity is the
    multiscale_phate label value). Per identity, over every level but the coarsest (as the official code): the
    number of levels it appears in and its largest-area level (the first one, on ties).
    Identities covering < ``min_area`` of the image or present in < ``min_levels`` levels are dropped; the rest are
    painted at their largest extent in order of area, larger first (ties: more persistent first, then identity),
    so finer persistent structures stay visible on top of the coarse ones. Returns labels 0…K−1 in painting order;
    pixels no kept identity covers are 0 too, i.e. they join the first-painted one (the official map starts at 0
    as well, which there joins whichever identity has label value 0)."""
    n = levels[0].size
    seen: dict[int, list] = {}  # identity → [levels present, largest area, level of the largest area]
    for i, lab in enumerate(levels[:-1] if len(levels) > 1 else levels):
        _, first, counts = np.unique(lab.ravel(), return_index=True, return_counts=True)
        for cid, area in zip(first.tolist(), counts.tolist()):
            entry = seen.setdefault(cid, [0, 0, i])
            entry[0] += 1
            if area > entry[1]:
                entry[1], entry[2] = area, i
    keep = [(area, present, cid, level) for cid, (present, area, level) in seen.items()
            if area >= min_area * n and present >= min_levels]
    out = np.zeros(n, dtype=np.int64)
    for k, (_, _, cid, level) in enumerate(sorted(keep, key=lambda t: (-t[0], -t[1], t[2]))):
        lab = levels[level].ravel()
        out[lab == lab[cid]] = k
    return out.reshape(levels[0].shape)
