"""Structure-aware component-tree image filter of DSAIF.

Reference: Y. Gu, Z. Sun, T. Chen, X. Xiao, Y. Liu, Y. Xu, L. Najman,
"Dual Structure-Aware Image Filterings for Semi-supervised Medical Image
Segmentation", Medical Image Analysis 2024, article 103364 (arXiv:2312.07264).
Spec: ``/work/shared/strategies/dsaif.md``, section "The filter".

The filter simplifies an image on its Max-tree (bright components) or on its
Min-tree (dark components) in two stages:

1. *Area pruning*: every tree node whose area is smaller than
   ``area_threshold`` pixels/voxels is removed; its pixels take the level of the
   nearest surviving ancestor. On the Max-tree this is an area opening, on the
   Min-tree an area closing.
2. *Single-child pruning* ("topological" pruning): on the tree of the
   area-filtered image, every node that is the only non-leaf child of its
   parent is removed (the root is kept) and each pixel takes the level of its
   nearest kept ancestor. Only branching structure survives: a sibling-less
   component is flattened onto the level of its nearest ancestor that has a
   sibling, or onto the root level.

Implementation notes
--------------------
* Everything is vectorised with numpy / higra; there is no Python loop over
  pixels or tree nodes.
* The spec rebuilds the component tree on the area-filtered image. For a
  connected filter, that tree is exactly the original tree with the removed
  nodes deleted and their children re-attached to the nearest kept ancestor,
  which is what :func:`higra.simplify_tree` returns; we use it and thereby build
  only one component tree per call (the equivalence is checked in the tests).
* Graphs are higra *implicit* regular graphs (8-adjacency in 2D, 26-adjacency
  in 3D); they give the same trees as ``hg.get_8_adjacency_graph`` and are
  faster to build and to traverse.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Literal

import higra as hg
import numpy as np

__all__ = ["TreeViews", "tree_filter"]

_LEVELS = 255  # uint8 quantisation: q = floor(x * 255), as the official (x * 255).astype(np.uint8)
_GRID_TOL = 1e-6  # values on the 255-level grid (k/255 up to float error) keep their level k


@lru_cache(maxsize=16)
def _grid_graph(shape: tuple[int, ...]):
    """Implicit 8-connected (2D) or 26-connected (3D) grid graph of ``shape``."""
    mask = np.ones((3,) * len(shape), dtype=np.int64)
    mask[(1,) * len(shape)] = 0  # no self loop (mask_2_neighbours keeps the centre if set)
    return hg.get_nd_regular_implicit_graph(shape, hg.mask_2_neighbours(mask))


def _quantise(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max normalise to [0, 1] and quantise to uint8 levels ``floor(x*255)``.

    As the official code's ``(img * 255).astype(np.uint8)`` (truncation, not rounding). Two differences, both
    float-error guards: a value within 1e-6 of a level from below keeps that level (k/255 computed in floats can fall
    a hair under k); and the official normalisation divides by ``max − min + 1e-7``, which puts the maximum (and,
    for images already on a 255-level grid, every level k ≥ 1) one level down, merging the two darkest levels: a
    side effect of its division guard that we do not copy.

    Returns ``(levels, lo, hi)``; callers must handle ``lo == hi`` themselves.
    """
    x = np.asarray(image, dtype=np.float64)
    lo = float(x.min())
    hi = float(x.max())
    u = (x - lo) / (hi - lo)
    q = np.floor(u * _LEVELS + _GRID_TOL)
    np.clip(q, 0, _LEVELS, out=q)
    return q.astype(np.uint8), lo, hi


def _dequantise(q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Inverse of :func:`_quantise` (restore the original min and max)."""
    return (lo + q.astype(np.float64) * ((hi - lo) / _LEVELS)).astype(np.float32)


def _filter_levels(
    q: np.ndarray, tree: str, area_threshold: int, prune_single_child: bool
) -> np.ndarray:
    """Filter a 2D/3D uint8 level image on its max- or min-tree; returns uint8 levels."""
    graph = _grid_graph(q.shape)
    if tree == "max":
        t0, alt0 = hg.component_tree_max_tree(graph, q)
    else:
        t0, alt0 = hg.component_tree_min_tree(graph, q)
    n_leaves = t0.num_leaves()
    root0 = t0.root()

    # Stage 1: area opening (max-tree) / closing (min-tree).
    removed = hg.attribute_area(t0) < area_threshold
    removed[:n_leaves] = False  # leaves are the pixels; never delete them from the tree
    removed[root0] = False

    if not prune_single_child:
        deleted = removed.copy()
        deleted[:n_leaves] = True  # a pixel takes the level of its nearest kept ancestor
        return hg.propagate_sequential(t0, alt0, deleted)[:n_leaves].reshape(q.shape)

    # Tree of the area-filtered image (equivalent to rebuilding it, see module doc).
    if removed.any():
        t1, node_map = hg.simplify_tree(t0, removed)
        alt1 = alt0[node_map]
    else:
        t1, alt1 = t0, alt0
    parents = t1.parents()
    n_nodes = t1.num_vertices()
    root = t1.root()  # higra trees are topologically sorted: root is the last node

    # Stage 2: delete every node that is the only non-leaf child of its parent.
    inner = slice(n_leaves, root)  # non-leaf, non-root nodes
    n_inner_children = np.bincount(parents[inner], minlength=n_nodes)
    deleted = np.ones(n_nodes, dtype=bool)  # leaves (pixels) are always "deleted"
    deleted[inner] = n_inner_children[parents[inner]] == 1
    deleted[root] = False
    return hg.propagate_sequential(t1, alt1, deleted)[:n_leaves].reshape(q.shape)


def _tree_filter_single(
    image: np.ndarray, tree: str, area_threshold: int, prune_single_child: bool
) -> np.ndarray:
    if image.ndim not in (2, 3):
        raise ValueError(
            f"expected a 2D (H, W) or 3D (D, H, W) single-channel array, got shape {image.shape}; "
            "pass channel_axis=... for multi-channel input"
        )
    if image.size == 0:
        raise ValueError("empty image")
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or inf")
    lo, hi = image.min(), image.max()
    if lo == hi:  # constant image: nothing to filter (normalisation undefined)
        return np.full(image.shape, lo, dtype=np.float32)
    q, lo, hi = _quantise(image)
    out = _filter_levels(q, tree, area_threshold, prune_single_child)
    return _dequantise(out, lo, hi)


def _checked_input(image, tree: str, area_threshold) -> np.ndarray:
    """``image`` as an array, after checking the arguments of :func:`tree_filter` (the image's shape is checked per
    channel by :func:`_tree_filter_single`)."""
    if tree not in ("max", "min"):
        raise ValueError(f"tree must be 'max' or 'min', got {tree!r}")
    if isinstance(area_threshold, bool) or not isinstance(area_threshold, (int, np.integer)):
        raise TypeError(f"area_threshold must be an int, got {type(area_threshold).__name__}")
    if area_threshold < 0:
        raise ValueError(f"area_threshold must be >= 0, got {area_threshold}")
    arr = np.asarray(image)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or arr.dtype == np.bool_):
        raise TypeError(f"unsupported dtype {arr.dtype}")
    return arr


def _per_channel(filter_one, arr: np.ndarray, channel_axis: int) -> np.ndarray:
    """``filter_one`` applied to every channel (along ``channel_axis``) of a 3D/4D array, stacked back along it."""
    if arr.ndim not in (3, 4):
        raise ValueError(
            f"with channel_axis, expected a 3D or 4D array (channels + 2D/3D), got shape {arr.shape}"
        )
    axis = int(channel_axis)
    if not -arr.ndim <= axis < arr.ndim:
        raise ValueError(f"channel_axis {channel_axis} out of range for shape {arr.shape}")
    return np.stack([filter_one(c) for c in np.moveaxis(arr, axis, 0)], axis=axis)


def tree_filter(image: np.ndarray, tree: Literal["max", "min"], area_threshold: int = 50,
                prune_single_child: bool = True, *, channel_axis: int | None = None) -> np.ndarray:
    """DSAIF structure-aware filter on the Max-tree or the Min-tree.

    Gu et al., "Dual Structure-Aware Image Filterings for Semi-supervised
    Medical Image Segmentation", MedIA 2024 (arXiv:2312.07264).

    Steps: (1) min-max normalise to [0, 1] and quantise to uint8 levels
    ``floor(x * 255)`` (the official truncation); (2) build the component tree (``"max"``: bright
    components, ``"min"``: dark components) on the 8-connected 2D grid or the
    26-connected 3D grid; (3) delete nodes with area < ``area_threshold`` and
    reconstruct (area opening on the Max-tree, area closing on the Min-tree);
    (4) if ``prune_single_child``, on the tree of the result delete every node
    that is the only non-leaf child of its parent (the root is kept) and give
    each pixel the level of its nearest kept ancestor; (5) map the levels back
    to floats with the original min and max.

    Consequences worth knowing:

    * Max-tree output <= the quantised input pixelwise, Min-tree output >=
      it (both stages only move a pixel towards the root level).
    * The Min-tree filter is the dual of the Max-tree filter:
      ``tree_filter(x, "min") == -tree_filter(-x, "max")`` (exactly on inputs
      on the 255-level grid; otherwise up to the quantisation, as floor(255u)
      and 255 − floor(255(1 − u)) differ off the grid).
    * **A tree that never branches collapses to a constant image** (the root
      level, i.e. the image minimum for the Max-tree and the maximum for the
      Min-tree): e.g. a single bright blob on a flat background, or nested
      plateaus without siblings. With the default ``area_threshold=50`` small
      crops often end up flat; callers should guard against that.
    * A constant input is returned unchanged (as float32).

    Args:
        image: single-channel 2D ``(H, W)`` or 3D ``(D, H, W)`` array of any
            real dtype. Without ``channel_axis`` a 3D array is *always* treated
            as a volume (26-connectivity).
        tree: ``"max"`` (Max-tree, bright structures) or ``"min"`` (Min-tree,
            dark structures).
        area_threshold: nodes with fewer than this many pixels/voxels are
            removed. ``<= 1`` disables area pruning.
        prune_single_child: apply stage (4). ``False`` gives the plain area
            opening/closing.
        channel_axis: if given, ``image`` is multi-channel (e.g. ``(3, H, W)``
            RGB with ``channel_axis=0``): each channel is normalised, quantised
            and filtered *independently* as a 2D/3D image and the results are
            stacked back along the same axis. The input must then be 3D or 4D.

    Returns:
        float32 array of the same shape as ``image``.
    """
    arr = _checked_input(image, tree, area_threshold)
    filter_one = partial(_tree_filter_single, tree=tree, area_threshold=int(area_threshold),
                         prune_single_child=prune_single_child)
    return filter_one(arr) if channel_axis is None else _per_channel(filter_one, arr, channel_axis)


class TreeViews:
    """Per-image transform for DSAIF: channels ``[raw, Max-tree filtered, Min-tree filtered]``.

    ``(C, *S)`` in, ``(3C, *S)`` out; each channel of the input is filtered on its own (RGB: per channel).
    Computed once per image and cached by the data pipeline: the filter commutes with the later
    rot90/flip augmentation and with monotone intensity maps (gamma), up to the uint8 quantisation, but not with
    cropping: a 3D crop of the cached views is the volume's filtered structure, where the official code filters
    every crop in its data-loader workers (the departure is stated in ``strategies.dsaif``).
    """

    def __init__(self, area_threshold: int = 50):
        self.area_threshold = area_threshold

    def __call__(self, image: np.ndarray) -> np.ndarray:
        kw = {"area_threshold": self.area_threshold, "channel_axis": 0}
        return np.concatenate([image.astype(np.float32), tree_filter(image, "max", **kw),
                               tree_filter(image, "min", **kw)]).astype(np.float32)
