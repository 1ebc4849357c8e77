"""Volume geometry (issue 29): grid agreement, orientation + spacing invariance, the way back to the file's grid,
foreground-centred crops, normalisation, the disk cache, and bad input — on tiny synthetic NIfTI volumes."""
from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import torch

from label_efficient.data import CaseStore, CorruptFileError, DataError, StepBatches, Stream, build_dataset, eval_volumes
from label_efficient.data.geometry import Grid, check_patch_coverage, foreground_locations, normalize
from label_efficient.data.transforms import Augment3D

nib = pytest.importorskip("nibabel")

FOV = 40.0  # mm per axis of every synthetic grid


def grid_affine(shape, spacing, flips=(1, 1, 1), perm=(0, 1, 2)):
    """Affine of a grid covering [0, FOV]³ mm (voxel centres inside), array axis i along world axis perm[i],
    flipped (LPS-like) where flips[i] = -1."""
    a = np.zeros((4, 4))
    a[3, 3] = 1
    for i, (w, s, f) in enumerate(zip(perm, spacing, flips)):
        a[w, i] = f * s
        a[w, 3] = s / 2 if f > 0 else FOV - s / 2
    return a


def world(shape, affine):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


def phantom(shape, affine):
    """Smooth image (two Gaussian blobs, off-centre so a mirror shows) and a ball label, sampled at the grid's
    voxel centres in world coordinates."""
    p = world(shape, affine)
    d1 = np.linalg.norm(p - [14, 18, 22], axis=-1)
    d2 = np.linalg.norm(p - [28, 24, 14], axis=-1)
    image = 100 + 200 * np.exp(-d1**2 / (2 * 7**2)) + 120 * np.exp(-d2**2 / (2 * 5**2))
    return image.astype(np.float32), (d1 < 8).astype(np.uint8)


def save(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def folder(root, volumes: dict):
    """A nifti_folder dataset of ``{stem: (image, label, affine)}`` (label None: no label file)."""
    for stem, (img, lab, aff) in volumes.items():
        save(root / "imagesTr" / f"{stem}.nii.gz", img, aff)
        if lab is not None:
            save(root / "labelsTr" / f"{stem}.nii.gz", lab, aff)
    return build_dataset("nifti_folder", root, num_classes=2)


ORIG = ((40, 40, 20), (1.0, 1.0, 2.0), (1, 1, 1), (0, 1, 2))
#: LPS (x and y flipped), axes permuted (array axis 0 is world z), other voxel sizes: same field of view
COPY = ((32, 20, 50), (1.25, 2.0, 0.8), (1, -1, -1), (2, 0, 1))


def pair(tmp_path):
    vols = {}
    for stem, (shape, sp, fl, pm) in (("orig", ORIG), ("copy", COPY)):
        aff = grid_affine(shape, sp, fl, pm)
        img, lab = phantom(shape, aff)
        vols[stem] = (img, lab, aff)
    return folder(tmp_path, vols), vols


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# --- geometry invariance ---------------------------------------------------------------------------------------------

def test_flipped_permuted_resampled_copy_preprocesses_to_the_same_array(tmp_path):
    spec, _ = pair(tmp_path)
    store = CaseStore(spec, spacing=[2.0, 2.0, 2.0], orientation="RAS")
    a, b = (store.get(c, True) for c in spec.cases)  # sorted: copy, orig
    assert a.image.shape == b.image.shape == (1, 20, 20, 20)
    np.testing.assert_allclose(a.grid.affine, b.grid.affine, atol=1e-4)  # the same world grid
    assert a.spacing == pytest.approx((2, 2, 2)) and b.native_spacing == pytest.approx((1, 1, 2))
    # the same image within interpolation error (z-scored: unit variance), and no mirror: a flipped copy differs a lot
    assert np.abs(a.image - b.image).max() < 0.15
    assert np.abs(a.image - b.image[:, ::-1]).max() > 1.0
    # labels land on the same anatomy
    assert dice(a.label > 0, b.label > 0) > 0.9
    ca, cb = (np.argwhere(x.label > 0).mean(0) for x in (a, b))
    assert np.abs(ca - cb).max() < 0.5
    # and the ball is where it is in world coordinates (centre 14, 18, 22 mm)
    centre = b.grid.affine[:3, :3] @ cb + b.grid.affine[:3, 3]
    np.testing.assert_allclose(centre, [14, 18, 22], atol=1.0)


def test_grid_round_trip_to_the_file_grid(tmp_path):
    spec, vols = pair(tmp_path)
    copy = next(c for c in spec.cases if c.id == "copy")
    exact = CaseStore(spec, orientation="RAS").get(copy, True)  # reorientation only: exact, both ways
    assert exact.image.shape == (1, 20, 50, 32) and not exact.grid.identity  # R, A, S = array axes 1, 2, 0
    np.testing.assert_array_equal(exact.to_native(exact.label), vols["copy"][1])
    resampled = CaseStore(spec, spacing=[2.0, 2.0, 2.0], orientation="RAS").get(copy, True)
    back = resampled.to_native(resampled.label)
    assert back.shape == vols["copy"][1].shape and dice(back > 0, vols["copy"][1] > 0) > 0.9
    logits = torch.from_numpy(np.stack([1 - resampled.label, resampled.label]).astype(np.float32))
    back = resampled.to_native(logits)
    assert back.shape == (32, 20, 50) and dice(back > 0, vols["copy"][1] > 0) > 0.9
    # the label for evaluation stays on the file's grid, with its spacing and the way back
    vol = eval_volumes(CaseStore(spec, spacing=[2.0, 2.0, 2.0], orientation="RAS"), [copy])[0]
    assert vol.label.shape == (32, 20, 50) and vol.spacing == pytest.approx((1.25, 2.0, 0.8))
    assert vol.to_native is not None and vol.to_native(logits).shape == vol.label.shape


def test_defaults_keep_each_volume_grid(tmp_path):
    spec, vols = pair(tmp_path)
    copy = next(c for c in spec.cases if c.id == "copy")
    item = CaseStore(spec).get(copy, True)  # no orientation, no spacing: the file's array
    img = vols["copy"][0]
    np.testing.assert_array_equal(item.image[0], ((img - img.mean()) / img.std()).astype(np.float32))
    assert item.grid.identity and item.to_native(item.label) is not None
    vol = eval_volumes(CaseStore(spec), [copy])[0]
    assert vol.to_native is None and vol.spacing == pytest.approx((1.25, 2.0, 0.8))
    # an image already in RAS is untouched by orientation="RAS", bit for bit
    orig = next(c for c in spec.cases if c.id == "orig")
    a, b = CaseStore(spec).get(orig, True), CaseStore(spec, orientation="RAS").get(orig, True)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and b.grid.identity


def test_grid_plan_affine_maps_voxels_to_the_same_world_points():
    aff = grid_affine(*COPY[:1], *COPY[1:])
    g = Grid.plan(COPY[0], aff, "RAS", [2.0, 2.0, 2.0])
    p = world(g.shape, g.affine)
    assert g.shape == (20, 20, 20)
    np.testing.assert_allclose(p[0, 0, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(p[-1, -1, -1], [39, 39, 39], atol=1e-6)
    with pytest.raises(DataError, match="orientation 'RAR'"):
        CaseStore(build_dataset_stub(), orientation="RAR")


def build_dataset_stub():
    from label_efficient.data.datasets import DatasetSpec

    return DatasetSpec("stub", 3, 1, 2, ["bg", "fg"], [], format="nifti", intensity="zscore")


# --- prediction back on the file's grid ------------------------------------------------------------------------------

class Threshold(torch.nn.Module):
    """A 'network' that segments bright voxels: logits (−x, x); equivariant to any geometry."""

    def forward(self, x):
        return torch.cat([-x, x], 1)


def test_prediction_of_a_flipped_resampled_copy_is_written_on_its_own_grid_aligned_in_world(tmp_path):
    from label_efficient.predict import predict_nifti

    spec, vols = pair(tmp_path)
    data = {"patch_size": [16, 16, 16], "intensity": "zscore", "orientation": "RAS", "spacing": [2.0, 2.0, 2.0]}
    path = {c.id: c.image for c in spec.cases}
    pred = {k: predict_nifti(Threshold(), path[k], data) for k in ("orig", "copy")}
    assert pred["orig"].shape == (40, 40, 20) and pred["copy"].shape == (32, 20, 50)
    assert pred["orig"].sum() > 100
    # the copy's mask looked up at the original's voxel centres (world → copy voxel, nearest) = the original's mask
    aff = vols["copy"][2]
    ijk = np.rint((world((40, 40, 20), vols["orig"][2]).reshape(-1, 3) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T)
    ijk = np.clip(ijk.astype(int), 0, np.array(pred["copy"].shape) - 1)
    looked = pred["copy"][tuple(ijk.T)].reshape(40, 40, 20)
    assert dice(looked > 0, pred["orig"] > 0) > 0.9
    # without the geometry keys (an older bundle) the copy is predicted on its own array, as before
    old = predict_nifti(Threshold(), path["copy"], {"patch_size": [16, 16, 16], "intensity": "zscore"})
    x = vols["copy"][0]
    np.testing.assert_array_equal(old, (((x - x.mean()) / x.std()) > 0).astype(np.int64))


# --- foreground-centred crops ----------------------------------------------------------------------------------------

def test_foreground_ratio_centres_crops_on_the_label_and_is_seeded():
    rng = np.random.default_rng(0)
    label = np.zeros((40, 40, 30), np.int64)
    label[33:36, 2:5, 25:28] = 1
    label[5, 30, 3] = 2
    image = rng.random((1, 40, 40, 30)).astype(np.float32)
    uniform, fg, third = Augment3D((12, 12, 12)), Augment3D((12, 12, 12), foreground_ratio=1.0), \
        Augment3D((12, 12, 12), foreground_ratio=1 / 3)
    hits = [uniform(image, label, s)[1].any() for s in range(30)]
    assert sum(hits) < 15
    out = [fg(image, label, s)[1] for s in range(30)]
    assert all(o.any() for o in out) and any((o == 2).any() for o in out)  # each class present is drawn
    a, b = third(image, label, 7), third(image, label, 7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # precomputed locations give the same crops as the label's own voxels when they list all of them
    locs = foreground_locations(label)
    for s in range(5):
        assert np.array_equal(fg(image, label, s, foreground=locs)[1], fg(image, label, s)[1])
    # ratio 0 is the uniform crop it always was (MONAI's own random stream untouched)
    for s in range(5):
        assert np.array_equal(Augment3D((12, 12, 12), foreground_ratio=0.0)(image, label, s)[0], uniform(image, label, s)[0])


def test_step_batches_pass_foreground_ratio(tmp_path):
    rng = np.random.default_rng(1)
    vols = {}
    for i in range(3):
        lab = np.zeros((40, 40, 24), np.uint8)
        lab[30:33, 30:33, 18:21] = 1
        vols[f"v{i}"] = ((rng.random((40, 40, 24)) + lab).astype(np.float32), lab, np.eye(4))
    spec = folder(tmp_path, vols)
    mk = lambda r: StepBatches(CaseStore(spec), {"labeled": Stream(spec.cases, 3, True)}, 4, seed=3,
                               patch_size=[12, 12, 12], foreground_ratio=r)
    fg, none = mk(1.0), mk(0.0)
    assert all(fg[(0, k)]["labeled"]["label"].flatten(1).any(1).all() for k in range(4))
    assert sum(int(none[(0, k)]["labeled"]["label"].flatten(1).any(1).sum()) for k in range(4)) < 8
    again = mk(1.0)
    assert torch.equal(fg[(0, 2)]["labeled"]["image"], again[(0, 2)]["labeled"]["image"])


# --- normalisation ---------------------------------------------------------------------------------------------------

def test_normalisation_schemes(tmp_path):
    x = np.zeros((1, 10, 10, 10), np.float32)
    x[0, 2:8, 2:8, 2:8] = np.random.default_rng(0).normal(50, 5, (6, 6, 6))
    z = normalize(x, "zscore_foreground")
    fgv = z[x != 0]
    assert abs(fgv.mean()) < 1e-5 and abs(fgv.std() - 1) < 1e-4 and (z[x == 0] == 0).all()
    ct = normalize(x, "ct", {"mean": 50.0, "std": 5.0, "p00_5": 40.0, "p99_5": 60.0})
    assert ct.min() == pytest.approx(-2.0) and ct.max() <= 2.0 + 1e-6
    with pytest.raises(DataError, match="ct needs"):
        normalize(x, "ct")
    # the store computes ct statistics once, from the cases it is given (the training labelled ones)
    vols = {}
    for i in range(3):
        img = np.full((12, 12, 8), -1000.0, np.float32)
        lab = np.zeros((12, 12, 8), np.uint8)
        lab[3:9, 3:9, 2:6] = 1
        img[lab > 0] = 40 + 10 * i
        vols[f"v{i}"] = (img, lab, np.eye(4))
    spec = folder(tmp_path / "ct", vols)
    store = CaseStore(spec, normalize="ct")
    with pytest.raises(DataError, match="fit_normalization"):
        store.get(spec.cases[0], True)
    stats = store.fit_normalization(spec.cases[:2])
    assert stats["mean"] == pytest.approx(45) and stats["std"] == pytest.approx(5)
    item = store.get(spec.cases[2], False)  # air clipped to the foreground's 0.5 percentile
    assert item.image.min() == pytest.approx((40 - 45) / 5) and item.image.max() == pytest.approx((50 - 45) / 5)


# --- disk cache -----------------------------------------------------------------------------------------------------

def test_disk_cache_matches_memory_is_memory_mapped_and_rebuilt_on_change(tmp_path):
    spec, _ = pair(tmp_path / "d")
    kw = dict(spacing=[2.0, 2.0, 2.0], orientation="RAS")
    mem = CaseStore(spec, **kw)
    disk = CaseStore(spec, cache_dir=tmp_path / "cache", **kw)
    for c in spec.cases:
        a, b = mem.get(c, True), disk.get(c, True)
        assert isinstance(b.image, np.memmap) and isinstance(b.label, np.memmap)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert np.array_equal(a.original_label, b.original_label) and np.array_equal(a.foreground, b.foreground)
        np.testing.assert_array_equal(a.grid.affine, b.grid.affine)
        assert np.array_equal(a.to_native(a.label), b.to_native(b.label))
    entries = lambda: sorted(p.parent.name for p in (tmp_path / "cache").rglob("meta.json"))
    first = entries()
    assert len(first) == 4 and not list((tmp_path / "cache").rglob("*.tmp"))  # image + label entry per case
    # a second store reuses the entries (no new ones), and pickles as paths (data-loader workers reopen the maps)
    again = CaseStore(spec, cache_dir=tmp_path / "cache", **kw).get(spec.cases[0], True)
    assert entries() == first
    blob = pickle.dumps(again)
    assert len(blob) < 20_000 and np.array_equal(pickle.loads(blob).image, again.image)
    # another setting, or a touched file: new entries
    CaseStore(spec, cache_dir=tmp_path / "cache", spacing=[4.0, 4.0, 4.0], orientation="RAS").get(spec.cases[0], True)
    assert len(entries()) == 6
    st = os.stat(spec.cases[0].image)
    os.utime(spec.cases[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    CaseStore(spec, cache_dir=tmp_path / "cache", **kw).get(spec.cases[0], False)
    assert len(entries()) == 7


# --- bad input --------------------------------------------------------------------------------------------------------

def test_label_on_another_grid_names_both_files_and_affines(tmp_path):
    img, lab = phantom((20, 20, 10), np.diag([2.0, 2.0, 4.0, 1.0]))
    ipath = save(tmp_path / "imagesTr" / "a.nii.gz", img, np.diag([2.0, 2.0, 4.0, 1.0]))
    flipped = np.diag([-2.0, 2.0, 4.0, 1.0])
    flipped[0, 3] = 38.0
    lpath = save(tmp_path / "labelsTr" / "a.nii.gz", lab, flipped)
    spec = build_dataset("nifti_folder", tmp_path, num_classes=2)
    with pytest.raises(DataError) as e:
        CaseStore(spec).get(spec.cases[0], True)
    msg = str(e.value)
    assert str(ipath) in msg and str(lpath) in msg and "\n" not in msg
    assert "[[2, 0, 0, 0]" in msg and "[[-2, 0, 0, 38]" in msg and "resample the label" in msg
    # within tolerance (float32 header rounding) it is accepted
    near = np.diag([2.0, 2.0, 4.0, 1.0])
    near[0, 3] = 2e-4
    save(lpath, lab, near)
    assert CaseStore(spec).get(spec.cases[0], True).label.sum() == lab.sum()


def test_4d_and_nan_volumes_are_refused_by_name(tmp_path):
    save(tmp_path / "imagesTr" / "four.nii.gz", np.zeros((6, 6, 6, 2), np.float32), np.eye(4))
    nan = np.ones((6, 6, 6), np.float32)
    nan[1, 2, 3] = np.nan
    save(tmp_path / "imagesTr" / "nan.nii.gz", nan, np.eye(4))
    spec = build_dataset("nifti_folder", tmp_path, num_classes=2)
    four, nanc = sorted(spec.cases, key=lambda c: c.id)
    with pytest.raises(DataError, match=r"four.nii.gz has shape \(6, 6, 6, 2\): one 3D volume"):
        CaseStore(spec).get(four, False)
    with pytest.raises(CorruptFileError, match=r"nan.nii.gz holds 1 NaN"):
        CaseStore(spec, spacing=[1.0, 1.0, 1.0]).get(nanc, False)


def test_volume_smaller_than_the_patch_is_padded_and_logged_once(tmp_path, caplog):
    rng = np.random.default_rng(0)
    vols = {f"v{i}": (rng.random((10, 9, 6)).astype(np.float32), (rng.random((10, 9, 6)) > .8).astype(np.uint8),
                      np.eye(4)) for i in range(3)}
    spec = folder(tmp_path, vols)
    with caplog.at_level(logging.WARNING, logger="label_efficient.data.geometry"):
        sb = StepBatches(CaseStore(spec), {"labeled": Stream(spec.cases, 2, True)}, 2, patch_size=[16, 16, 16])
        b = sb[(0, 0)]["labeled"]
        sb[(0, 1)]
    assert b["image"].shape == (2, 1, 16, 16, 16)
    msgs = [r.getMessage() for r in caplog.records if "smaller than the patch" in r.getMessage()]
    assert len(msgs) == 1 and "3 volume(s)" in msgs[0] and "[10, 9, 6]" in msgs[0]


def test_anisotropy_the_patch_cannot_cover_warns_with_the_numbers(tmp_path, caplog):
    # 0.8 × 0.8 × 5 mm slices resampled to 1 mm along z: a 35 mm structure is 35 voxels along z, the patch 32
    shape, aff = (50, 50, 10), np.diag([0.8, 0.8, 5.0, 1.0])
    p = world(shape, aff)
    lab = ((np.abs(p[..., 0] - 20) < 6) & (np.abs(p[..., 1] - 20) < 6) & (np.abs(p[..., 2] - 25) < 17.5)).astype(np.uint8)
    img = (100 + 50 * lab).astype(np.float32)
    spec = folder(tmp_path, {"a": (img, lab, aff)})
    with caplog.at_level(logging.WARNING, logger="label_efficient.data.geometry"):
        StepBatches(CaseStore(spec, spacing=[0.8, 0.8, 1.0]), {"labeled": Stream(spec.cases, 1, True)}, 1,
                    patch_size=[32, 32, 32])
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot cover the structure along axis 2" in msg and "spans 35 voxels (35.0 mm at 1.00 mm" in msg
    assert "the patch is 32" in msg and "native spacing [0.8, 0.8, 5.0] mm (anisotropy 6.2)" in msg
    assert "axis 0" not in msg and "axis 1" not in msg
    # the unit itself: a structure within the patch gives no warning
    assert check_patch_coverage([("x", (40, 40, 40), (1.0, 1.0, 1.0), (10, 10, 10))], (32, 32, 32)) == []


def test_data_loader_workers_read_the_disk_cache(tmp_path):
    from label_efficient.data import train_loader

    rng = np.random.default_rng(2)
    vols = {f"v{i}": (rng.random((20, 20, 12)).astype(np.float32), (rng.random((20, 20, 12)) > .7).astype(np.uint8),
                      np.eye(4)) for i in range(3)}
    spec = folder(tmp_path / "d", vols)
    mk = lambda cache: StepBatches(CaseStore(spec, cache_dir=cache), {"labeled": Stream(spec.cases, 2, True)}, 3,
                                   seed=1, patch_size=[8, 8, 8], foreground_ratio=0.5)
    ref = [mk(None)[(0, k)] for k in range(3)]
    got = list(train_loader(mk(tmp_path / "cache"), num_workers=2))
    for a, b in zip(ref, got):
        assert torch.equal(a["labeled"]["image"], b["labeled"]["image"])
        assert torch.equal(a["labeled"]["label"], b["labeled"]["label"])
