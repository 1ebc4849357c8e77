"""Per-volume evaluation: Dice, IoU, HD95, ASD per class (MONAI metrics), sliding window in 3D.

2D data is predicted slice by slice at training size, resized back to each slice's own size and
stacked into its volume (the ACDC protocol). Distances are in voxels (no spacing), as medpy is used
in the published SSL protocols. A class absent from both prediction and ground truth scores Dice 1 and
distance 0; absent from exactly one, Dice 0 and no distance (NaN, left out of the distance means).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.loaders import EvalVolume

METRICS = ("dice", "iou", "hd95", "asd")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Zero-pad the spatial dims of ``x`` up to a multiple; returns the padded tensor and an un-pad function."""
    sizes = x.shape[2:]
    extra = [(-s) % multiple for s in sizes]
    if not any(extra):
        return x, lambda y: y
    pad = []
    for e in reversed(extra):
        pad += [e // 2, e - e // 2]
    slices = (slice(None), slice(None)) + tuple(slice(e // 2, e // 2 + s) for e, s in zip(extra, sizes))
    return F.pad(x, pad), lambda y: y[slices]


@torch.no_grad()
def predict_volume(predict: Callable[[torch.Tensor], torch.Tensor], volume: EvalVolume, spatial_dims: int,
                   roi_size: Sequence[int] | None = None, batch_size: int = 16, overlap: float = 0.5,
                   device: torch.device | str = "cpu", multiple: int = 1) -> np.ndarray:
    """Label map of one volume at the resolution of its ground truth."""
    if spatial_dims == 3:
        from monai.inferers import sliding_window_inference

        x = volume.image.to(device)
        if roi_size is None:
            raise ValueError("3D evaluation needs roi_size (the training patch size)")
        logits = sliding_window_inference(x, tuple(roi_size), batch_size, predict, overlap=overlap, mode="gaussian",
                                          padding_mode="constant")
        return logits.argmax(1)[0].cpu().numpy()
    out = []
    for z0 in range(0, volume.image.shape[0], batch_size):
        x, unpad = pad_to_multiple(volume.image[z0 : z0 + batch_size].to(device), multiple)
        logits = unpad(predict(x)).float()
        out.append(logits.cpu())
    logits = torch.cat(out)
    size = volume.size
    if tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1).numpy()


def _one(pred: np.ndarray, gt: np.ndarray, metric: str) -> float:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p, g = pred.sum() > 0, gt.sum() > 0
    if metric in ("dice", "iou"):
        if not p and not g:
            return 1.0
        inter = float(np.logical_and(pred, gt).sum())
        if metric == "dice":
            return 2 * inter / float(pred.sum() + gt.sum())
        return inter / float(np.logical_or(pred, gt).sum())
    if not p and not g:
        return 0.0
    if not (p and g):
        return math.nan
    pt = torch.from_numpy(np.ascontiguousarray(pred))[None, None].float()
    gtt = torch.from_numpy(np.ascontiguousarray(gt))[None, None].float()
    if metric == "hd95":
        return float(compute_hausdorff_distance(pt, gtt, include_background=True, percentile=95)[0, 0])
    return float(compute_average_surface_distance(pt, gtt, include_background=True, symmetric=True)[0, 0])


def case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, metrics: Iterable[str] = METRICS) -> dict:
    """``{metric: {class_index: value}}`` for the foreground classes 1..C−1."""
    metrics = list(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; available: {METRICS}")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    return {m: {c: _one(pred == c, gt == c, m) for c in range(1, num_classes)} for m in metrics}


def summarize(per_case: dict[str, dict], class_names: Sequence[str]) -> dict:
    """Means over cases per class and overall; top-level keys ``mean_<metric>`` (e.g. ``mean_dice``)."""
    summary: dict = {"per_class": {}}
    if not per_case:
        return summary
    metrics = next(iter(per_case.values())).keys()
    for m in metrics:
        per_class = {}
        for c in next(iter(per_case.values()))[m]:
            vals = [v[m][c] for v in per_case.values() if not math.isnan(v[m][c])]
            per_class[class_names[c] if c < len(class_names) else str(c)] = float(np.mean(vals)) if vals else math.nan
        summary["per_class"][m] = per_class
        finite = [v for v in per_class.values() if not math.isnan(v)]
        summary[f"mean_{m}"] = float(np.mean(finite)) if finite else math.nan
    return summary


def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], volumes: Sequence[EvalVolume], num_classes: int,
             class_names: Sequence[str], spatial_dims: int, metrics: Iterable[str] = METRICS,
             roi_size: Sequence[int] | None = None, device: torch.device | str = "cpu", multiple: int = 1,
             overlap: float = 0.5, keep: int = 0) -> dict:
    """Predict and score every volume; returns ``{"cases": {id: metrics}, "mean_dice": ..., ...}``.

    The label maps of the first ``keep`` volumes are returned under ``"predictions"`` (for overlays).
    """
    per_case, kept = {}, []
    for vol in volumes:
        pred = predict_volume(predict, vol, spatial_dims, roi_size=roi_size, device=device, multiple=multiple,
                              overlap=overlap)
        per_case[vol.id] = case_metrics(pred, vol.label, num_classes, metrics)
        if len(kept) < keep:
            kept.append(pred)
    readable = {cid: {m: {class_names[c]: v for c, v in d.items()} for m, d in res.items()} for cid, res in per_case.items()}
    out = {**summarize(per_case, class_names), "num_cases": len(per_case), "cases": readable}
    return {**out, "predictions": kept} if keep else out
