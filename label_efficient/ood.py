"""Warn when a prediction is likely wrong: out-of-distribution scores on bottleneck features.

Following the OOD-detection-for-segmentation baselines (e.g. González et al., "Distance-based detection of
out-of-distribution silent failures for Covid-19 lung lesion segmentation", MedIA 2022): the bottleneck
feature map (feature tap ``bottleneck``) is average-pooled per image, reduced by PCA fitted on the training
domain, and scored by (a) the Mahalanobis distance to the training features in that PCA space and (b) the
distance to the k-th nearest training feature after L2 normalisation of the pooled features (deep kNN,
Sun et al., ICML 2022). The flagging threshold is a quantile of the scores of the training
domain's validation images (no labels needed).

``flag`` uses the kNN distance by default: across polyp centres (``benchmarks/ood_polyp.py``) it separates the
other centre's test images from the training centre's better than Mahalanobis (AUROC 0.96 / 0.94 vs. 0.78 / 0.94).
Neither score predicts which images are segmented badly (AUROC for "image Dice < 0.5" 0.46 / 0.62 vs. 0.41 / 0.58):
a flag means "unlike the training domain", not "this mask is wrong".
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from .backbones.taps import FeatureTap

SCORES = ("mahalanobis", "knn")
DEFAULT_SCORE = "knn"


@torch.no_grad()
def ood_view(images: torch.Tensor, image_size, patch_size) -> torch.Tensor:
    """What the detector sees of (N, C, H, W) images: as the network was trained on them, or, with 2D patches at
    native size (``patch_size`` without ``image_size``: images of many sizes), resized to the patch size (bilinear,
    antialiased), so that every image gives features of one scale."""
    if image_size is not None or patch_size is None or tuple(images.shape[2:]) == tuple(patch_size):
        return images
    return torch.nn.functional.interpolate(images.float(), size=tuple(patch_size), mode="bilinear",
                                           align_corners=False, antialias=True)


def pooled_features(model: torch.nn.Module, images: Iterable[torch.Tensor], device="cpu") -> np.ndarray:
    """(N, C) average-pooled bottleneck features of every image in the batches ``images``."""
    model.eval()
    feats = []
    with FeatureTap(model, detach=True) as tap:
        for x in images:
            model(x.to(device))
            z = tap["bottleneck"].float()
            feats.append(z.mean(dim=tuple(range(2, z.ndim))).cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


class OODDetector:
    """Mahalanobis and kNN distances in a PCA space of pooled bottleneck features."""

    def __init__(self, n_components: int = 32, k: int = 5, quantile: float = 0.95):
        self.n_components, self.k, self.quantile = n_components, k, quantile
        self.state: dict[str, torch.Tensor] = {}

    def fit(self, train: np.ndarray, val: np.ndarray) -> "OODDetector":
        if len(train) < 2:
            raise ValueError(f"the OOD detector needs at least 2 training images, got {len(train)}")
        mean = train.mean(0)
        _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
        comps = vt[: min(self.n_components, len(train) - 1, train.shape[1])]
        z = (train - mean) @ comps.T
        cov = np.cov(z, rowvar=False).reshape(len(comps), len(comps))
        cov += np.eye(len(comps)) * 1e-3 * max(np.trace(cov) / len(comps), 1e-8)  # shrinkage
        bank = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-8)
        self.state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in {
            "mean": mean, "components": comps, "z_mean": z.mean(0), "precision": np.linalg.inv(cov), "bank": bank,
            "k": np.array(min(self.k, len(train))), "quantile": np.array(self.quantile)}.items()}
        val_scores = self.score(val if len(val) else train)
        for s in SCORES:
            self.state[f"threshold_{s}"] = torch.tensor(float(np.quantile(val_scores[s], self.quantile)))
        return self

    def score(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        st = {k: v.numpy() for k, v in self.state.items()}
        z = (feats - st["mean"]) @ st["components"].T
        d = z - st["z_mean"]
        maha = np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, st["precision"], d), 0))
        fn = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-8)
        dist = np.sqrt(np.maximum(2.0 - 2.0 * fn @ st["bank"].T, 0))
        knn = np.sort(dist, axis=1)[:, int(st["k"]) - 1]
        return {"mahalanobis": maha, "knn": knn}

    def flag(self, scores: dict[str, np.ndarray], by: str = DEFAULT_SCORE) -> np.ndarray:
        if by not in SCORES:
            raise ValueError(f"unknown OOD score {by!r}; available: {SCORES}")
        return scores[by] > float(self.state[f"threshold_{by}"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "OODDetector":
        det = cls(k=int(state["k"]), quantile=float(state["quantile"]))
        det.state = dict(state)
        return det


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann–Whitney U); NaN if one class."""
    pos, neg = scores[positives], scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
