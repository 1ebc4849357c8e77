import math

import numpy as np
import pytest
import torch

from label_efficient.evaluation import case_metrics, pad_to_multiple, summarize


def test_dice_iou_hd95_known_values():
    gt = np.zeros((1, 20, 20), np.int64)
    gt[0, 5:15, 5:15] = 1
    pred = np.zeros_like(gt)
    pred[0, 5:15, 7:17] = 1  # shifted by 2 px
    m = case_metrics(pred, gt, 2)
    assert m["dice"][1] == pytest.approx(2 * 80 / 200)
    assert m["iou"][1] == pytest.approx(80 / 120)
    assert m["hd95"][1] == pytest.approx(2.0)
    assert case_metrics(gt, gt, 2)["hd95"][1] == 0.0


def test_empty_classes():
    gt = np.zeros((4, 4), np.int64)
    m = case_metrics(gt, gt, 3)
    assert m["dice"] == {1: 1.0, 2: 1.0} and m["hd95"][1] == 0.0
    pred = gt.copy()
    pred[0, 0] = 2
    m = case_metrics(pred, gt, 3)
    assert m["dice"][2] == 0.0 and math.isnan(m["hd95"][2])
    s = summarize({"a": m}, ["bg", "x", "y"])
    assert s["mean_dice"] == pytest.approx(0.5) and s["mean_hd95"] == 0.0


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differs"):
        case_metrics(np.zeros((3, 3)), np.zeros((3, 4)), 2)


def test_pad_to_multiple_roundtrip():
    x = torch.randn(1, 1, 30, 17)
    p, unpad = pad_to_multiple(x, 8)
    assert p.shape == (1, 1, 32, 24)
    assert torch.equal(unpad(p), x)


def test_hd95_matches_monai_on_a_simple_case():
    from monai.metrics import compute_hausdorff_distance

    gt = np.zeros((40, 40), bool)
    gt[10:30, 8:28] = True
    pred = np.zeros_like(gt)
    pred[12:33, 10:30] = True
    ours = case_metrics(pred.astype(int), gt.astype(int), 2, ["hd95"])["hd95"][1]
    ref = float(compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(),
                                           torch.from_numpy(gt)[None, None].float(), percentile=95)[0, 0])
    assert ours == pytest.approx(ref, abs=1.01)  # medpy pools both directions; MONAI takes the max of the two


def test_flip_consistency_rewards_equivariance_and_punishes_collapse():
    from label_efficient.data.loaders import EvalVolume
    from label_efficient.evaluation import flip_consistency

    image = torch.zeros(2, 1, 8, 8)
    image[:, :, 2:5, 1:4] = 1.0  # an off-centre square
    vol = EvalVolume("v", image, None, [], (8, 8))

    def follows_image(x):  # foreground exactly where the image is bright: mirrors with it
        return torch.cat([10 - 20 * x, 20 * x - 10], 1)

    def fixed_left_half(x):  # ignores the image: foreground on the left half always
        fg = torch.full_like(x, -10.0)
        fg[..., :4] = 10.0
        return torch.cat([-fg, fg], 1)

    def collapsed(x):  # background everywhere
        return torch.cat([torch.full_like(x, 10.0), torch.zeros_like(x)], 1)

    assert flip_consistency(follows_image, vol, 2) == pytest.approx(1.0, abs=1e-3)
    assert flip_consistency(fixed_left_half, vol, 2) < 0.01  # its mirrored prediction lands on the other half
    assert flip_consistency(collapsed, vol, 2) < 0.01


# --- medpy's definitions, checked against medpy itself --------------------------------------------------------------

from conftest import SHARED, requires_shared  # noqa: E402

ACDC = SHARED / "acdc"


def _acdc_masks(volume: str) -> np.ndarray:
    """The ground truth of one ACDC volume, (Z, H, W): its slices' masks stacked in order of z."""
    from PIL import Image

    paths = sorted((ACDC / "masks").glob(f"{volume}_slice*.png"))
    assert paths, volume
    return np.stack([np.asarray(Image.open(p)) for p in paths]).astype(np.int64)


def _perturbed(gt: np.ndarray, seed: int) -> np.ndarray:
    """A prediction: each class eroded, dilated or shifted in-plane (a different choice per class)."""
    from scipy import ndimage

    rng, pred = np.random.default_rng(seed), np.zeros_like(gt)
    in_plane = ndimage.generate_binary_structure(2, 1)[None]
    for c in range(1, int(gt.max()) + 1):
        m, op = gt == c, (seed + c) % 3
        if op == 0:
            m = ndimage.binary_erosion(m, in_plane, iterations=2)
        elif op == 1:
            m = ndimage.binary_dilation(m, in_plane, iterations=3)
        else:
            m = np.roll(m, tuple(int(v) for v in rng.integers(-4, 5, 2)), axis=(1, 2))
        pred[m] = c
    return pred


def _medpy(p: np.ndarray, g: np.ndarray, spacing=None) -> dict[str, float]:
    from medpy.metric import binary as mb

    return {"dice": mb.dc(p, g), "iou": mb.jc(p, g), "hd95": mb.hd95(p, g, spacing), "asd": mb.asd(p, g, spacing),
            "assd": mb.assd(p, g, spacing)}


def _assert_like_medpy(pred, gt, num_classes, spacing=None):
    ours = case_metrics(pred, gt, num_classes, spacing=spacing)
    for c in range(1, num_classes):
        ref = _medpy(pred == c, gt == c, spacing)
        for m, v in ref.items():
            assert ours[m][c] == pytest.approx(v, abs=1e-6), (m, c)


@requires_shared("acdc")
@pytest.mark.parametrize("volume,seed", [("patient007_frame01", 0), ("patient022_frame01", 1)])
def test_metrics_equal_medpy_on_acdc_volumes(volume, seed):
    pytest.importorskip("medpy")
    gt = _acdc_masks(volume)
    pred = _perturbed(gt, seed)
    _assert_like_medpy(pred, gt, 4)
    _assert_like_medpy(pred, gt, 4, spacing=(10.0, 1.3, 1.3))  # ACDC-like: thick slices


def test_asd_is_directed_and_assd_pools_both_directions():
    pytest.importorskip("medpy")
    gt = np.zeros((30, 30), np.int64)
    gt[5:25, 5:25] = 1
    pred = np.zeros_like(gt)
    pred[8:12, 8:12] = 1  # small, inside: pred → truth distances are short, truth → pred long
    m = case_metrics(pred, gt, 2)
    assert m["asd"][1] < m["assd"][1]
    assert case_metrics(gt, pred, 2)["asd"][1] > m["assd"][1]
    _assert_like_medpy(pred, gt, 2)


def test_edge_cases_equal_medpy():
    pytest.importorskip("medpy")
    rng = np.random.default_rng(3)
    one = np.zeros((9, 11), np.int64)
    one[4, 5] = 1
    other = np.zeros_like(one)
    other[0, 10] = 1
    _assert_like_medpy(one, other, 2)  # one voxel each
    _assert_like_medpy(one, one, 2)
    blob = np.zeros_like(one)
    blob[2:7, 3:9] = 1
    _assert_like_medpy(one, blob, 2)
    border = np.zeros((12, 12), np.int64)
    border[:, :4] = 1  # touches three edges: the outside counts as background (a surface there)
    border[0, :] = 1
    shifted = np.roll(border, 2, axis=1)
    _assert_like_medpy(border, shifted, 2)
    _assert_like_medpy(np.ones_like(border), shifted, 2)  # the whole array
    # 3D, anisotropic spacing, random blobs touching the border
    from scipy import ndimage

    a = ndimage.binary_opening(rng.random((10, 24, 20)) > 0.55).astype(np.int64)
    b = ndimage.binary_opening(rng.random((10, 24, 20)) > 0.55).astype(np.int64)
    for spacing in [(3.0, 0.7, 1.1), (1.0, 1.0, 1.0), 2.5]:
        _assert_like_medpy(a, b, 2, spacing=spacing)
    assert case_metrics(a, b, 2, ["hd95"], spacing=(2.0, 2.0, 2.0))["hd95"][1] == pytest.approx(
        2 * case_metrics(a, b, 2, ["hd95"])["hd95"][1])


def test_empty_masks_follow_medpy_where_it_is_defined_and_the_rule_elsewhere():
    pytest.importorskip("medpy")
    from medpy.metric import binary as mb

    gt = np.zeros((6, 6), np.int64)
    gt[1:4, 1:4] = 1
    empty = np.zeros_like(gt)
    for pred, truth in [(empty, gt), (gt, empty)]:  # empty prediction, empty truth
        m = case_metrics(pred, truth, 2)
        assert m["dice"][1] == mb.dc(pred, truth) == 0.0 and m["iou"][1] == mb.jc(pred, truth) == 0.0
        assert all(math.isnan(m[d][1]) for d in ("hd95", "asd", "assd"))
        with pytest.raises(RuntimeError):
            mb.hd95(pred, truth)
        s = case_metrics(pred, truth, 2, empty="ssl4mis")
        assert all(s[k][1] == 0.0 for k in s)
    m = case_metrics(empty, empty, 2)  # both empty: Dice and IoU 1 (medpy 0.5.2's jc; its dc gives 0 in 0.4, NaN now)
    assert m["dice"][1] == 1.0 and m["iou"][1] == mb.jc(empty, empty) == 1.0
    assert m["hd95"][1] == m["asd"][1] == m["assd"][1] == 0.0
    assert all(v[1] == 0.0 for v in case_metrics(empty, empty, 2, empty="ssl4mis").values())
    with pytest.raises(ValueError, match="empty-class rule"):
        case_metrics(gt, gt, 2, empty="zero")
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(gt, gt, 2, spacing=(1.0, 1.0, 1.0))


def _label_volume(vid: str, pred: np.ndarray, gt: np.ndarray, spacing=None):
    """An EvalVolume whose 'image' is the prediction itself, read back by :func:`_echo` (no resize: same size)."""
    from label_efficient.data.loaders import EvalVolume

    vol = EvalVolume(vid, torch.from_numpy(pred[:, None].astype(np.float32)), gt, [], tuple(gt.shape[1:]))
    if spacing is not None:
        vol.spacing = spacing  # EvalVolume has no spacing field: evaluate reads getattr(volume, "spacing", None)
    return vol


def _echo(x: torch.Tensor) -> torch.Tensor:
    return F.one_hot(x[:, 0].long(), 4).permute(0, 3, 1, 2).float() * 10


import torch.nn.functional as F  # noqa: E402


@requires_shared("acdc")
def test_evaluate_counts_empty_classes_and_applies_the_rule():
    pytest.importorskip("medpy")
    from label_efficient.evaluation import evaluate

    gt = _acdc_masks("patient022_frame01")
    pred = _perturbed(gt, 2)
    missing = pred.copy()
    missing[missing == 2] = 0  # MYO not predicted at all
    vols = [_label_volume("a", pred, gt, spacing=(10.0, 1.5, 1.5)), _label_volume("b", missing, gt)]
    names = ["bg", "RV", "MYO", "LV"]
    out = evaluate(_echo, vols, 4, names, 2, ["dice", "hd95", "asd"], roi_size=None, device="cpu", overlap=0.5,
                   keep=0)  # the runner's call
    assert out["empty_cases"] == {"rule": "nan", "pred_empty": 1, "truth_empty": 0, "both_empty": 0,
                                  "pairs": [["b", "MYO", "pred_empty"]]}
    assert math.isnan(out["cases"]["b"]["hd95"]["MYO"]) and out["cases"]["b"]["dice"]["MYO"] == 0.0
    assert out["per_class"]["hd95"]["MYO"] == pytest.approx(out["cases"]["a"]["hd95"]["MYO"])  # NaN left out
    ref = _medpy(pred == 1, gt == 1, (10.0, 1.5, 1.5))
    assert out["cases"]["a"]["hd95"]["RV"] == pytest.approx(ref["hd95"], abs=1e-6)  # spacing of volume a used
    assert out["cases"]["b"]["asd"]["RV"] == pytest.approx(_medpy(pred == 1, gt == 1)["asd"], abs=1e-6)
    s = evaluate(_echo, vols, 4, names, 2, ["dice", "hd95"], empty="ssl4mis")
    assert s["empty_cases"]["rule"] == "ssl4mis" and s["empty_cases"]["pred_empty"] == 1
    assert s["cases"]["b"]["hd95"]["MYO"] == 0.0
    assert s["per_class"]["hd95"]["MYO"] == pytest.approx(out["cases"]["a"]["hd95"]["MYO"] / 2)  # the 0 counts
    assert set(out) >= {"mean_dice", "mean_hd95", "mean_asd", "per_class", "cases", "num_cases"}


# --- the published SSL4MIS / BCP ACDC test protocol -----------------------------------------------------------------

def _intensity_net(x: torch.Tensor) -> torch.Tensor:
    """A deterministic 'network': the class whose intensity centre is nearest a smoothed pixel; class 3's centre is
    out of range, so class 3 is never predicted (an empty prediction)."""
    s = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    centres = torch.tensor([0.02, 0.25, 0.5, 9.0]).view(1, 4, 1, 1)
    return -50 * (s - centres) ** 2


def _ssl4mis_reference(image: np.ndarray, label: np.ndarray, net, classes: int) -> list[tuple]:
    """SSL4MIS test_single_volume / BCP test_ACDC.py, restated: slice by slice, nearest zoom to 256², softmax-argmax,
    nearest zoom back; per class medpy (dc, jc, hd95, asd), or zeros when the class is not predicted."""
    from medpy.metric import binary as mb
    from scipy.ndimage import zoom

    prediction = np.zeros_like(label)
    for z in range(image.shape[0]):
        sl = image[z]
        x, y = sl.shape
        inp = torch.from_numpy(zoom(sl, (256 / x, 256 / y), order=0))[None, None].float()
        out = torch.argmax(torch.softmax(net(inp), dim=1), dim=1)[0].numpy()
        prediction[z] = zoom(out, (x / 256, y / 256), order=0)
    res = []
    for c in range(1, classes):
        p, g = prediction == c, label == c
        res.append((0, 0, 0, 0) if p.sum() == 0 else (mb.dc(p, g), mb.jc(p, g), mb.hd95(p, g), mb.asd(p, g)))
    return res


@requires_shared("acdc")
def test_ssl4mis_protocol_reproduces_test_single_volume():
    pytest.importorskip("medpy")
    from label_efficient.data.datasets import DATASETS
    from label_efficient.data.loaders import eval_volumes
    from label_efficient.data.readers import read_image_2d
    from label_efficient.data.store import CaseStore
    from label_efficient.evaluation import evaluate_ssl4mis

    spec = DATASETS.get("acdc")(ACDC)
    cases = [c for c in spec.cases if c.volume in ("patient065_frame01", "patient022_frame01")]
    vols = eval_volumes(CaseStore(spec, (64, 64)), cases)  # the training-size image is not used
    names = spec.class_names
    out = evaluate_ssl4mis(_intensity_net, vols, 4, names, batch_size=3)
    assert out["protocol"] == "ssl4mis" and out["num_cases"] == 2
    assert out["empty_cases"]["rule"] == "ssl4mis" and out["empty_cases"]["pred_empty"] == 2
    for vol in vols:
        image = np.stack([read_image_2d(c.image)[0] for c in vol.cases])
        ref = _ssl4mis_reference(image, vol.label.copy(), _intensity_net, 4)
        for c, r in enumerate(ref, 1):
            for m, v in zip(("dice", "iou", "hd95", "asd"), r):
                assert out["cases"][vol.id][m][names[c]] == pytest.approx(v, abs=1e-6), (vol.id, m, c)
        assert out["cases"][vol.id]["dice"]["RV"] > 0.05  # a non-trivial prediction
    with pytest.raises(ValueError, match="do not match"):
        evaluate_ssl4mis(_intensity_net, vols[:1], 4, names, load_slices=lambda v: np.zeros((1, 1, 8, 8), np.float32))


@pytest.mark.parametrize("shape", [(2, 4, 9, 11), (2, 3, 5, 6, 7), (3, 5)])
def test_class_map_is_argmax_over_classes(shape):
    """The channels-last argmax gives ``argmax(1)`` exactly, ties (whole-class plateaus, bf16 rounding) included."""
    from label_efficient.utils import class_map

    torch.manual_seed(0)
    x = torch.randn(shape)
    tied = torch.zeros(shape)
    tied[:, 1:3] = 1.0
    for t in (x, x.bfloat16(), tied, x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x):
        assert torch.equal(class_map(t), t.argmax(1))
