"""Inference on files: an image folder (PNG/JPG/TIFF) or NIfTI file/folder in, masks out in the same format.

Nothing the user gave is overwritten: the output folder may not be the input folder or hold an input file, two
inputs that would write the same mask are refused, and a folder is written into only when it is empty or holds
an earlier prediction of the same model (``predictions.json`` records which), so an interrupted ``predict``
re-run into its folder finishes it and a prediction of another model is never mixed in.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .data.readers import IMAGE_SUFFIXES, DataError, read_image_2d, read_volume
from .data.store import resize_image
from .evaluation import predict_volume
from .ood import DEFAULT_SCORE, OODDetector, ood_view, pooled_features
from .data.loaders import EvalVolume
from .errors import OutputError
from .outputs import remove_partial_writes
from .utils import atomic_write_bytes, atomic_write_json, fault_point


MANIFEST = "predictions.json"


def _inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input {path} does not exist")
    files = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")
             and p.name.lower().endswith(IMAGE_SUFFIXES + (".nii", ".nii.gz"))]
    if not files:
        raise DataError(f"no image or NIfTI file in {path}")
    return files


def _mask_name(f: Path, spatial_dims: int) -> str:
    return f.name if spatial_dims == 3 else f"{f.name.rsplit('.', 1)[0]}.png"


def _plan_outputs(files: list[Path], input_path: Path, output: Path, spatial_dims: int) -> dict[Path, Path]:
    """``{input: mask path}``, refusing any plan that would overwrite an input or write one mask twice."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file; give a folder")
    if output.resolve() == (input_path if input_path.is_dir() else input_path.parent).resolve():
        raise OutputError(f"--output {output} is the input folder: the masks would overwrite or mix with the "
                          "images; choose another folder")
    plan, by_mask = {}, {}
    for f in files:
        mask = output / _mask_name(f, spatial_dims)
        if mask.name in by_mask:
            raise DataError(f"{by_mask[mask.name].name} and {f.name} would both be written as {mask.name}: rename "
                            "one of them")
        by_mask[mask.name], plan[f] = f, mask
    inputs = {f.resolve() for f in files}
    clash = [m for m in plan.values() if m.resolve() in inputs]
    if clash:
        raise OutputError(f"--output {output}: mask {clash[0]} would overwrite an input; choose another folder")
    return plan


def _claim_output(output: Path, model_path: Path) -> dict:
    """Check ``output`` may be written for this model (see the module docstring) and record the claim."""
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    manifest = output / MANIFEST
    if manifest.is_file():
        try:
            before = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            before = {}
        if before.get("model_sha256") != digest:
            raise OutputError(f"--output {output} holds the predictions of another model ({before.get('model')}); "
                              "choose another folder")
    elif output.is_dir() and any(not p.name.startswith(".") for p in output.iterdir()):
        raise OutputError(f"--output {output} already holds files that predict did not write; choose an empty or "
                          "new folder")
    claim = {"model": str(model_path.resolve()), "model_sha256": digest, "complete": False}
    atomic_write_json(manifest, claim)
    return claim


def predict_path(model_path: str | Path, input_path: str | Path, output: str | Path) -> int:
    """Segment every file under ``input_path`` into ``output`` (PNG label maps or NIfTI, same stems)."""
    from .runner import load_bundle

    model, blob = load_bundle(model_path)
    meta, data = blob["meta"], blob["data"]
    output, input_path = Path(output), Path(input_path)
    plan = _plan_outputs(_inputs(input_path), input_path, output, meta["spatial_dims"])
    output.mkdir(parents=True, exist_ok=True)
    claim = _claim_output(output, Path(model_path))
    remove_partial_writes(output)
    detector = OODDetector.from_state(blob["ood"]) if blob.get("ood") else None
    ood_rows = []
    n = 0
    for f, mask_path in plan.items():
        fault_point("predict")
        is_nifti = f.name.lower().endswith((".nii", ".nii.gz"))
        if meta["spatial_dims"] == 3:
            if not is_nifti:
                raise DataError(f"{f}: a 3D model needs NIfTI input")
            pred = predict_nifti(model, f, data)
            _write_nifti(f, pred, mask_path)
        else:
            if is_nifti:
                raise DataError(f"{f}: a 2D model takes image files (PNG/JPG/TIFF)")
            image = read_image_2d(f, meta["in_channels"])
            size = data["image_size"]  # None: 2D patches at the image's own size, sliding window
            x = torch.from_numpy(resize_image(image, size) if size else image)[None]
            vol = EvalVolume(f.stem, x, None, [], image.shape[1:])
            pred = predict_volume(model, vol, 2, roi_size=data["patch_size"], overlap=data.get("sw_overlap", 0.5),
                                  multiple=getattr(model, "stride", 1))[0]
            _write_png(pred.astype(np.uint8), mask_path)
            if detector is not None:
                sc = detector.score(pooled_features(model, [ood_view(x, size, data["patch_size"])]))
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
    atomic_write_json(output / MANIFEST, {**claim, "complete": True, "masks": {m.name: str(f) for f, m in plan.items()}})
    return n


def predict_nifti(model: torch.nn.Module, path: str | Path, data: dict, device: torch.device | str = "cpu",
                  overlap: float = 0.5) -> np.ndarray:
    """Label map of one NIfTI volume on its own grid (its shape, axis order and affine).

    The training geometry and normalisation of the bundle's ``data`` entry are applied as the store applies them —
    ``orientation`` (axis codes, None/absent: the file's axes), ``spacing`` (mm, None/absent: the file's grid),
    ``normalize`` (None/absent: ``intensity``'s z-score or nothing) with ``intensity_stats`` for ``ct`` — then the
    sliding window over ``patch_size``; the logits are resampled back to the file's grid, argmaxed and reoriented
    (:meth:`~label_efficient.data.geometry.Grid.to_native`). A bundle without these keys predicts as before."""
    from .data.geometry import Grid, normalize
    from .data.readers import read_volume_affine
    from .evaluation import volume_logits

    image, affine = read_volume_affine(path)
    grid = Grid.plan(image.shape, affine, data.get("orientation"), data.get("spacing"))
    mode = data.get("normalize") or ("zscore" if data.get("intensity") == "zscore" else None)
    x = normalize(image[None], mode, data.get("intensity_stats")).astype(np.float32)
    if not grid.identity:
        x = grid.image(x)
    logits = volume_logits(model, torch.from_numpy(x)[None], 3, data["patch_size"], overlap=overlap, device=device)
    return grid.to_native(logits[0])


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
    fault_point(f"write:{path.name}")
    tmp.replace(path)
