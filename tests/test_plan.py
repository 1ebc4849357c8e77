"""``label-efficient plan``: checks (every problem at once, naming the file), fingerprint, a runnable commented recipe,
and defaults measured from the data (largest-component cleaning, 2D native patches for thin structures, 3D spacing
and CT normalisation)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SHARED, write_image_folder, write_nifti_folder
from label_efficient.cli import main
from label_efficient.errors import DataError, OutputError, OutputExistsError
from label_efficient.plan import lcc_decision, plan, structure_width, target_spacing
from label_efficient.recipe import load_recipe

MEM = ("cpu", 8 * 2**30)  # a fixed device for deterministic derived values
FAST = ["trainer.progress_bar=false", "trainer.accelerator=cpu", "data.max_val_cases=2", "data.max_test_cases=2",
        "evaluation.overlays=0"]


def _flat(text: str) -> str:
    """The recipe text with its wrapped comments joined back (continuation lines start with '#   ')."""
    return " ".join(re.sub(r"\n\s*#\s+", " ", text).split())


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_plan_2d_folder_writes_a_commented_recipe_that_runs(tmp_path):
    from label_efficient.runner import run_recipe

    data = write_image_folder(tmp_path / "discs", n=12)
    (data / "split.csv").unlink()  # no split: plan makes one, next to the recipe
    before = _files(data)
    result = plan(data, tmp_path / "plans" / "discs.yaml", memory=MEM)
    assert _files(data) == before  # nothing written inside the data folder
    assert result.split_path == tmp_path / "plans" / "discs_split.csv"
    rows = list(csv.DictReader(open(result.split_path)))
    assert sorted({r["split"] for r in rows}) == ["test", "train", "val"] and len(rows) == 12
    assert result.split_path.read_text() == plan(data, tmp_path / "plans" / "discs.yaml", force=True,
                                                 memory=MEM).split_path.read_text()  # seeded: the same split
    text = result.recipe_path.read_text()
    raw = yaml.safe_load(text)
    assert raw["data"]["dataset"] == "image_folder" and raw["data"]["root"] == str(data.resolve())
    assert raw["data"]["options"]["num_classes"] == 3 and raw["data"]["image_size"] == [32, 32]
    assert raw["data"]["budget"] == {"all": True} and raw["stages"][0]["strategy"] == "supervised"
    assert "# median H×W 32×32" in text and "batch rule" in text and "steps = 250 passes" in text
    assert "image_folder scales by 1/255" in text
    assert all(len(l) <= 118 for l in text.splitlines())
    recipe = load_recipe(result.recipe_path, ["stages.0.steps=2", "stages.0.val_every=2", *FAST])
    metrics = run_recipe(recipe, tmp_path / "run")
    assert np.isfinite(metrics["mean_dice"])


def test_plan_cli_prints_fingerprint(tmp_path, capsys):
    data = write_image_folder(tmp_path / "discs")
    assert main(["plan", str(data), "--out", str(tmp_path / "r.yaml"), "--labeled", "3"]) == 0
    out = capsys.readouterr().out
    assert "cases 16, labelled 16" in out and "class pixel share" in out and "connected components" in out
    assert "foreground intensity" in out and f"wrote {tmp_path / 'r.yaml'}" in out
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["data"]["budget"] == {"count": 3}


def test_existing_output_refused_without_force(tmp_path, capsys):
    data = write_image_folder(tmp_path / "discs")
    out = tmp_path / "r.yaml"
    out.write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        plan(data, out, memory=MEM)
    assert out.read_text() == "keep me"
    assert main(["plan", str(data), "--out", str(out)]) == 2 and "--force" in capsys.readouterr().err
    plan(data, out, force=True, memory=MEM)
    assert out.read_text().startswith("# Written by")
    with pytest.raises(OutputError, match="inside the data folder"):
        plan(data, data / "r.yaml", memory=MEM)


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def test_every_2d_problem_is_listed_at_once(tmp_path, capsys):
    from PIL import Image

    data = write_image_folder(tmp_path / "bad", n=6)
    img, msk = data / "images", data / "masks"
    rng = np.random.default_rng(0)
    grey = (rng.random((32, 32)) * 255).astype(np.uint8)
    _save(img / "nomask.png", grey)                                         # image without mask
    _save(img / "big.png", np.zeros((40, 40), np.uint8)); _save(msk / "big.png", np.zeros((32, 32), np.uint8))
    _save(img / "seven.png", grey); m = np.zeros((32, 32), np.uint8); m[:4] = 7; _save(msk / "seven.png", m)
    _save(img / "dup.png", grey); _save(img / "dup.jpg", grey); _save(msk / "dup.png", np.zeros((32, 32), np.uint8))
    Image.fromarray((rng.random((32, 32)) * 60000).astype(np.uint16)).save(img / "deep.png")   # 16-bit among 8-bit
    _save(msk / "deep.png", np.zeros((32, 32), np.uint8))
    f = rng.random((32, 32)).astype(np.float32); f[3, 3] = np.nan
    Image.fromarray(f, "F").save(img / "nan.tif"); _save(msk / "nan.png", np.ones((32, 32), np.uint8))
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), img / "vol.nii.gz")   # 3D among 2D
    _save(msk / "vol.png", np.zeros((8, 8), np.uint8))
    _save(img / "photo.png", grey); _save(msk / "photo.png", grey)            # an image saved as its mask
    _save(img / "empty.png", grey); _save(msk / "empty.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError) as e:
        plan(data, tmp_path / "r.yaml", memory=MEM)
    msg = str(e.value)
    expected = {
        "images/nomask.png has no mask": "image without mask",
        "masks/big.png is 32×32 (H×W) but its image images/big.png is 40×40": "shape",
        "masks/seven.png holds label value(s) [7]": "label values",
        "images/dup.jpg and dup.png share the stem 'dup'": "duplicate stem",
        "images/deep.png is a 16-bit image": "bit depth",
        "images/nan.tif holds 1 NaN or infinite value(s)": "NaN",
        "images/vol.nii.gz is a NIfTI volume among": "mixed 2D/3D",
        "masks/photo.png holds": "not a label map",
        "warning: masks/empty.png is empty": "empty mask",
    }
    for text, what in expected.items():
        assert text in msg, (what, msg)
    assert "looks like an image, not a label map" in msg and "re-save the mask at the image's size" in msg
    assert not (tmp_path / "r.yaml").exists()
    assert main(["plan", str(data), "--out", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(t in err for t in expected)


def _nifti(path: Path, arr: np.ndarray, affine=None) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), path)


def test_every_nifti_problem_is_listed_at_once(tmp_path):
    data = write_nifti_folder(tmp_path / "bad", n=6, shape=(14, 14, 14))
    img, lab = data / "imagesTr", data / "labelsTr"
    _nifti(img / "four.nii.gz", np.zeros((14, 14, 14, 2), np.float32)); _nifti(lab / "four.nii.gz", np.zeros((14, 14, 14), np.uint8))
    _nifti(img / "shape.nii.gz", np.zeros((14, 14, 14), np.float32)); _nifti(lab / "shape.nii.gz", np.zeros((14, 14, 6), np.uint8))
    _nifti(img / "aff.nii.gz", np.zeros((14, 14, 14), np.float32))
    _nifti(lab / "aff.nii.gz", np.zeros((14, 14, 14), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]))
    two = np.zeros((14, 14, 14), np.uint8); two[2:4] = 2
    _nifti(img / "two.nii.gz", np.zeros((14, 14, 14), np.float32)); _nifti(lab / "two.nii.gz", two)
    nanv = np.zeros((14, 14, 14), np.float32); nanv[0, 0, 0] = np.inf
    _nifti(img / "inf.nii.gz", nanv); _nifti(lab / "inf.nii.gz", np.zeros((14, 14, 14), np.uint8))
    listed = [f"v{i:02d}" for i in range(5)] + ["four", "shape", "aff", "two", "inf", "ghost"]  # v05 unlisted
    (data / "dataset.json").write_text(json.dumps({
        "name": "bad", "labels": {"0": "background", "1": "ball"}, "modality": {"0": "MRI"}, "numTraining": 7,
        "training": [{"image": f"./imagesTr/{s}.nii.gz", "label": f"./labelsTr/{s}.nii.gz"} for s in listed]}))
    with pytest.raises(DataError) as e:
        plan(data, tmp_path / "r.yaml", memory=MEM)
    msg = str(e.value)
    for text in ("imagesTr/four.nii.gz has shape (14, 14, 14, 2) (4D)",
                 "labelsTr/shape.nii.gz has shape (14, 14, 6) but its image imagesTr/shape.nii.gz has (14, 14, 14)",
                 "labelsTr/aff.nii.gz: its affine differs",
                 "labelsTr/two.nii.gz holds label value(s) [2] not in dataset.json's labels [0, 1]",
                 "imagesTr/inf.nii.gz holds 1 NaN or infinite value(s)",
                 "dataset.json lists ./imagesTr/ghost.nii.gz, which does not exist",
                 "imagesTr/v05.nii.gz is in no 'training' entry of dataset.json",
                 "numTraining is 7 but imagesTr holds 11 case(s)"):
        assert text in msg, (text, msg)


def test_nnunet_v2_ct_layout_is_linked_next_to_the_recipe(tmp_path):
    from label_efficient.data import build_dataset

    data = tmp_path / "Dataset001_Ball"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        lab = np.zeros((20, 20, 16), np.uint8)
        lab[5 + i:12 + i, 5:12, 4:10] = 1
        ct = np.where(lab, 60, -1000) + rng.normal(0, 10, lab.shape)
        _nifti(data / "imagesTr" / f"ball_{i:03d}_0000.nii.gz", ct.astype(np.float32))
        _nifti(data / "labelsTr" / f"ball_{i:03d}.nii.gz", lab)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "ball": 1},
                                                   "numTraining": 6, "file_ending": ".nii.gz"}))
    before = _files(data)
    result = plan(data, tmp_path / "plans" / "ball.yaml", labeled=2, memory=MEM)
    assert _files(data) == before
    raw = yaml.safe_load(result.recipe_path.read_text())
    d = raw["data"]
    assert d["dataset"] == "nifti_folder" and d["root"] == str(tmp_path / "plans" / "ball_data")
    assert d["options"]["class_names"] == ["background", "ball"] and d["patch_size"] == [32, 32, 32]
    text = result.recipe_path.read_text()
    assert "CT (dataset.json modality CT)" in text and "nnU-Net's CT scheme: clip" in text
    assert d["normalize"] == "ct" and "intensity" not in d["options"]  # data.normalize replaces the dataset's option
    spec = build_dataset(d["dataset"], d["root"], **d["options"])
    assert len(spec.cases) == 6 and all(c.mask is not None for c in spec.cases)


def _vessels(root: Path, n: int = 10, size: int = 48) -> Path:
    """Masks of several thin, separate line segments (vessel-like): many components per mask."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        for k in range(rng.integers(4, 8)):
            r = 3 + 6 * k
            c0 = int(rng.integers(0, size // 3))
            m[r, c0:c0 + int(rng.integers(10, size // 2))] = 1
        img = (40 + 150 * m + rng.normal(0, 5, m.shape)).clip(0, 255).astype(np.uint8)
        _save(root / "images" / f"v{i:02d}.png", img)
        _save(root / "masks" / f"v{i:02d}.png", m)
    return root


def test_largest_component_off_for_vessels_on_for_blobs(tmp_path):
    vessels = plan(_vessels(tmp_path / "vessels"), tmp_path / "v.yaml", strategy="bcp", labeled=2, memory=MEM)
    raw = yaml.safe_load(vessels.text)
    assert [s["strategy"] for s in raw["stages"]] == ["bcp_pretrain", "bcp"]
    assert raw["stages"][1]["config"]["largest_component"] is False and vessels.lcc[0] is False
    assert "largest_component OFF: the labelled masks have several structures per class" in " ".join(vessels.text.split())
    assert "class1 median" in vessels.lcc[1]
    blobs = plan(write_image_folder(tmp_path / "discs"), tmp_path / "b.yaml", strategy="bcp", memory=MEM)
    raw = yaml.safe_load(blobs.text)
    assert raw["stages"][1]["config"]["largest_component"] is True
    assert "ON: one structure per class per mask (class1 median 1 (max 1) components" in blobs.lcc[1]
    assert raw["data"]["budget"] == {"count": 1}  # no --labeled: 10 % of the 10 train cases
    assert raw["stages"][0]["batch_size"]["labeled"] % 2 == 0  # BCP splits its batches in halves
    load_recipe(blobs.recipe_path)


def _thin_vessels(root: Path, n: int = 10, size: int = 256) -> Path:
    """256² images whose masks are five separate long lines 1–2 px wide (vessel-like), no split.csv."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        m = np.zeros((size, size), np.uint8)
        for k in range(5):
            r, w = 20 + 45 * k + int(rng.integers(0, 10)), int(rng.integers(1, 3))
            m[r:r + w, 10:size - 10] = 1
        img = (40 + 150 * m + rng.normal(0, 5, m.shape)).clip(0, 255).astype(np.uint8)
        _save(root / "images" / f"v{i:02d}.png", img)
        _save(root / "masks" / f"v{i:02d}.png", m)
    return root


def test_structure_width_is_the_thickest_part():
    m = np.zeros((40, 40), np.uint8)
    m[5, 2:30] = 1  # a 1-px line: distance to background 1
    assert structure_width(m, 1) == 2.0
    m[:] = 0
    m[10:21, 10:21] = 1  # an 11-px square: 2 × 6
    assert structure_width(m, 1) == 12.0 and structure_width(m, 2) is None


def test_thin_structures_get_native_patches_blobs_keep_image_size(tmp_path):
    from label_efficient.runner import run_recipe

    thin = plan(_thin_vessels(tmp_path / "thin"), tmp_path / "thin.yaml", memory=MEM)
    d = yaml.safe_load(thin.text)["data"]
    assert "image_size" not in d and d["patch_size"] == [128, 128] and d["foreground_ratio"] == 0.33
    text = _flat(thin.text)
    assert "structure widths" in text and "class1 2 px" in text and "divides them by 2" in text
    assert "class1 would be 1 px (< 2 px), so native resolution" in text and "nnU-Net's rule" in text
    assert yaml.safe_load(thin.text)["evaluation"]["sw_overlap"] == 0.5
    assert thin.fingerprint["components"]["class1"]["width_median"] == 2.0
    recipe = load_recipe(thin.recipe_path, ["stages.0.steps=2", "stages.0.val_every=2",
                                            "stages.0.batch_size.labeled=2", *FAST])
    assert np.isfinite(run_recipe(recipe, tmp_path / "run")["mean_dice"])
    blobs = plan(write_image_folder(tmp_path / "blobs", n=8, size=256), tmp_path / "b.yaml", memory=MEM)
    d = yaml.safe_load(blobs.text)["data"]
    assert d["image_size"] == [128, 128] and "patch_size" not in d and "foreground_ratio" not in d
    assert "every class stays ≥ 2 px wide" in _flat(blobs.text)


def _ct_volumes(root: Path, spacings: list[tuple[float, float, float]], shape=(24, 24, 16)) -> Path:
    """CT-like volumes (air -1000 HU, a 60 HU ball) on grids of the given spacings; split 4/1/1 by plan."""
    rng = np.random.default_rng(2)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.stack(np.mgrid[tuple(slice(0, s) for s in shape)], -1)
    for i, sp in enumerate(spacings):
        lab = (np.linalg.norm(grid - rng.uniform(7, np.array(shape) - 7), axis=-1) < 5).astype(np.uint8)
        ct = np.where(lab, 60, -1000) + rng.normal(0, 10, shape)
        affine = np.diag([*sp, 1.0])
        _nifti(root / "imagesTr" / f"ct{i:02d}.nii.gz", ct.astype(np.float32), affine)
        _nifti(root / "labelsTr" / f"ct{i:02d}.nii.gz", lab, affine)
    return root


def test_3d_geometry_median_spacing_and_ct_normalisation(tmp_path):
    from label_efficient.runner import run_recipe

    spacings = [(1.0, 1.0, 1.5), (1.1, 1.1, 1.5), (0.9, 0.9, 1.6), (1.0, 1.0, 1.4), (1.2, 1.2, 1.5), (1.0, 1.0, 1.5)]
    result = plan(_ct_volumes(tmp_path / "ct", spacings), tmp_path / "ct.yaml", memory=MEM)
    d = yaml.safe_load(result.text)["data"]
    assert d["spacing"] == [1.0, 1.0, 1.5] and d["orientation"] == "RAS" and d["foreground_ratio"] == 0.33
    assert d["normalize"] == "ct" and "intensity" not in d["options"] and d["patch_size"] == [32, 32, 32]
    text = _flat(result.text)
    assert "spacings differ across volumes" in text and "median spacing 1×1×1.5 mm" in text
    assert "intensities in HU: lowest value" in text and "on the 1×1×1.5 mm grid" in text
    assert "at least 32 (the U-Net's 3 halvings keep a 4-voxel bottleneck" in text  # 24×24×16 volumes, padded
    recipe = load_recipe(result.recipe_path, ["stages.0.steps=2", "stages.0.val_every=2", *FAST])
    assert recipe.data.spacing == [1.0, 1.0, 1.5] and recipe.data.normalize == "ct"
    assert np.isfinite(run_recipe(recipe, tmp_path / "run")["mean_dice"])
    same = plan(write_nifti_folder(tmp_path / "mr", n=6), tmp_path / "mr.yaml", memory=MEM)
    d = yaml.safe_load(same.text)["data"]
    assert "spacing" not in d and "normalize" not in d and d["options"]["intensity"] == "zscore"
    assert "every volume has spacing 1×1×1 mm (within 1 % per axis): no resampling" in _flat(same.text)


def test_target_spacing_rules():
    assert target_spacing([(1, 1, 1)] * 3 + [(1.005, 1, 1)], [(50, 50, 50)] * 4)[0] is None  # within 1 %
    spacing, why = target_spacing([(0.7, 0.7, 5.0), (0.8, 0.8, 6.0), (0.7, 0.7, 3.0), (0.75, 0.75, 5.0),
                                   (0.7, 0.7, 4.0)], [(512, 512, 60)] * 5)
    assert spacing[:2] == [0.7, 0.7] and spacing[2] == pytest.approx(np.percentile([5, 6, 3, 5, 4], 10))
    assert "anisotropic" in why and "10th percentile" in why
    spacing, why = target_spacing([(1, 1, 1.2), (1, 1, 1.4), (1, 1, 1.3)], [(64, 64, 64)] * 3)
    assert spacing == [1.0, 1.0, 1.3] and "anisotropic" not in why


def test_lcc_decision_is_reusable():
    fp = {"components": {"vessel": {"masks": 4, "median": 5.0, "max": 9, "outside_largest": 0.6}}}
    on, why = lcc_decision(fp)
    assert on is False and "vessel median 5" in why


def test_budget_flag_becomes_ids(tmp_path):
    data = write_image_folder(tmp_path / "discs")
    rows = list(csv.DictReader(open(data / "split.csv")))
    with open(data / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["stem", "split", "labeled_2"])
        w.writeheader()
        w.writerows({**r, "labeled_2": int(i < 2)} for i, r in enumerate(rows))
    raw = yaml.safe_load(plan(data, tmp_path / "r.yaml", budget_flag="labeled_2", memory=MEM).text)
    assert raw["data"]["budget"] == {"ids": ["case00", "case01"]}
    with pytest.raises(DataError, match="its flag columns: \\['labeled_2'\\]"):
        plan(data, tmp_path / "r.yaml", budget_flag="labeled_9", force=True, memory=MEM)


SHARED_CASES = {"acdc": ["--budget-flag", "labeled_7"], "la_heart": ["--budget-flag", "labeled_4"],
                "polyp_kvasir_cvc": ["--images", "kvasir/images", "--masks", "kvasir/masks", "--labeled", "70"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHARED_CASES))
def test_plan_on_shared_datasets_runs(name, tmp_path, capsys):
    if not (SHARED / name).is_dir():
        pytest.skip(f"shared/data/{name} not present")
    from label_efficient.runner import run_recipe

    out = tmp_path / f"{name}.yaml"
    assert main(["plan", str(SHARED / name), "--out", str(out), *SHARED_CASES[name]]) == 0
    printed = capsys.readouterr().out
    assert "fingerprint of" in printed
    sets = ["stages.0.steps=2", "stages.0.val_every=2", *FAST]
    if name == "la_heart":
        sets.append("data.patch_size=[32,32,32]")
    recipe = load_recipe(out, sets)
    metrics = run_recipe(recipe, tmp_path / "run")
    assert np.isfinite(metrics["mean_dice"])
