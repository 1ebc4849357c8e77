"""End-to-end runs on a tiny synthetic folder: outputs, multi-stage, resume, NaN, mismatched checkpoints, CLI."""
import json

import numpy as np
import pytest
import torch

from label_efficient.cli import main
from label_efficient.data import DataError
from label_efficient.lightning import CheckpointMismatchError, NonFiniteLossError
from label_efficient.recipe import parse_recipe
from label_efficient.runner import load_bundle, run_recipe
from label_efficient.strategies import Supervised

from conftest import tiny_recipe, tiny_recipe_3d, write_nifti_folder


def test_run_writes_outputs(image_folder, tmp_path):
    out = tmp_path / "run"
    m = run_recipe(parse_recipe(tiny_recipe(image_folder)), out)
    for f in ("metrics.json", "model.pt", "recipe.resolved.yaml", "learning_curve.png",
              "stage0_supervised/last.ckpt", "stage0_supervised/best.ckpt", "stage0_supervised/metrics.csv"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved)[0] == "mean_dice" and 0 <= saved["mean_dice"] <= 1
    assert set(saved["cases"]) == {"case13", "case14", "case15"}
    assert set(saved["cases"]["case13"]["dice"]) == {"class1", "class2"}
    assert len(list((out / "overlays").glob("*.png"))) == 1
    assert m["stages"][0]["best_score"] is not None
    with pytest.raises(FileExistsError, match="--resume"):
        run_recipe(parse_recipe(tiny_recipe(image_folder)), out)


def test_last_checkpoint_holds_the_final_step_when_steps_is_not_a_multiple_of_val_every(image_folder, tmp_path):
    out = tmp_path / "run"
    run_recipe(parse_recipe(tiny_recipe(image_folder, steps=5, val_every=3)), out)
    assert torch.load(out / "stage0_supervised" / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.parametrize("strategy", ["supervised", "mean_teacher", "dsaif"])
def test_3d_run_end_to_end(tmp_path, strategy):
    """NIfTI in, random 3D patches, a 3D strategy (DSAIF: Max/Min-tree views of whole volumes, quarter turns in
    the square plane), sliding-window validation and test, per-volume metrics out."""
    root = write_nifti_folder(tmp_path / "vols")
    out = tmp_path / "run"
    m = run_recipe(parse_recipe(tiny_recipe_3d(root, strategy=strategy, steps=4, val_every=2)), out)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["cases"]) == {"v08", "v09"} and set(saved["cases"]["v08"]["dice"]) == {"class1"}
    assert 0 <= saved["mean_dice"] <= 1 and m["stages"][0]["best_score"] is not None
    assert load_bundle(out / "model.pt")[0](torch.rand(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_multi_stage_passes_weights(image_folder, tmp_path):
    raw = tiny_recipe(image_folder)
    raw["stages"].append({**raw["stages"][0], "strategy": "mean_teacher", "steps": 3, "init": "previous_last"})
    out = tmp_path / "run"
    run_recipe(parse_recipe(raw), out)
    first = torch.load(out / "stage0_supervised/last.ckpt", weights_only=True)["state_dict"]
    second = torch.load(out / "stage1_mean_teacher/last.ckpt", weights_only=True)["state_dict"]
    # the teacher of stage 2 starts from stage 1's weights and only moves by EMA: it stays close to them
    key = "strategy.model.head.weight"
    t = second["strategy.teacher.head.weight"]
    assert (t - first[key]).abs().max() < (second[key] - first[key]).abs().max() + 1e-6
    assert json.loads((out / "metrics.json").read_text())["stages"][1]["strategy"] == "mean_teacher"


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("val_split", ["val", None], ids=["with_val", "without_val"])
def test_resume_gives_same_metrics(image_folder, tmp_path, monkeypatch, val_split):
    raw = tiny_recipe(image_folder, steps=9, val_every=3)
    raw["data"]["val_split"] = val_split
    full = run_recipe(parse_recipe(raw), tmp_path / "full")
    real = Supervised.training_step

    def crash_at_7(self, batch, step):
        if step == 7:
            raise Boom("simulated crash")
        return real(self, batch, step)

    monkeypatch.setattr(Supervised, "training_step", crash_at_7)
    with pytest.raises(Boom):
        run_recipe(parse_recipe(raw), tmp_path / "cut")
    assert (tmp_path / "cut/stage0_supervised/last.ckpt").is_file()
    assert not (tmp_path / "cut/metrics.json").exists()
    before = torch.load(tmp_path / "cut/stage0_supervised/last.ckpt", weights_only=True)["label_efficient_train_seconds"]
    monkeypatch.setattr(Supervised, "training_step", real)
    resumed = run_recipe(parse_recipe(raw), tmp_path / "cut", resume=True)
    assert resumed["train_seconds"] > before > 0  # the interrupted run's training time is counted
    for run in ("full", "cut"):  # last.ckpt is the final step even when the best val score came earlier
        assert torch.load(tmp_path / run / "stage0_supervised/last.ckpt", weights_only=True)["global_step"] == 9
    assert resumed["mean_dice"] == pytest.approx(full["mean_dice"], abs=1e-6)
    logs = {run: (tmp_path / run / "stage0_supervised/metrics.csv").read_text().splitlines() for run in ("full", "cut")}
    assert len(logs["cut"]) == len(logs["full"]) > 9  # the learning curve before the crash is kept, nothing twice
    assert logs["cut"][0] == logs["full"][0]
    a = torch.load(tmp_path / "full/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut/model.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_nan_loss_stops_and_keeps_last_good(image_folder, tmp_path, monkeypatch):
    real = Supervised.training_step

    def nan_at_4(self, batch, step):
        out = real(self, batch, step)
        return out._replace(loss=out.loss * float("nan")) if step == 4 else out

    monkeypatch.setattr(Supervised, "training_step", nan_at_4)
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        run_recipe(parse_recipe(tiny_recipe(image_folder)), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run/stage0_supervised/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_checkpoint_from_another_backbone(image_folder, tmp_path):
    run_recipe(parse_recipe(tiny_recipe(image_folder)), tmp_path / "a")
    raw = tiny_recipe(image_folder, init=str(tmp_path / "a/model.pt"))
    raw["backbone"] = {"name": "attention_unet", "kwargs": {"channels": [8, 16, 32]}}
    with pytest.raises(CheckpointMismatchError, match="backbone='unet'"):
        run_recipe(parse_recipe(raw), tmp_path / "b")


def test_semi_supervised_needs_unlabelled_pool(image_folder, tmp_path):
    from label_efficient.data import DataError

    raw = tiny_recipe(image_folder, strategy="mean_teacher")
    raw["data"]["budget"] = {"all": True}
    with pytest.raises(DataError, match="leaves no unlabelled case"):
        run_recipe(parse_recipe(raw), tmp_path / "run")


def test_cli_run_predict_evaluate_list(image_folder, tmp_path, capsys):
    import yaml
    from PIL import Image

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(image_folder)))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--set", "stages.0.steps=3"]) == 0
    model, blob = load_bundle(tmp_path / "out/model.pt")
    assert blob["meta"]["num_classes"] == 3
    assert main(["predict", "--model", str(tmp_path / "out/model.pt"), "--input", str(image_folder / "images"),
                 "--output", str(tmp_path / "pred")]) == 0
    pred = np.asarray(Image.open(tmp_path / "pred/case00.png"))
    assert pred.shape == (32, 32) and set(np.unique(pred)) <= {0, 1, 2}
    assert main(["evaluate", str(recipe), "--model", str(tmp_path / "out/model.pt"),
                 "--output", str(tmp_path / "ev.json")]) == 0
    assert "mean_dice" in json.loads((tmp_path / "ev.json").read_text())
    assert main(["evaluate", str(recipe), "--model", str(tmp_path / "out/stage0_supervised/best.ckpt"),
                 "--output", str(tmp_path / "ev_ckpt.json")]) == 0  # a stage checkpoint scores as its model.pt
    assert json.loads((tmp_path / "ev_ckpt.json").read_text())["mean_dice"] == pytest.approx(
        json.loads((tmp_path / "ev.json").read_text())["mean_dice"], abs=1e-6)
    capsys.readouterr()
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "mean_teacher" in listing and "swin_unetr" in listing
    assert main(["run", str(recipe), "--set", "stages.0.stpes=3"]) == 2
    assert "Did you mean 'steps'" in capsys.readouterr().err


def test_a_strategy_assuming_unit_intensities_refuses_a_zscored_dataset(tmp_path):
    root = write_nifti_folder(tmp_path / "data")  # nifti_folder volumes are z-scored
    raw = tiny_recipe_3d(root, strategy="cuts", steps=2)
    raw["data"]["budget"] = {"all": True}
    with pytest.raises(DataError, match="strategy 'cuts' assumes 'unit' image intensities, but dataset .* 'zscore'"):
        run_recipe(parse_recipe(raw), tmp_path / "run")
