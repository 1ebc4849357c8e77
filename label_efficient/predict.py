"""Inference on files: an image folder (PNG/JPG/TIFF) or NIfTI file/folder in, masks out in the same format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.readers import IMAGE_SUFFIXES, DataError, read_image_2d, read_volume
from .data.store import resize_image
from .evaluation import predict_volume
from .ood import DEFAULT_SCORE, OODDetector, pooled_features
from .data.loaders import EvalVolume
from .utils import atomic_write_bytes


def _inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist")
    files = [p for p in sorted(path.iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES + (".nii", ".nii.gz"))]
    if not files:
        raise DataError(f"no image or NIfTI file in {path}")
    return files


def predict_path(model_path: str | Path, input_path: str | Path, output: str | Path) -> int:
    """Segment every file under ``input_path`` into ``output`` (PNG label maps or NIfTI, same stems)."""
    from .runner import load_bundle

    model, blob = load_bundle(model_path)
    meta, data = blob["meta"], blob["data"]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    detector = OODDetector.from_state(blob["ood"]) if blob.get("ood") else None
    ood_rows = []
    n = 0
    for f in _inputs(Path(input_path)):
        is_nifti = f.name.lower().endswith((".nii", ".nii.gz"))
        if meta["spatial_dims"] == 3:
            if not is_nifti:
                raise DataError(f"{f}: a 3D model needs NIfTI input")
            image = read_volume(f)[None]
            if data["intensity"] == "zscore":
                image = (image - image.mean()) / max(float(image.std()), 1e-8)
            vol = EvalVolume(f.name, torch.from_numpy(image.astype(np.float32))[None], None, [], image.shape[1:])
            pred = predict_volume(model, vol, 3, roi_size=data["patch_size"])
            _write_nifti(f, pred, output / f.name)
        else:
            if is_nifti:
                raise DataError(f"{f}: a 2D model takes image files (PNG/JPG/TIFF)")
            image = read_image_2d(f, meta["in_channels"])
            x = torch.from_numpy(resize_image(image, data["image_size"]))[None]
            vol = EvalVolume(f.stem, x, None, [], image.shape[1:])
            pred = predict_volume(model, vol, 2, multiple=getattr(model, "stride", 1))[0]
            _write_png(pred.astype(np.uint8), output / f"{f.stem}.png")
            if detector is not None:
                sc = detector.score(pooled_features(model, [x]))
                ood_rows.append((f.name, float(sc["mahalanobis"][0]), float(sc["knn"][0]), bool(detector.flag(sc)[0])))
        n += 1
    if ood_rows:
        lines = ["file,mahalanobis,knn,flagged"] + [f"{a},{b:.4f},{c:.4f},{int(d)}" for a, b, c, d in ood_rows]
        atomic_write_bytes(output / "ood_scores.csv", ("\n".join(lines) + "\n").encode())
        flagged = [r[0] for r in ood_rows if r[3]]
        print(f"OOD warning: {len(flagged)} of {len(ood_rows)} image(s) look unlike the training domain "
              f"({DEFAULT_SCORE} feature distance above the val threshold; it does not tell which masks are wrong): "
              f"{', '.join(flagged[:10])}" if flagged else
              f"OOD check: all {len(ood_rows)} image(s) within the training domain's range")
    return n


def _write_png(mask: np.ndarray, path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _write_nifti(reference: Path, mask: np.ndarray, path: Path) -> None:
    import nibabel as nib

    ref = nib.load(str(reference))
    img = nib.Nifti1Image(mask.astype(np.uint8), ref.affine)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)
