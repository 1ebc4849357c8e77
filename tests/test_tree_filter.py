"""Tests of the DSAIF structure-aware tree filter (label_efficient.transforms.tree_filter)."""

import higra as hg
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from label_efficient.transforms.tree_filter import TreeViews, tree_filter


# --------------------------------------------------------------------------- helpers
def smooth_noise(shape, seed, sigma=1.5):
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), sigma)


def quantised(x):
    """The input as the filter sees it: floor(normalised*255) as the official astype(np.uint8) (was: round),
    mapped back to the input range."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(), x.max()
    q = np.floor((x - lo) / (hi - lo) * 255 + 1e-6)
    return (lo + q * (hi - lo) / 255).astype(np.float32)


def reference_filter(x, tree, area_threshold, prune_single_child=True):
    """Literal spec implementation: explicit graphs, area pruning, *rebuilt* tree, sibling count."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(), x.max()
    q = np.floor((x - lo) / (hi - lo) * 255 + 1e-6).astype(np.uint8)  # the official truncation (was: round)
    if q.ndim == 2:
        graph = hg.get_8_adjacency_graph(q.shape)
    else:
        mask = np.ones((3, 3, 3))
        mask[1, 1, 1] = 0
        graph = hg.get_nd_regular_graph(q.shape, hg.mask_2_neighbours(mask))
    build = hg.component_tree_max_tree if tree == "max" else hg.component_tree_min_tree
    t0, a0 = build(graph, q)
    r = hg.reconstruct_leaf_data(t0, a0, hg.attribute_area(t0) < area_threshold)
    if prune_single_child:
        t1, a1 = build(graph, r)
        w = np.ones(t1.num_vertices())
        w[: t1.num_leaves()] = 0
        n_children = hg.accumulate_parallel(t1, w, hg.Accumulators.sum)
        n_siblings = hg.propagate_parallel(t1, n_children)
        n_siblings[t1.root()] = 0
        r = hg.reconstruct_leaf_data(t1, a1, n_siblings == 1)
    return (lo + r.astype(np.float64) * (hi - lo) / 255).astype(np.float32)


def nested_peaks_2d():
    """Nested plateaus 0 -> 1 -> 2 -> 3 holding two peaks 4 and 5 (levels x51, so exact in uint8)."""
    img = np.zeros((9, 11))
    img[1:8, 1:10] = 1
    img[2:7, 2:9] = 2
    img[3:6, 3:8] = 3
    img[4, 4] = 4
    img[4, 6] = 5
    return img * 51


# --------------------------------------------------------------------------- spec example
@pytest.mark.parametrize("area_threshold", [0, 1])
def test_spec_example_nested_levels_keep_only_peaks(area_threshold):
    img = nested_peaks_2d()
    out = tree_filter(img, "max", area_threshold=area_threshold)
    expected = np.zeros_like(img)
    expected[4, 4] = img[4, 4]
    expected[4, 6] = img[4, 6]
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_array_equal(out, expected)


def test_spec_example_without_single_child_pruning_is_identity():
    img = nested_peaks_2d()
    np.testing.assert_array_equal(tree_filter(img, "max", 1, prune_single_child=False), img)


def test_spec_example_min_tree_dual():
    img = 255 - nested_peaks_2d()  # nested basins holding two dark pits
    out = tree_filter(img, "min", area_threshold=1)
    expected = np.full_like(img, 255.0)
    expected[4, 4] = img[4, 4]
    expected[4, 6] = img[4, 6]
    np.testing.assert_array_equal(out, expected)


def test_spec_example_3d():
    vol = np.zeros((7, 9, 11))
    vol[1:6, 1:8, 1:10] = 1
    vol[2:5, 2:7, 2:9] = 2
    vol[3, 3, 3] = 3
    vol[3, 3, 7] = 5
    vol *= 51
    out = tree_filter(vol, "max", area_threshold=1)
    expected = np.zeros_like(vol)
    expected[3, 3, 3] = vol[3, 3, 3]
    expected[3, 3, 7] = vol[3, 3, 7]
    np.testing.assert_array_equal(out, expected)


def test_tree_that_never_branches_collapses_to_constant():
    img = np.zeros((10, 10))
    img[2:8, 2:8] = 100
    img[4:6, 4:6] = 200  # single chain root -> plateau -> peak, no siblings anywhere
    out = tree_filter(img, "max", area_threshold=1)
    np.testing.assert_array_equal(out, np.zeros_like(img))
    out_min = tree_filter(img, "min", area_threshold=1)
    np.testing.assert_array_equal(out_min, np.full_like(img, 200.0))


# --------------------------------------------------------------------------- area filter
def test_area_opening_removes_exactly_small_bright_components():
    img = np.zeros((20, 20))
    img[1:3, 1:3] = 200  # area 4   -> removed
    img[10:13, 1:4] = 150  # area 9   -> removed (threshold 10)
    img[5:15, 8:18] = 100  # area 100 -> kept
    img[9:11, 12:14] = 250  # area 4 peak on top of it -> flattened to 100
    img[15:17, 0:5] = 50  # area 10 -> kept (not < threshold)
    out = tree_filter(img, "max", area_threshold=10, prune_single_child=False)
    expected = img.copy()
    expected[1:3, 1:3] = 0
    expected[10:13, 1:4] = 0
    expected[9:11, 12:14] = 100
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_area_closing_removes_exactly_small_dark_components():
    img = np.full((20, 20), 250.0)
    img[1:3, 1:3] = 50  # area 4 -> filled to 250
    img[5:15, 8:18] = 100  # area 100 -> kept
    img[9:11, 12:14] = 0  # area 4 pit inside -> filled to 100
    out = tree_filter(img, "min", area_threshold=10, prune_single_child=False)
    expected = img.copy()
    expected[1:3, 1:3] = 250
    expected[9:11, 12:14] = 100
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_connectivity_8_in_2d_and_26_in_3d():
    img = np.zeros((6, 6))
    img[1, 1] = img[2, 2] = 255  # diagonal neighbours: one component of area 2 in 8-connectivity
    np.testing.assert_array_equal(tree_filter(img, "max", 2, prune_single_child=False), img)
    np.testing.assert_array_equal(tree_filter(img, "max", 3, prune_single_child=False), 0 * img)
    vol = np.zeros((4, 4, 4))
    vol[1, 1, 1] = vol[2, 2, 2] = 255  # corner neighbours: connected only in 26-connectivity
    np.testing.assert_array_equal(tree_filter(vol, "max", 2, prune_single_child=False), vol)


def test_huge_threshold_gives_root_level():
    img = smooth_noise((16, 16), 3)
    np.testing.assert_allclose(tree_filter(img, "max", 10_000), np.full(img.shape, img.min()), rtol=1e-6)
    np.testing.assert_allclose(tree_filter(img, "min", 10_000), np.full(img.shape, img.max()), rtol=1e-6)


# --------------------------------------------------------------------------- ordering & duality
@pytest.mark.parametrize("shape", [(32, 32), (8, 10, 12)])
@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("area_threshold", [1, 5, 50])
def test_max_is_anti_extensive_min_is_extensive(shape, prune, area_threshold):
    for seed in range(3):
        x = smooth_noise(shape, seed) * 7 - 2
        xq = quantised(x)
        out_max = tree_filter(x, "max", area_threshold, prune)
        out_min = tree_filter(x, "min", area_threshold, prune)
        assert out_max.shape == x.shape and out_max.dtype == np.float32
        assert np.all(out_max <= xq + 1e-5)
        assert np.all(out_min >= xq - 1e-5)
        if area_threshold <= 1 and not prune:
            # nothing to prune: identity on the quantised input
            np.testing.assert_allclose(out_max, xq, atol=1e-5)
            np.testing.assert_allclose(out_min, xq, atol=1e-5)
        else:
            # the filters really do something on smooth noise
            assert not np.allclose(out_max, xq) and not np.allclose(out_min, xq)
        # the root level (input min / max) is restored
        assert np.isclose(out_max.min(), x.min(), atol=1e-5)
        assert np.isclose(out_min.max(), x.max(), atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 32), (8, 10, 12)])
@pytest.mark.parametrize("prune", [True, False])
def test_min_tree_is_dual_of_max_tree(shape, prune):
    rng = np.random.default_rng(7)
    # integer levels spanning 0..255 so quantisation is exact (no rounding ties)
    x = np.rint(gaussian_filter(rng.random(shape), 1.0) * 1000).astype(np.float64)
    x = np.rint((x - x.min()) / (x.max() - x.min()) * 255)
    a = tree_filter(x, "min", 5, prune)
    b = -tree_filter(-x, "max", 5, prune)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, x)


@pytest.mark.parametrize("shape", [(24, 24), (6, 8, 10)])
@pytest.mark.parametrize("tree", ["max", "min"])
def test_matches_literal_spec_implementation_with_rebuilt_tree(shape, tree):
    for seed in range(3):
        x = smooth_noise(shape, 100 + seed)
        for thr in (1, 4, 20):
            for prune in (True, False):
                np.testing.assert_array_equal(
                    tree_filter(x, tree, thr, prune), reference_filter(x, tree, thr, prune)
                )


# --------------------------------------------------------------------------- constant, dtypes, errors
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5)])
@pytest.mark.parametrize("tree", ["max", "min"])
def test_constant_in_constant_out(shape, tree):
    img = np.full(shape, 3.5)
    out = tree_filter(img, tree)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float32, np.float64])
def test_dtypes_give_float32_same_shape(dtype):
    img = (nested_peaks_2d() - 60).clip(0).astype(dtype)
    out = tree_filter(img, "max", 1)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert np.isclose(out.min(), img.min()) and np.isclose(out.max(), img.max())


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        tree_filter(np.zeros((2, 3, 4, 5)), "max")
    with pytest.raises(ValueError):
        tree_filter(np.zeros(5), "max")
    with pytest.raises(ValueError):
        tree_filter(np.zeros((4, 4)), "both")
    with pytest.raises(ValueError):
        tree_filter(np.array([[0.0, np.nan], [1.0, 2.0]]), "max")
    with pytest.raises(ValueError):
        tree_filter(np.zeros((4, 4)), "max", channel_axis=0)
    with pytest.raises(ValueError):
        tree_filter(np.zeros((4, 4)), "max", area_threshold=-1)


# --------------------------------------------------------------------------- channel_axis
def test_channel_axis_filters_each_channel_independently():
    rng = np.random.default_rng(0)
    rgb = np.stack([smooth_noise((16, 16), s) * (s + 1) for s in range(3)])  # (3, H, W)
    out = tree_filter(rgb, "max", 5, channel_axis=0)
    expected = np.stack([tree_filter(c, "max", 5) for c in rgb])
    assert out.shape == rgb.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    # channels-last gives the same result
    out_last = tree_filter(np.moveaxis(rgb, 0, -1), "max", 5, channel_axis=-1)
    np.testing.assert_array_equal(np.moveaxis(out_last, -1, 0), expected)
    # 4D: channels of volumes
    vols = rng.random((2, 4, 5, 6))
    out4 = tree_filter(vols, "min", 3, channel_axis=0)
    np.testing.assert_array_equal(out4[1], tree_filter(vols[1], "min", 3))


def test_3d_without_channel_axis_is_a_volume_not_channels():
    # A bright 2x2 square in each of 3 "channels", stacked: area 4 per slice but 12 as a volume.
    x = np.zeros((3, 8, 8))
    x[:, 3:5, 3:5] = 255
    x[0, 0, 0] = 0
    as_volume = tree_filter(x, "max", area_threshold=10, prune_single_child=False)
    as_channels = tree_filter(x, "max", area_threshold=10, prune_single_child=False, channel_axis=0)
    np.testing.assert_array_equal(as_volume, x)  # component of 12 voxels survives
    np.testing.assert_array_equal(as_channels, np.zeros_like(x))  # 4-pixel squares removed


def test_channel_axis_with_a_constant_channel():
    x = np.stack([np.full((6, 6), 2.0), nested_peaks_2d()[:6, :6]])
    out = tree_filter(x, "max", 1, channel_axis=0)
    np.testing.assert_array_equal(out[0], x[0])


# --------------------------------------------------------------------------- TreeViews
def test_tree_views_stacks_raw_max_min_per_channel():
    img = np.stack([nested_peaks_2d(), smooth_noise(nested_peaks_2d().shape, 2)])
    out = TreeViews(area_threshold=1)(img)
    assert out.shape == (6,) + img.shape[1:] and out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], img.astype(np.float32))
    np.testing.assert_array_equal(out[2], tree_filter(img[0], "max", 1))
    np.testing.assert_array_equal(out[5], tree_filter(img[1], "min", 1))


def test_quantisation_floors_as_the_official_astype_uint8():
    """The official ``tree_process_*_higra_final``: ``(img * 255).astype(np.uint8)`` on the normalised image, i.e.
    truncation (the normalisation here is exact: lo = 0, hi = 1); levels on the 255-level grid keep their level."""
    from label_efficient.transforms.tree_filter import _quantise

    x = np.array([0.0, 0.3, 0.501, 0.701, 100 / 255, 254.6 / 255, 1.0])
    q, lo, hi = _quantise(x)
    official = (x * 255).astype(np.uint8)
    assert q.tolist() == official.tolist() == [0, 76, 127, 178, 100, 254, 255]
    assert (lo, hi) == (0.0, 1.0)
    assert np.rint(x * 255).astype(int).tolist() == [0, 76, 128, 179, 100, 255, 255]  # what rounding gave
