"""Fault injection: bad inputs a new user hits, and kill -9 at named points of a run and of ``predict``.

Every bad input must stop with a one-line message naming the file or key and the fix, before training where it can
be known then; nothing the user gave may be overwritten; a killed run resumed with ``--resume`` must give the same
``metrics.json`` (timing fields aside) as a run never interrupted, and no half-written file may be read.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_recipe, tiny_recipe_3d, write_image_folder, write_nifti_folder
from label_efficient.cli import main
from label_efficient.errors import CheckpointError, DataError, OutputError, RecipeError, UserError
from label_efficient.recipe import load_recipe, parse_recipe
from label_efficient.runner import run_recipe

TIMING = ("train_seconds", "wall_seconds", "peak_rss_mb")


def _result(out: Path) -> dict:
    """metrics.json without its timing (wall clock cannot repeat)."""
    from label_efficient.provenance import VOLATILE

    m = json.loads((out / "metrics.json").read_text())
    for k in TIMING:
        m.pop(k)
    for s in m["stages"]:
        s.pop("seconds")
    for k in VOLATILE:
        m.get("provenance", {}).pop(k, None)
    return m


def _cli(args: list[str], kill_at: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LABEL_EFFICIENT_KILL_AT", None)
    if kill_at:
        env["LABEL_EFFICIENT_KILL_AT"] = kill_at
    code = "import sys, torch; torch.set_num_threads(1); from label_efficient.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


# --- kill -9, then --resume ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in this process) that every killed-and-resumed run must reproduce."""
    root = write_image_folder(tmp_path_factory.mktemp("data") / "discs")
    raw = tiny_recipe(root, steps=9, val_every=3)
    folder = tmp_path_factory.mktemp("ref")
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run_recipe(load_recipe(recipe), folder / "run")
    return recipe, folder / "run", root


# kill points: a training step chosen at random (seeded), mid-write of a checkpoint, mid-evaluation and mid-write
# of the bundle; each then resumes
_STEP = int(np.random.default_rng(23).integers(2, 9))


@pytest.mark.parametrize("kill_at", [f"step@{_STEP}", "write:last.ckpt@2", "evaluate@2", "write:model.pt@1"],
                         ids=["training", "checkpoint_write", "evaluation", "bundle_write"])
def test_kill_then_resume_gives_identical_metrics(reference, tmp_path, kill_at):
    recipe, ref, _ = reference
    out = tmp_path / "run"
    killed = _cli(["run", str(recipe), "--out", str(out)], kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    for ckpt in out.rglob("*.ckpt"):  # whatever the kill left under a final name is whole
        torch.load(ckpt, weights_only=True)
    if kill_at.startswith("write:"):
        assert list(out.rglob(".*.tmp")), "the kill should have left a partial write behind"
    assert main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    assert not list(out.rglob(".*.tmp*")), "partial writes are removed on resume"
    assert _result(out) == _result(ref)
    a = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_predict_reruns_to_the_same_masks(reference, tmp_path):
    _, ref, root = reference
    model = ref / "model.pt"
    assert main(["predict", "--model", str(model), "--input", str(root / "images"), "--output",
                 str(tmp_path / "full")]) == 0
    killed = _cli(["predict", "--model", str(model), "--input", str(root / "images"), "--output",
                   str(tmp_path / "cut")], kill_at="write:case05.png@1")
    assert killed.returncode == -9
    assert not json.loads((tmp_path / "cut/predictions.json").read_text())["complete"]
    assert main(["predict", "--model", str(model), "--input", str(root / "images"), "--output",
                 str(tmp_path / "cut")]) == 0  # the same model may finish its own folder
    full, cut = sorted((tmp_path / "full").glob("*.png")), sorted((tmp_path / "cut").glob("*.png"))
    assert [p.name for p in full] == [p.name for p in cut] and len(full) == 16
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(full, cut))
    assert not list((tmp_path / "cut").glob(".*"))
    assert json.loads((tmp_path / "cut/predictions.json").read_text())["complete"]


# --- nothing the user gave is overwritten ------------------------------------------------------------------------

def test_predict_refuses_to_write_into_its_input(reference, tmp_path, capsys):
    _, ref, root = reference
    images = tmp_path / "imgs"
    images.mkdir()
    for p in sorted((root / "images").glob("*.png"))[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert main(["predict", "--model", str(ref / "model.pt"), "--input", str(images), "--output", str(images)]) == 2
    assert "is the input folder" in _error_line(capsys)
    one = images / "case00.png"
    assert main(["predict", "--model", str(ref / "model.pt"), "--input", str(one), "--output", str(images)]) == 2
    assert "is the input folder" in _error_line(capsys)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_predict_refuses_two_inputs_of_one_mask_name(reference, tmp_path, capsys):
    _, ref, root = reference
    images = tmp_path / "imgs"
    images.mkdir()
    img = Image.open(root / "images/case00.png")
    img.save(images / "scan.png")
    img.save(images / "scan.jpg")
    assert main(["predict", "--model", str(ref / "model.pt"), "--input", str(images), "--output",
                 str(tmp_path / "out")]) == 2
    assert "scan.jpg and scan.png would both be written as scan.png" in _error_line(capsys) \
        or "scan.png and scan.jpg would both be written as scan.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_never_mixes_into_a_folder_it_did_not_write(reference, tmp_path, capsys):
    _, ref, root = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["predict", "--model", str(ref / "model.pt"), "--input", str(root / "images"), "--output",
                 str(out)]) == 2
    assert "already holds files that predict did not write" in _error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine"


def test_training_refuses_two_images_of_one_stem(tmp_path):
    root = write_image_folder(tmp_path / "d", n=8)
    Image.open(root / "images/case00.png").save(root / "images/case00.jpg")
    with pytest.raises(DataError, match=r"images: case00.jpg and case00.png share the stem 'case00' \(masks and outputs are matched by stem\): rename"):
        run_recipe(parse_recipe(tiny_recipe(root)), tmp_path / "run")


def test_resume_with_another_recipe_is_refused_naming_the_keys(reference, tmp_path, capsys):
    recipe, ref, _ = reference
    out = tmp_path / "run"
    assert _cli(["run", str(recipe), "--out", str(out)], kill_at="step@4").returncode == -9
    saved = (out / "recipe.resolved.yaml").read_text()
    for override, key in ((["stages.0.steps=6", "seed=4"], "seed (3 → 4); stages.0.steps (9 → 6)"),
                          (["data.budget.count=3"], "data.budget.count (4 → 3)"),
                          (["backbone.name=attention_unet"], "backbone.name ('unet' → 'attention_unet')")):
        args = ["run", str(recipe), "--out", str(out), "--resume"] + [a for o in override for a in ("--set", o)]
        assert main(args) == 2
        line = _error_line(capsys)
        assert "was made by another recipe; differing keys" in line and key in line, line
    assert (out / "recipe.resolved.yaml").read_text() == saved
    assert not (out / "metrics.json").exists()
    # a cosmetic key may differ, and the same recipe resumes
    assert main(["run", str(recipe), "--out", str(out), "--resume", "--set", "trainer.progress_bar=true"]) == 0
    assert _result(out) == _result(ref)
    assert json.loads((out / "metrics.json").read_text())["recipe_sha256"] == \
        json.loads((ref / "metrics.json").read_text())["recipe_sha256"]


def test_a_failed_check_leaves_no_output_folder(image_folder, tmp_path):
    raw = tiny_recipe(image_folder)
    raw["evaluation"]["split"] = "tset"
    with pytest.raises(RecipeError, match=r"evaluation.split: 'tset' is not a split of dataset 'discs'. Did you mean "
                                          r"'test'\? Its splits: \['test', 'train', 'val'\]"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- silently wrong before --------------------------------------------------------------------------------------

def test_mixed_bit_depths_are_refused(tmp_path):
    root = write_image_folder(tmp_path / "d", n=8)
    arr = np.asarray(Image.open(root / "images/case03.png")).astype(np.uint16) * 100
    (root / "images/case03.png").unlink()
    Image.fromarray(arr).save(root / "images/case03.png")  # 16-bit, max ~26 000
    assert Image.open(root / "images/case03.png").mode.startswith("I")
    with pytest.raises(DataError, match=r"case03.png is a 16-bit image but .*case00.png is 8-bit.*one bit depth"):
        run_recipe(parse_recipe(tiny_recipe(root)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,msg", [
    ("max_test_cases", -1, "key 'data.max_test_cases': Input should be greater than or equal to 1"),
    ("image_size", [0, 0], "key 'data.image_size.0': Input should be greater than 0"),
    ("image_size", [32], "key 'data.image_size': List should have at least 2 items"),
])
def test_bad_sizes_are_named(image_folder, key, value, msg):
    raw = tiny_recipe(image_folder)
    raw["data"][key] = value
    with pytest.raises(RecipeError, match=msg.replace("(", r"\(")):
        parse_recipe(raw)


def test_split_csv_rows_without_files_and_files_without_rows(tmp_path, caplog):
    root = write_image_folder(tmp_path / "d", n=10)
    (root / "images/case09.png").unlink()
    (root / "masks/case09.png").unlink()
    with pytest.raises(DataError, match=r"split.csv lists 1 case\(s\) with no file in .*\['case09'\]: add the files"):
        run_recipe(parse_recipe(tiny_recipe(root)), tmp_path / "run")
    rows = list(csv.DictReader(open(root / "split.csv")))
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["stem", "split"])
        w.writeheader()
        w.writerows([r for r in rows if r["stem"] not in ("case09", "case08")])
    from label_efficient.data import build_dataset

    with caplog.at_level("WARNING"):
        spec = build_dataset("image_folder", root, num_classes=3, split_csv="split.csv")
    assert "1 file(s) in" in caplog.text and "are in no split" in caplog.text and "case08" in caplog.text
    assert [c.id for c in spec.select("test")] == ["case07"] and spec.cases[-1].split == "unused"


# --- unclear or late failures before ----------------------------------------------------------------------------

def _nan_volume(root: Path, stem: str) -> None:
    import nibabel as nib

    path = root / "imagesTr" / f"{stem}.nii.gz"
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)


@pytest.mark.parametrize("stem,which", [("v05", "unlabelled"), ("v00", "labelled")])
def test_nan_voxels_are_named_before_training(tmp_path, stem, which):
    root = write_nifti_folder(tmp_path / "d")
    _nan_volume(root, stem)
    raw = tiny_recipe_3d(root, strategy="mean_teacher", steps=2, val_every=2)
    raw["data"]["budget"] = {"ids": ["v00", "v01", "v02"]}
    with pytest.raises(DataError, match=rf"image .*{stem}.nii.gz holds 1 NaN or infinite value\(s\)"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_nan_pixels_in_a_float_tiff_are_named(tmp_path):
    from label_efficient.data.readers import read_image_2d

    arr = np.full((8, 8), 0.5, np.float32)
    arr[2, 2] = np.inf
    Image.fromarray(arr, mode="F").save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=r"x.tif holds 1 NaN or infinite value\(s\)"):
        read_image_2d(tmp_path / "x.tif")


def test_non_square_image_size_trains(image_folder, tmp_path):
    raw = tiny_recipe(image_folder, steps=4, val_every=2)
    raw["data"]["image_size"] = [32, 48]
    assert 0 <= run_recipe(parse_recipe(raw), tmp_path / "run")["mean_dice"] <= 1


@pytest.mark.parametrize("strategy", ["augpaint", "contrastive_global", "cuts"])
def test_2d_only_strategies_are_refused_on_3d_data(tmp_path, strategy):
    root = write_nifti_folder(tmp_path / "d")
    raw = tiny_recipe_3d(root, strategy=strategy, steps=2)
    raw["data"]["options"]["intensity"] = "unit"
    raw["data"]["budget"] = {"all": True}
    with pytest.raises(RecipeError, match=rf"strategy '{strategy}' works on 2D images, but dataset 'd' is 3D; "
                                          r"strategies for 3D data: \[.*'supervised'"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_rgb_model_refuses_grey_images(tmp_path, capsys):
    root = write_image_folder(tmp_path / "d")
    raw = tiny_recipe(root, steps=2, val_every=2)
    raw["data"]["options"]["in_channels"] = 3
    with pytest.raises(DataError, match=r"case00.png is a grey image \(mode L\) but dataset 'd' is RGB \(in_channels "
                                        r"3\): convert it to RGB, or set data.options.in_channels: 1"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # found before anything was written
    from label_efficient.data.readers import read_image_2d  # what predict reads with an RGB model

    with pytest.raises(DataError, match=r"case00.png is a grey image \(mode L\) but the model takes RGB images"):
        read_image_2d(root / "images/case00.png", 3)


@pytest.mark.parametrize("where,key,msg", [
    ("data", "options", r"data.options: dataset 'image_folder' has no option 'num_clases'. Did you mean 'num_classes'"),
    ("backbone", "kwargs", r"backbone.kwargs of 'unet': .*unexpected keyword argument 'chanels'"),
])
def test_typos_inside_options_and_kwargs_are_named(image_folder, tmp_path, where, key, msg):
    raw = tiny_recipe(image_folder)
    if where == "data":
        raw["data"]["options"]["num_clases"] = raw["data"]["options"].pop("num_classes")
    else:
        raw["backbone"]["kwargs"]["chanels"] = raw["backbone"]["kwargs"].pop("channels")
    with pytest.raises(RecipeError, match=msg):
        run_recipe(parse_recipe(raw), tmp_path / "run")


def test_other_split_names_list_the_csv_splits(tmp_path):
    root = write_image_folder(tmp_path / "d", n=10)
    text = (root / "split.csv").read_text().replace(",train", ",training").replace(",val", ",validation")
    (root / "split.csv").write_text(text)
    with pytest.raises(RecipeError, match=r"data.train_split: 'train' is not a split of dataset 'd'. Did you mean "
                                          r"'training'\? Its splits: \['test', 'training', 'validation'\] \(set "
                                          r"data.train_split"):
        run_recipe(parse_recipe(tiny_recipe(root)), tmp_path / "run")


def test_an_image_size_too_large_for_memory_is_refused(image_folder, tmp_path):
    raw = tiny_recipe(image_folder)
    raw["data"]["image_size"] = [200_000, 200_000]
    with pytest.raises(DataError, match=r"data.image_size \[200000, 200000\]: the 16 images of 'discs' would need "
                                        r".* GiB in memory, .* GiB is available; lower data.image_size"):
        run_recipe(parse_recipe(raw), tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_accelerator_without_a_gpu(image_folder, tmp_path):
    raw = tiny_recipe(image_folder)
    raw["trainer"]["accelerator"] = "gpu"
    with pytest.raises(RecipeError, match="trainer.accelerator: 'gpu', but torch .* sees no CUDA GPU; use auto"):
        run_recipe(parse_recipe(raw), tmp_path / "run")


def test_cli_messages_are_one_line(reference, image_folder, tmp_path, capsys):
    recipe, ref, _ = reference
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")
    cases = [
        (["run", str(bad)], f"error: recipe {bad} is not valid YAML: line 3, column 1"),
        (["run", str(recipe), "--set", "stages.3.steps=5"],
         "error: --set stages.3.steps: 'stages' is a list of 1 item(s), so '3' must be an index 0..0"),
        (["run", str(recipe), "--out", str(recipe)], f"error: --out {recipe} is a file; give a folder"),
        (["run", str(recipe), "--out", str(recipe / "sub")], f"error: --out {recipe / 'sub'} cannot be created"),
        (["sweep", str(recipe), "--seeds", "0"], "error: --seeds must be at least 1, got 0"),
        (["evaluate", str(recipe), "--model", str(ref / "model.pt"), "--split", "tset"],
         "error: --split: 'tset' is not a split of dataset 'discs'. Did you mean 'test'?"),
        (["evaluate", str(recipe), "--model", str(bad)], f"error: {bad} is not a label-efficient model or checkpoint"),
        (["predict", "--model", str(bad), "--input", str(tmp_path), "--output", str(tmp_path / "p")],
         f"error: {bad} is not a label-efficient model or checkpoint"),
        (["run", str(recipe), "--set", "stages.0.strategy=mean_teachr"],
         "Did you mean 'mean_teacher'?"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        line = _error_line(capsys)
        assert line.startswith(expected) or expected in line, (args, line)
        assert "weights_only" not in line and "Traceback" not in line


def test_evaluate_rescores_a_run_folder_and_never_writes_over_its_inputs(reference, tmp_path, capsys):
    recipe, ref, _ = reference
    assert main(["evaluate", str(ref), "--output", str(tmp_path / "ev.json")]) == 0
    again = json.loads((tmp_path / "ev.json").read_text())
    assert again["mean_dice"] == json.loads((ref / "metrics.json").read_text())["mean_dice"]
    before = (ref / "model.pt").read_bytes()
    assert main(["evaluate", str(ref), "--output", str(ref / "model.pt")]) == 2
    assert "is an input of this command" in _error_line(capsys)
    assert (ref / "model.pt").read_bytes() == before


def test_evaluate_rescores_a_run_folder_under_the_ssl4mis_protocol_at_its_training_size(reference, tmp_path):
    recipe, ref, _ = reference
    assert main(["evaluate", str(ref), "--protocol", "ssl4mis", "--output", str(tmp_path / "ssl4mis.json")]) == 0
    out = json.loads((tmp_path / "ssl4mis.json").read_text())
    assert out["protocol"] == "ssl4mis" and out["ssl4mis_patch_size"] == [32, 32]  # the recipe's image_size
    assert 0.0 <= out["mean_dice"] <= 1.0 and out["empty_cases"]["rule"] == "ssl4mis"
    assert out["num_cases"] == json.loads((ref / "metrics.json").read_text())["num_cases"]


def test_unexpected_errors_keep_their_traceback(image_folder, monkeypatch, tmp_path):
    import label_efficient.runner as runner

    def bug(*a, **k):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(runner, "run_recipe", bug)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(image_folder)))
    with pytest.raises(ZeroDivisionError):
        main(["run", str(recipe), "--out", str(tmp_path / "o")])


def test_every_user_error_is_one_family():
    from label_efficient.data.readers import CorruptFileError
    from label_efficient.lightning import CheckpointMismatchError
    from label_efficient.registry import UnknownNameError
    from label_efficient.strategies.base import NonFiniteLossError

    for cls in (RecipeError, DataError, CorruptFileError, CheckpointError, CheckpointMismatchError, OutputError,
                UnknownNameError, NonFiniteLossError):
        assert issubclass(cls, UserError), cls
