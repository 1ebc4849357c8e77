import numpy as np
import torch

from label_efficient.backbones import build_backbone
from label_efficient.ood import OODDetector, auroc, pooled_features


def test_detector_scores_shifted_features_higher():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (200, 16))
    val = rng.normal(0, 1, (50, 16))
    det = OODDetector(n_components=8, k=3).fit(train, val)
    near, far = det.score(rng.normal(0, 1, (30, 16))), det.score(rng.normal(4, 1, (30, 16)))
    for s in ("mahalanobis", "knn"):
        assert near[s].mean() < far[s].mean()
    assert det.flag(far).mean() > 0.9 and det.flag(near).mean() < 0.3
    again = OODDetector.from_state(det.state_dict())
    assert np.allclose(again.score(train[:5])["knn"], det.score(train[:5])["knn"])


def test_auroc():
    s = np.array([0.1, 0.2, 0.8, 0.9])
    assert auroc(s, np.array([False, False, True, True])) == 1.0
    assert auroc(s, np.array([True, True, False, False])) == 0.0
    assert np.isnan(auroc(s, np.zeros(4, bool)))


def test_pooled_features_from_bottleneck_tap():
    model = build_backbone("unet", 2, 1, 2, channels=[8, 16, 32])
    f = pooled_features(model, [torch.rand(3, 1, 32, 32), torch.rand(2, 1, 32, 32)])
    assert f.shape == (5, 32)


def test_predict_writes_ood_scores(tmp_path, capsys):
    from conftest import tiny_recipe, write_image_folder
    from label_efficient.cli import main
    from label_efficient.recipe import parse_recipe
    from label_efficient.runner import run_recipe

    root = write_image_folder(tmp_path / "discs")
    m = run_recipe(parse_recipe(tiny_recipe(root)), tmp_path / "run")
    assert "ood" in m["cases"]["case13"] and "flagged" in m["cases"]["case13"]["ood"]
    assert main(["predict", "--model", str(tmp_path / "run/model.pt"), "--input", str(root / "images"),
                 "--output", str(tmp_path / "pred")]) == 0
    rows = (tmp_path / "pred/ood_scores.csv").read_text().splitlines()
    assert rows[0] == "file,mahalanobis,knn,flagged" and len(rows) == 17
    assert "OOD" in capsys.readouterr().out
