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
