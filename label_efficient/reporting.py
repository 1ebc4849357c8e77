"""Pictures for a run: overlays of test predictions and the learning curve."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .utils import atomic_write_bytes


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def overlays(volumes, predictions, ctx, folder: Path) -> None:
    """Middle slice of each volume: image, ground-truth contours, prediction as a colour overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    for vol, pred in zip(volumes, predictions):
        if ctx.spec.spatial_dims == 2:
            z = len(vol.cases) // 2
            img = F.interpolate(vol.image[z : z + 1], size=vol.size, mode="bilinear")[0].numpy()
            img, gt, pr = img.transpose(1, 2, 0), vol.label[z], pred[z]
        else:
            z = vol.label.shape[-1] // 2
            img, gt, pr = vol.image[0, 0, :, :, z].numpy(), vol.label[..., z], pred[..., z]
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(img.squeeze(), cmap="gray")
        ax.imshow(np.ma.masked_equal(pr, 0), cmap="autumn", alpha=0.4, vmin=0, vmax=ctx.spec.num_classes - 1)
        ax.contour(gt, levels=np.arange(ctx.spec.num_classes) + 0.5, colors="cyan", linewidths=0.7)
        ax.set_title(f"{vol.id} (prediction: colour, truth: cyan)", fontsize=7)
        ax.axis("off")
        _save(fig, folder / f"{vol.id.replace('/', '_')}.png")


def learning_curve(run_dir: Path, path: Path) -> None:
    """Training loss and validation Dice against the global step, one panel each, all stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    offset = 0
    for stage_csv in sorted(run_dir.glob("stage*/metrics.csv")):
        rows = list(csv.DictReader(open(stage_csv)))
        tr = [(int(r["step"]) + offset, float(r["train/loss"])) for r in rows if r.get("train/loss")]
        va = [(int(r["step"]) + offset, float(r["val/mean_dice"])) for r in rows if r.get("val/mean_dice")]
        label = stage_csv.parent.name
        if tr:
            a1.plot(*zip(*tr), label=label, lw=0.8)
        if va:
            a2.plot(*zip(*va), marker=".", label=label)
        offset += max([s for s, _ in tr], default=0)
    a1.set(xlabel="step", ylabel="train loss", yscale="log")
    a2.set(xlabel="step", ylabel="val mean Dice")
    for a in (a1, a2):
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    _save(fig, path)


def generated_pairs(folder: Path, store, cases, path: Path, rows: int = 6, cols: int = 5) -> None:
    """A grid of generated pairs (2D): per source case its image, then up to ``cols`` generated images, the mask's
    contours on each (the label every generated image carries)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = json.loads((folder / "manifest.json").read_text())
    by_id = {c.id: c for c in cases}
    ids = manifest["cases"]
    spread = np.unique(np.linspace(0, len(ids) - 1, rows).round().astype(int)) if ids else []
    picked = [by_id[ids[i]] for i in spread if ids[i] in by_id]
    if not picked:
        return
    cols = min(cols, manifest["variants"])
    fig, axes = plt.subplots(len(picked), cols + 1, figsize=(1.6 * (cols + 1), 1.6 * len(picked)), squeeze=False)
    levels = np.arange(store.spec.num_classes) + 0.5
    for r, case in enumerate(picked):
        with np.load(folder / f"{case.id}.npz") as z:
            images, label = z["images"][:cols], z["label"]
        src = store.get(case, True).image
        lo, hi = float(src.min()), float(src.max())
        for k, ax in enumerate(axes[r]):
            ax.axis("off")
            if k > len(images):
                continue
            img = src if k == 0 else images[k - 1]
            ax.imshow(img[0], cmap="gray", vmin=lo, vmax=hi)
            ax.contour(label, levels=levels, colors="cyan", linewidths=0.5)
            ax.set_title("source" if k == 0 else f"generated {k}", fontsize=6)
    fig.suptitle("generated pairs: the source's foreground and mask (cyan), new background", fontsize=7)
    _save(fig, path)
