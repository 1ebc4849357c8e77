import numpy as np
import pytest
import torch
from PIL import Image

from label_efficient.data import (CaseStore, CorruptFileError, DataError, LabelBudget, StepBatches, Stream,
                                  build_dataset, eval_volumes, split_labeled)

from conftest import requires_shared


def _spec(folder, **kw):
    return build_dataset("image_folder", folder, num_classes=3, split_csv="split.csv", **kw)


def test_budget_count_is_by_group_and_deterministic(image_folder):
    train = _spec(image_folder).select("train")
    a, rest = split_labeled(train, LabelBudget(count=3, seed=1))
    b, _ = split_labeled(train, LabelBudget(count=3, seed=1))
    c, _ = split_labeled(train, LabelBudget(count=3, seed=2))
    assert [x.id for x in a] == [x.id for x in b]
    assert len(a) == 3 and len(rest) == len(train) - 3
    assert {x.id for x in a} != {x.id for x in c} or len(train) == 3
    assert not {x.id for x in a} & {x.id for x in rest}


def test_budget_fraction_and_ids(image_folder):
    train = _spec(image_folder).select("train")
    lab, _ = split_labeled(train, LabelBudget(fraction=0.5))
    assert len(lab) == 5
    lab, _ = split_labeled(train, LabelBudget(ids=["case01", "case02"]))
    assert sorted(c.id for c in lab) == ["case01", "case02"]


@pytest.mark.parametrize("kw,msg", [({"count": 0}, "≥ 1"), ({"fraction": 0.0}, "fraction"), ({}, "exactly one"),
                                    ({"count": 2, "flag": "x"}, "exactly one")])
def test_budget_invalid(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LabelBudget(**kw)


def test_budget_larger_than_pool_and_unknown_ids(image_folder):
    train = _spec(image_folder).select("train")
    with pytest.raises(DataError, match="exceeds the 10 train groups"):
        split_labeled(train, LabelBudget(count=11))
    with pytest.raises(DataError, match="Did you mean 'case01'"):
        split_labeled(train, LabelBudget(ids=["case1"]))
    with pytest.raises(DataError, match="empty"):
        split_labeled([], LabelBudget(all=True))


@requires_shared("acdc")
def test_acdc_flags_select_patients():
    spec = build_dataset("acdc")
    train = spec.select("train")
    lab3, pool = split_labeled(train, LabelBudget(flag="labeled_3"))
    assert len(lab3) == 68 and {c.group for c in lab3} == {"patient038", "patient050", "patient099"}
    assert len(pool) == 1312 - 68
    lab7, _ = split_labeled(train, LabelBudget(flag="labeled_7"))
    assert len(lab7) == 136 and len({c.group for c in lab7}) == 7
    with pytest.raises(DataError, match="Did you mean 'labeled_3'"):
        split_labeled(train, LabelBudget(flag="labelled_3"))
    lab, _ = split_labeled(train, LabelBudget(count=5))
    assert len({c.group for c in lab}) == 5  # whole patients, never single slices


@requires_shared("polyp_kvasir_cvc")
def test_polyp_domains():
    spec = build_dataset("polyp_kvasir_cvc")
    assert len(spec.select("train", "kvasir")) == 700 and len(spec.select("test", "cvc_clinicdb")) == 118
    with pytest.raises(DataError, match="domains"):
        spec.select("train", "cvc")


def test_unlabelled_masks_never_read(image_folder, forbid_mask_reads):
    spec = _spec(image_folder)
    lab, unl = split_labeled(spec.select("train"), LabelBudget(count=2))
    forbid_mask_reads(c.mask for c in unl)
    store = CaseStore(spec, (32, 32))
    sb = StepBatches(store, {"labeled": Stream(lab, 2, True), "unlabeled": Stream(unl, 4, False)}, 5)
    for i in range(5):
        b = sb[(0, i)]
        assert set(b["unlabeled"]) == {"image"} and set(b["labeled"]) == {"image", "label"}


def test_step_batches_deterministic_and_shaped(image_folder):
    spec = _spec(image_folder)
    lab, unl = split_labeled(spec.select("train"), LabelBudget(count=2))
    mk = lambda: StepBatches(CaseStore(spec, (32, 32)), {"labeled": Stream(lab, 3, True)}, 4, seed=5)
    a, b = mk()[(2, 1)], mk()[(2, 1)]
    assert torch.equal(a["labeled"]["image"], b["labeled"]["image"])
    assert a["labeled"]["image"].shape == (3, 1, 32, 32) and a["labeled"]["label"].dtype == torch.int64
    assert not torch.equal(mk()[(2, 2)]["labeled"]["image"], a["labeled"]["image"])
    assert set(a["labeled"]["label"].unique().tolist()) <= {0, 1, 2}


def test_empty_stream_is_an_error():
    with pytest.raises(DataError, match="empty unlabelled stream"):
        Stream([], 2, False)


def test_shape_mismatch_and_bad_label(image_folder):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(image_folder / "masks" / "case00.png")
    spec = _spec(image_folder)
    case = next(c for c in spec.cases if c.id == "case00")
    with pytest.raises(DataError, match=r"image shape \(1, 32, 32\) does not match mask shape \(20, 20\)"):
        CaseStore(spec, (32, 32)).get(case, True)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(image_folder / "masks" / "case00.png")
    with pytest.raises(DataError, match=r"label value\(s\) \[7\] outside the declared classes 0..2"):
        CaseStore(spec, (32, 32)).get(case, True)


def test_image_without_mask(image_folder):
    (image_folder / "masks" / "case03.png").unlink()
    with pytest.raises(DataError, match="have no mask.*case03"):
        _spec(image_folder)
    spec = _spec(image_folder, allow_missing_masks=True)
    assert next(c for c in spec.cases if c.id == "case03").mask is None


def test_corrupt_file_error_or_skip(image_folder):
    (image_folder / "images" / "case05.png").write_bytes(b"not a png")
    spec = _spec(image_folder)
    with pytest.raises(CorruptFileError, match="case05.png"):
        CaseStore(spec, (32, 32)).load(spec.select("train"), True)
    store = CaseStore(spec, (32, 32), on_corrupt="skip")
    ok = store.load(spec.select("train"), True)
    assert len(ok) == 9 and store.skipped == ["case05"]


def test_missing_root():
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("acdc", "/nonexistent/acdc")


def test_2d_needs_image_size(image_folder):
    with pytest.raises(DataError, match="image_size"):
        CaseStore(_spec(image_folder))


def test_eval_volumes_keep_original_size(image_folder):
    spec = _spec(image_folder)
    vols = eval_volumes(CaseStore(spec, (16, 16)), spec.select("test"))
    assert len(vols) == 3
    assert vols[0].image.shape == (1, 1, 16, 16) and vols[0].label.shape == (1, 32, 32)


def test_nifti_and_3d_crop_pads_small_volume(tmp_path):
    import nibabel as nib

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.random((20, 18, 10)).astype(np.float32)
        lab = (img > 0.7).astype(np.uint8)
        nib.save(nib.Nifti1Image(img, np.eye(4)), tmp_path / "imagesTr" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "labelsTr" / f"v{i}.nii.gz")
    spec = build_dataset("nifti_folder", tmp_path, num_classes=2)
    sb = StepBatches(CaseStore(spec), {"labeled": Stream(spec.cases, 2, True)}, 2, patch_size=[16, 16, 16])
    b = sb[(0, 0)]["labeled"]
    assert b["image"].shape == (2, 1, 16, 16, 16) and b["label"].shape == (2, 16, 16, 16)
    vols = eval_volumes(CaseStore(spec), spec.cases)
    assert vols[0].image.shape == (1, 1, 20, 18, 10)


def test_h5_reader(tmp_path):
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["image"] = np.random.rand(8, 8, 4).astype(np.float32)
        f["label"] = np.ones((8, 8, 4), np.uint8)
    spec = build_dataset("h5_files", tmp_path, num_classes=2)
    item = CaseStore(spec).get(spec.cases[0], True)
    assert item.image.shape == (1, 8, 8, 4) and item.label.sum() == 8 * 8 * 4
    (tmp_path / "b.h5").write_bytes(b"junk")
    with pytest.raises(CorruptFileError, match="b.h5"):
        CaseStore(build_dataset("h5_files", tmp_path, num_classes=2)).load(
            build_dataset("h5_files", tmp_path, num_classes=2).cases, True)
