import numpy as np
import torch

from label_efficient.backbones import build_backbone
from label_efficient.ood import DEFAULT_SCORE, OODDetector, auroc, pooled_features


def test_detector_scores_shifted_features_higher():
    # pooled features of a domain cluster around one (positive) direction; a shifted domain changes that
    # direction, which the L2-normalised kNN distance sees (a shift along the mean direction it would not)
    rng = np.random.default_rng(0)
    mu, shift = np.full(16, 3.0), np.r_[np.full(8, 3.0), np.zeros(8)]
    feats = lambda n, m: m + rng.normal(0, 0.5, (n, 16))  # noqa: E731
    train = feats(200, mu)
    det = OODDetector(n_components=8, k=3).fit(train, feats(50, mu))
    near, far = det.score(feats(30, mu)), det.score(feats(30, mu + shift))
    for s in ("mahalanobis", "knn"):
        assert near[s].mean() < far[s].mean()
        assert det.flag(far, by=s).mean() > 0.9 and det.flag(near, by=s).mean() < 0.3
    again = OODDetector.from_state(det.state_dict())
    assert np.allclose(again.score(train[:5])["knn"], det.score(train[:5])["knn"])


def test_flag_defaults_to_knn_and_knn_uses_the_kth_neighbour():
    """The warning's default score is the deep-kNN distance (benchmarks/ood_polyp.py); the k-th neighbour counts."""
    import inspect

    import pytest

    assert DEFAULT_SCORE == "knn" and inspect.signature(OODDetector.flag).parameters["by"].default == "knn"
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (40, 8))
    det = OODDetector(n_components=4, k=1).fit(train, rng.normal(0, 1, (20, 8)))
    sc = det.score(np.concatenate([train[:3], rng.normal(0, 1, (50, 8))]))
    assert np.allclose(sc["knn"][:3], 0, atol=1e-3) and (sc["knn"][3:] > 1e-2).all()  # a bank member: distance 0
    det2 = OODDetector(n_components=4, k=2).fit(train, rng.normal(0, 1, (20, 8)))
    assert (det2.score(train[:3])["knn"] > 1e-2).all()  # k=2: the nearest *other* bank member
    mixed = {"knn": np.array([0.0, 9.0]), "mahalanobis": np.array([9.0, 0.0])}
    assert det.flag(mixed).tolist() == det.flag(mixed, by="knn").tolist() == [False, True]
    with pytest.raises(ValueError, match="unknown OOD score"):
        det.flag(mixed, by="entropy")


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
