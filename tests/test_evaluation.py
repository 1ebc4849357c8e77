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
