"""Dataset precompute of distance maps (`segloss distmap`) and the patch crop."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from segloss_core.cli import main
from segloss_core.datasets.distmap import (
    LabelFileError,
    distance_map_path,
    find_label_files,
    load_distance_map,
    precompute_distance_maps,
    random_patch,
    read_label_volume,
)
from segloss_core.distance_maps import signed_distance_map


def _labels(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int = 3) -> np.ndarray:
    """A label volume with a few boxes, each class present."""
    labels = np.zeros(shape, dtype=np.uint8)
    for c in range(1, num_classes):
        corner = [int(rng.integers(0, max(1, n - 3))) for n in shape]
        labels[tuple(slice(s, s + 3) for s in corner)] = c
    return labels


def _reference(labels: np.ndarray, num_classes: int, spacing=None, **kwargs) -> np.ndarray:
    return signed_distance_map(labels[None].astype(np.int64), num_classes, spacing, **kwargs)[0]


def _save_nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...]) -> None:
    nibabel = pytest.importorskip("nibabel")
    image = nibabel.Nifti1Image(data, affine=np.diag([*zooms[:3], 1.0]))
    image.header.set_zooms(zooms)
    nibabel.save(image, path)


# ---------------------------------------------------------------------------------------
# reading and computing
# ---------------------------------------------------------------------------------------
def test_npy_and_npz_equal_the_reference(tmp_path, rng):
    vol3d = _labels(rng, (9, 8, 7))
    vol2d = _labels(rng, (11, 6))
    np.save(tmp_path / "a.npy", vol3d)
    np.savez(tmp_path / "b.npz", labels=vol2d, image=np.zeros((11, 6)))  # key "labels" wins
    np.savez(tmp_path / "c.npz", vol3d.astype(np.int32))  # the only array
    report = precompute_distance_maps([tmp_path], tmp_path / "out", 3, workers=1, progress=False, engine="scipy")
    assert report.ok and [p.name for p in report.done] == ["a.npy", "b.npz", "c.npz"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "a.npy"), _reference(vol3d, 3).astype(np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "b.npy"), _reference(vol2d, 3).astype(np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "c.npy"), _reference(vol3d, 3).astype(np.float32))
    assert np.load(tmp_path / "out" / "a.npy").shape == (3, 9, 8, 7)


@pytest.mark.parametrize("convention", ["boundary_loss", "signed", "signed_inside_positive"])
def test_float64_is_exactly_the_reference_with_ignore_index_and_edge_classes(tmp_path, rng, convention):
    labels = _labels(rng, (10, 9, 5), num_classes=3).astype(np.int16)
    labels[0, :, :] = -1  # ignored voxels
    # classes: 0, 1, 2 present, 3 absent, 4 = ignore_index (also absent)
    np.save(tmp_path / "v.npy", labels)
    np.save(tmp_path / "full.npy", np.zeros((4, 5), dtype=np.int64))  # class 0 fills the volume
    spacing = (1.5, 0.7, 2.0)
    report = precompute_distance_maps(
        [tmp_path / "v.npy"],
        tmp_path / "out",
        5,
        spacing=spacing,
        convention=convention,
        dtype="float64",
        ignore_index=-1,
        workers=1,
        progress=False,
    )
    assert report.ok
    expected = _reference(labels, 5, spacing, convention=convention, ignore_index=-1)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "v.npy"), expected)
    report = precompute_distance_maps(
        [tmp_path / "full.npy"], tmp_path / "out", 2, dtype="float64", workers=1, progress=False
    )
    assert report.ok
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "full.npy"), np.zeros((2, 4, 5)))


def test_ignore_index_that_is_a_class_value(tmp_path, rng):
    labels = _labels(rng, (8, 8), num_classes=3)
    np.save(tmp_path / "v.npy", labels)
    report = precompute_distance_maps(
        [tmp_path / "v.npy"], tmp_path / "o", 3, ignore_index=2, dtype="float64", workers=1, progress=False
    )
    assert report.ok
    expected = _reference(labels, 3, ignore_index=2)
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "v.npy"), expected)
    assert not expected[2].any()


def test_nifti_spacing_from_header_and_explicit_override(tmp_path, rng):
    labels = _labels(rng, (10, 8, 6))
    zooms = (2.0, 0.5, 1.25)
    _save_nifti(tmp_path / "case.nii.gz", labels.astype(np.float32), zooms)  # float labels, as often stored
    _save_nifti(tmp_path / "plain.nii", labels.astype(np.int16), zooms)
    read, header_spacing = read_label_volume(tmp_path / "case.nii.gz", 3)
    assert read.dtype.kind == "i" and header_spacing == zooms
    np.testing.assert_array_equal(read, labels)

    report = precompute_distance_maps([tmp_path], tmp_path / "out", 3, dtype="float64", workers=1, progress=False)
    assert report.ok and sorted(p.name for p in report.done) == ["case.nii.gz", "plain.nii"]
    expected = _reference(labels, 3, zooms)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "case.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "plain.npy"), expected)
    assert not np.array_equal(expected, _reference(labels, 3))  # the spacing matters here

    report = precompute_distance_maps(
        [tmp_path / "case.nii.gz"], tmp_path / "explicit", 3, spacing=1.0, dtype="float64", workers=1, progress=False
    )
    assert report.ok
    np.testing.assert_array_equal(np.load(tmp_path / "explicit" / "case.npy"), _reference(labels, 3, 1.0))


def test_nifti_trailing_singleton_axis_is_dropped(tmp_path, rng):
    labels = _labels(rng, (6, 5, 4))
    _save_nifti(tmp_path / "t.nii.gz", labels[..., None].astype(np.uint8), (1.0, 2.0, 3.0, 1.0))
    read, spacing = read_label_volume(tmp_path / "t.nii.gz")
    assert read.shape == (6, 5, 4) and spacing == (1.0, 2.0, 3.0)


def test_nifti_without_nibabel_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "x.nii.gz").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(LabelFileError, match=r"pip install 'segloss-registry\[nifti\]'"):
        read_label_volume(tmp_path / "x.nii.gz")


def test_bad_inputs_fail_alone_with_clear_messages(tmp_path, rng):
    good = _labels(rng, (6, 6))
    np.save(tmp_path / "good.npy", good)
    np.save(tmp_path / "range.npy", np.array([[0, 1], [5, 7]]))
    np.save(tmp_path / "fractional.npy", np.array([[0.0, 1.0], [0.5, 2.0]]))
    np.save(tmp_path / "batch.npy", good[None, None])
    np.savez(tmp_path / "ambiguous.npz", a=good, b=good)
    (tmp_path / "broken.npy").write_bytes(b"garbage")
    (tmp_path / "notes.txt").write_text("not a label map")
    inputs = [tmp_path, tmp_path / "missing.npy", tmp_path / "notes.txt"]
    report = precompute_distance_maps(inputs, tmp_path / "out", 3, workers=1, progress=False)
    assert [p.name for p in report.done] == ["good.npy"]
    errors = {f.path.name: f.error for f in report.failed}
    assert set(errors) == {
        "range.npy",
        "fractional.npy",
        "batch.npy",
        "ambiguous.npz",
        "broken.npy",
        "missing.npy",
        "notes.txt",
    }
    assert "labels outside [0, 3): 5, 7" in errors["range.npy"]
    assert "not all values are integers" in errors["fractional.npy"] and "0.5" in errors["fractional.npy"]
    assert "save labels[0]" in errors["batch.npy"]
    assert "'labels'" in errors["ambiguous.npz"]
    assert "cannot read .npy file" in errors["broken.npy"]
    assert "no such file" in errors["missing.npy"]
    assert "unsupported file type" in errors["notes.txt"]
    # nothing else (the map and its parameter record), no temporaries
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.npy", "good.npy.json"]
    assert not report.ok and "7 failed" in report.summary() and "range.npy: labels outside" in report.summary()
    with pytest.raises(LabelFileError, match=r"range\.npy: labels outside"):
        read_label_volume(tmp_path / "range.npy", 3)


def test_nan_labels_and_a_zero_voxel_size_fail_that_file_only(tmp_path, rng):
    """docs/distance_maps_dataset.md: "0.5 or NaN is an error that shows the offending values"; "a header
    whose voxel size is not a positive finite number ... is reported as a failure of that file"."""
    nibabel = pytest.importorskip("nibabel")
    good = _labels(rng, (5, 6, 4))
    np.save(tmp_path / "good.npy", good)
    nan = good.astype(np.float32)
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    image = nibabel.Nifti1Image(good.astype(np.int16), affine=None)
    image.header["pixdim"][2] = np.nan  # (a zero there nibabel itself turns into 1 when reading)
    nibabel.save(image, tmp_path / "flat.nii.gz")
    report = precompute_distance_maps([tmp_path], tmp_path / "out", 3, workers=1, progress=False)
    assert [p.name for p in report.done] == ["good.npy"]
    errors = {f.path.name: f.error for f in report.failed}
    assert "not all values are integers (e.g. nan)" in errors["nan.npy"]
    assert "invalid voxel size in the NIfTI header" in errors["flat.nii.gz"] and "finite" in errors["flat.nii.gz"]
    # an explicit --spacing rescues the file whose header has none
    again = precompute_distance_maps([tmp_path / "flat.nii.gz"], tmp_path / "o2", 3, spacing=1.0, progress=False)
    assert again.ok


def test_argument_and_layout_errors(tmp_path, rng):
    np.save(tmp_path / "a.npy", _labels(rng, (5, 5)))
    np.save(tmp_path / "a2.npy", _labels(rng, (5, 5)))
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "a.npy", _labels(rng, (5, 5)))
    with pytest.raises(ValueError, match="would both write"):
        precompute_distance_maps([tmp_path / "a.npy", tmp_path / "sub" / "a.npy"], tmp_path / "o", 3, progress=False)
    with pytest.raises(ValueError, match="overwrite the input itself"):
        precompute_distance_maps([tmp_path / "a.npy"], tmp_path, 3, progress=False)
    with pytest.raises(ValueError, match="also an input directory"):
        precompute_distance_maps([tmp_path], tmp_path, 3, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files"):
        precompute_distance_maps([tmp_path / "empty"], tmp_path / "o2", 3, progress=False)
    for kwargs in (
        {"num_classes": 0},
        {"num_classes": 2, "convention": "x"},
        {"num_classes": 2, "workers": 0},
        {"num_classes": 2, "dtype": "int32"},
        {"num_classes": 2, "spacing": (1.0, -1.0)},
    ):
        with pytest.raises(ValueError):
            precompute_distance_maps([tmp_path / "a.npy"], tmp_path / "o3", progress=False, **kwargs)
    # a spacing with the wrong number of axes fails that file only
    report = precompute_distance_maps([tmp_path / "a.npy"], tmp_path / "o4", 3, spacing=(1, 2, 3), progress=False)
    assert "invalid explicit spacing" in report.failed[0].error
    # the same file given twice (and through its directory) is processed once
    assert find_label_files([tmp_path / "a.npy", tmp_path, tmp_path / "a.npy"]) == [
        tmp_path / "a.npy",
        tmp_path / "a2.npy",
    ]
    assert distance_map_path("x/y.NII.GZ", "o") == Path("o/y.npy")


# ---------------------------------------------------------------------------------------
# resuming, atomic writes, parallelism
# ---------------------------------------------------------------------------------------
def test_resume_skips_finished_outputs_but_not_temporaries(tmp_path, rng):
    for name in ("a", "b", "c"):
        np.save(tmp_path / f"{name}.npy", _labels(rng, (7, 6, 5)))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".b.npy.1234-deadbeef.tmp").write_bytes(b"\x93NUMPY half-written")  # a killed run's leftover
    first = precompute_distance_maps([tmp_path], out, 3, workers=1, progress=False)
    assert [p.name for p in first.done] == ["a.npy", "b.npy", "c.npy"] and not first.skipped
    want = _reference(np.load(tmp_path / "b.npy"), 3)
    np.testing.assert_allclose(np.load(out / "b.npy"), want, rtol=2e-7, atol=2e-6)  # the float32 kernels

    stamp = (out / "a.npy").stat().st_mtime_ns
    (out / "c.npy").unlink()  # as if the first run had stopped before c
    second = precompute_distance_maps([tmp_path], out, 3, workers=1, progress=False)
    assert [p.name for p in second.skipped] == ["a.npy", "b.npy"] and [p.name for p in second.done] == ["c.npy"]
    assert (out / "a.npy").stat().st_mtime_ns == stamp

    third = precompute_distance_maps([tmp_path], out, 3, overwrite=True, workers=1, progress=False)
    assert len(third.done) == 3 and not third.skipped

    # an existing output computed with other settings is not silently reused
    fourth = precompute_distance_maps([tmp_path / "a.npy"], out, 4, workers=1, progress=False)
    assert not fourth.skipped and "pass --overwrite" in fourth.failed[0].error


def test_failure_while_writing_leaves_no_output_and_no_temporary(tmp_path, rng, monkeypatch):
    for name in ("a", "b", "c"):
        np.save(tmp_path / f"{name}.npy", _labels(rng, (6, 6, 6)))
    real_save = np.save

    def failing_save(file, arr, *args, **kwargs):
        if os.path.basename(getattr(file, "name", str(file))).startswith(".b.npy"):
            file.write(b"\x93NUMPY partial")  # something reached the disk before the failure
            raise OSError("disk full")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    report = precompute_distance_maps([tmp_path], tmp_path / "out", 3, workers=1, progress=False)
    assert [p.name for p in report.done] == ["a.npy", "c.npy"]
    out_b = tmp_path / "out" / "b.npy"
    assert [(f.path.name, f.error) for f in report.failed] == [("b.npy", f"cannot write {out_b}: disk full")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.npy", "a.npy.json", "c.npy", "c.npy.json"]

    monkeypatch.setattr(np, "save", real_save)
    again = precompute_distance_maps([tmp_path], tmp_path / "out", 3, workers=1, progress=False)
    assert [p.name for p in again.done] == ["b.npy"] and len(again.skipped) == 2


def test_interrupt_leaves_no_partial_file(tmp_path, rng, monkeypatch):
    np.save(tmp_path / "a.npy", _labels(rng, (6, 6)))

    def interrupted_save(file, arr, *args, **kwargs):
        file.write(b"\x93NUMPY")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        precompute_distance_maps([tmp_path], tmp_path / "out", 3, workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_two_workers_write_the_same_files_as_one(tmp_path, rng):
    for i in range(4):
        np.save(tmp_path / f"v{i}.npy", _labels(rng, (8, 7, 6)))
    np.save(tmp_path / "bad.npy", np.full((3, 3), 9))
    one = precompute_distance_maps([tmp_path], tmp_path / "w1", 3, workers=1, progress=False)
    two = precompute_distance_maps([tmp_path], tmp_path / "w2", 3, workers=2, progress=False)
    assert (one.done, one.skipped, one.failed) == (two.done, two.skipped, two.failed)
    assert [f.path.name for f in two.failed] == ["bad.npy"]
    names = sorted(p.name for p in (tmp_path / "w1").glob("*.npy"))
    assert names == sorted(p.name for p in (tmp_path / "w2").glob("*.npy")) == [f"v{i}.npy" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == sorted([*names, *(f"{n}.json" for n in names)])
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_progress_bar_and_fallback_counter(tmp_path, rng, capsys, monkeypatch):
    np.save(tmp_path / "a.npy", _labels(rng, (5, 5)))
    precompute_distance_maps([tmp_path], tmp_path / "o1", 3, workers=1)
    assert "distmap" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    precompute_distance_maps([tmp_path], tmp_path / "o2", 3, workers=1)
    assert "distmap: 1/1 files" in capsys.readouterr().err
    precompute_distance_maps([tmp_path], tmp_path / "o3", 3, workers=1, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, rng, capsys):
    data = tmp_path / "data"
    data.mkdir()
    labels = _labels(rng, (8, 6, 5))
    np.save(data / "a.npy", labels)
    np.savez(data / "b.npz", labels=labels)
    out = tmp_path / "maps"
    args = ["distmap", str(data), "--out", str(out), "--num-classes", "3", "--quiet", "--workers", "1"]
    assert main([*args, "--spacing", "2", "1", "0.5", "--convention", "signed"]) == 0
    captured = capsys.readouterr()
    assert "2 done, 0 skipped" in captured.out and captured.err == ""
    np.testing.assert_array_equal(
        load_distance_map(out / "a.npy"), _reference(labels, 3, (2, 1, 0.5), convention="signed").astype("f4")
    )
    assert main(args) == 1  # other spacing and convention: the stored maps are not reused
    out_text = capsys.readouterr().out
    assert "0 done, 0 skipped (output exists), 2 failed" in out_text and out_text.count("pass --overwrite") == 2
    assert "convention='signed', spacing=[2.0, 1.0, 0.5]" in out_text
    assert main([*args, "--overwrite"]) == 0
    assert "2 done" in capsys.readouterr().out
    assert main(args) == 0  # resumed: nothing to do
    assert "0 done, 2 skipped" in capsys.readouterr().out

    np.save(data / "c.npy", np.full((8, 6, 5), 3))
    assert main(args) == 1
    out_text = capsys.readouterr().out
    assert "1 failed" in out_text and "c.npy: labels outside [0, 3): 3" in out_text

    assert main(["distmap", str(tmp_path / "nothing"), "--out", str(out), "--num-classes", "3"]) == 1
    assert "no such file" in capsys.readouterr().out
    assert main(["distmap", str(out), "--out", str(out), "--num-classes", "3"]) == 2
    assert "also an input directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distmap", str(data), "--num-classes", "3"])  # --out is required


# ---------------------------------------------------------------------------------------
# the crop helper
# ---------------------------------------------------------------------------------------
def test_random_patch_crops_the_same_window_everywhere(tmp_path):
    spatial = (9, 8, 7)
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij"))  # (3, *spatial): the position
    image = coords.astype(np.float32)  # (channels, *spatial)
    labels = coords[0] * 100 + coords[1] * 10 + coords[2]  # (*spatial)
    np.save(tmp_path / "phi.npy", np.stack([labels, -labels]).astype(np.float32))  # (C, *spatial)
    phi = load_distance_map(tmp_path / "phi.npy")
    assert isinstance(phi, np.memmap)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        img_p, lab_p, phi_p = random_patch((image, labels, phi), (4, 3, 7), rng=rng)
        assert img_p.shape == (3, 4, 3, 7) and lab_p.shape == (4, 3, 7) and phi_p.shape == (2, 4, 3, 7)
        corner = tuple(int(img_p[axis, 0, 0, 0]) for axis in range(3))
        seen.add(corner)
        assert 0 <= corner[0] <= 5 and 0 <= corner[1] <= 5 and corner[2] == 0
        np.testing.assert_array_equal(lab_p, labels[corner[0] : corner[0] + 4, corner[1] : corner[1] + 3])
        np.testing.assert_array_equal(phi_p[0], lab_p)
        np.testing.assert_array_equal(phi_p[1], -lab_p)
    assert len(seen) > 5
    a = random_patch((image, labels), (4, 3, 7), rng=7)
    b = random_patch((image, labels), (4, 3, 7), rng=7)
    np.testing.assert_array_equal(a[0], b[0])  # a seed is reproducible
    (whole,) = random_patch((labels,), spatial, rng=rng)
    np.testing.assert_array_equal(whole, labels)
    (fixed,) = random_patch([labels], (2, 2), start=(3, 4))  # 2 spatial axes: the last two
    np.testing.assert_array_equal(fixed, labels[:, 3:5, 4:6])


def test_random_patch_errors():
    image, labels = np.zeros((2, 8, 8)), np.zeros((8, 7))
    with pytest.raises(ValueError, match="spatial shapes"):
        random_patch((image, labels), (4, 4))
    with pytest.raises(ValueError, match="larger than the volume"):
        random_patch((image,), (4, 9))
    with pytest.raises(ValueError, match="fewer axes"):
        random_patch((np.zeros(8), image), (4, 4))
    with pytest.raises(ValueError, match="outside the volume"):
        random_patch((image,), (4, 4), start=(5, 0))
    with pytest.raises(ValueError, match="one index per spatial axis"):
        random_patch((image,), (4, 4), start=(0,))
    with pytest.raises(ValueError, match="positive"):
        random_patch((image,), (0, 4))
    with pytest.raises(TypeError, match="sequence of arrays"):
        random_patch(image, (4, 4))
    with pytest.raises(TypeError, match="patch_size"):
        random_patch((image,), 4)
    with pytest.raises(ValueError, match="at least one array"):
        random_patch((), (4, 4))


def test_random_patch_on_torch_tensors():
    torch = pytest.importorskip("torch")
    image, phi = torch.zeros(1, 6, 6), torch.arange(2 * 36.0).reshape(2, 6, 6)
    img_p, phi_p = random_patch((image, phi), (3, 3), start=(1, 2))
    assert img_p.shape == (1, 3, 3) and torch.equal(phi_p, phi[:, 1:4, 2:5])


# ---------------------------------------------------------------------------------------
# engines: the segloss kernels (float32) and scipy (the float64 reference)
# ---------------------------------------------------------------------------------------
@pytest.mark.usefixtures("fused_kernels")
@pytest.mark.parametrize("workers", [1, 2])
def test_segloss_engine_equals_the_reference_to_float32_rounding(tmp_path, rng, workers):
    volumes = {"a": _labels(rng, (12, 9, 7)), "b": _labels(rng, (15, 8)), "c": _labels(rng, (10, 10, 10), 4)}
    volumes["c"][0, 0, :] = 255
    for name, vol in volumes.items():
        np.save(tmp_path / f"{name}.npy", vol)
    spacing = (0.8, 1.7, 2.5)
    kw = {"ignore_index": 255, "progress": False, "workers": workers}
    inputs = [tmp_path / "a.npy", tmp_path / "c.npy"]
    report = precompute_distance_maps(inputs, tmp_path / "s", 4, spacing=spacing, **kw)
    assert report.ok and len(report.done) == 2
    report = precompute_distance_maps([tmp_path / "b.npy"], tmp_path / "s", 4, spacing=(0.8, 1.7), **kw)
    assert report.ok
    for name, vol in volumes.items():
        want = _reference(vol, 4, spacing[: vol.ndim], ignore_index=255)
        got = np.load(tmp_path / "s" / f"{name}.npy")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-7, atol=2e-6)


def test_engine_choice(tmp_path, rng, monkeypatch):
    vol = _labels(rng, (7, 6, 5))
    np.save(tmp_path / "v.npy", vol)
    # float64 output always comes from the float64 reference, bit for bit
    precompute_distance_maps([tmp_path / "v.npy"], tmp_path / "o", 3, dtype="float64", workers=1, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "v.npy"), _reference(vol, 3))
    precompute_distance_maps([tmp_path / "v.npy"], tmp_path / "p", 3, engine="scipy", workers=1, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "p" / "v.npy"), _reference(vol, 3).astype(np.float32))
    with pytest.raises(ValueError, match=r"engine must be one of auto, segloss, scipy, got 'edt'"):
        precompute_distance_maps([tmp_path / "v.npy"], tmp_path / "q", 3, engine="edt")
    from segloss_torch import fused

    monkeypatch.setattr(fused, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"engine='segloss' needs the segloss torch kernels"):
        precompute_distance_maps([tmp_path / "v.npy"], tmp_path / "q", 3, engine="segloss")
    report = precompute_distance_maps([tmp_path / "v.npy"], tmp_path / "r", 3, workers=1, progress=False)  # auto
    assert report.ok
    np.testing.assert_array_equal(np.load(tmp_path / "r" / "v.npy"), _reference(vol, 3).astype(np.float32))


def test_segloss_engine_refuses_float64(tmp_path):
    """The kernels compute float32: asking them for float64 maps is an error, not a silent downgrade."""
    np.save(tmp_path / "v.npy", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"engine='segloss' computes float32 maps.*engine='scipy'"):
        precompute_distance_maps([tmp_path / "v.npy"], tmp_path / "out", 2, engine="segloss", dtype="float64")
    assert not (tmp_path / "out" / "v.npy").exists()


# ---------------------------------------------------------------------------------------
# failures: parameter records, write errors, dead workers, a killed command
# ---------------------------------------------------------------------------------------
def test_each_map_records_its_parameters_and_a_rerun_with_others_refuses_to_skip(tmp_path, rng):
    import json

    from segloss_core import __version__
    from segloss_core.datasets.distmap import parameters_path

    np.save(tmp_path / "a.npy", _labels(rng, (6, 5, 4)))
    out = tmp_path / "out"
    base = {"workers": 1, "progress": False, "engine": "scipy"}
    assert precompute_distance_maps([tmp_path / "a.npy"], out, 3, **base).ok
    record = json.loads(parameters_path(out / "a.npy").read_text())
    assert record == {
        "num_classes": 3,
        "convention": "boundary_loss",
        "spacing": "file",
        "ignore_index": None,
        "normalize": None,
        "dtype": "float32",
        "engine": "scipy",
        "segloss_version": __version__,
        "voxel_size": [1.0, 1.0, 1.0],
        "input": "a.npy",
    }
    for changed, shown in [
        ({"convention": "signed"}, "convention='boundary_loss'; this run asks convention='signed'"),
        ({"spacing": 1.0}, "spacing='file'; this run asks spacing=1.0"),
        ({"spacing": (1.0, 2.0, 1.0)}, "spacing=[1.0, 2.0, 1.0]"),
        ({"ignore_index": 9}, "ignore_index=9"),
    ]:
        report = precompute_distance_maps([tmp_path / "a.npy"], out, 3, **base, **changed)
        assert not report.skipped and len(report.failed) == 1, changed
        assert shown in report.failed[0].error and "pass --overwrite" in report.failed[0].error
    assert precompute_distance_maps([tmp_path / "a.npy"], out, 3, **base).skipped  # the same parameters: reused
    redone = precompute_distance_maps([tmp_path / "a.npy"], out, 3, overwrite=True, convention="signed", **base)
    assert redone.ok and json.loads(parameters_path(out / "a.npy").read_text())["convention"] == "signed"

    # a map of another class count or dtype is refused, and the stored map is kept byte for byte
    kept = (out / "a.npy").read_bytes()
    for changed, shown in [({"num_classes": 4}, "expected 4 classes"), ({"dtype": "float16"}, "and float16")]:
        kwargs = {**base, "num_classes": 3, **changed}
        report = precompute_distance_maps([tmp_path / "a.npy"], out, convention="signed", **kwargs)
        assert not report.skipped and shown in report.failed[0].error and "pass --overwrite" in report.failed[0].error
        assert (out / "a.npy").read_bytes() == kept
    parameters_path(out / "a.npy").unlink()  # a map from an older segloss: no record, not reused
    report = precompute_distance_maps([tmp_path / "a.npy"], out, 3, convention="signed", **base)
    assert "no parameter record" in report.failed[0].error and "pass --overwrite" in report.failed[0].error


def test_disk_full_is_said_in_words(tmp_path, rng, monkeypatch):
    import errno

    np.save(tmp_path / "a.npy", _labels(rng, (6, 6, 6)))
    real_save = np.save

    def enospc(file, arr, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", enospc)
    report = precompute_distance_maps([tmp_path], tmp_path / "o1", 3, workers=1, progress=False, engine="scipy")
    error = report.failed[0].error
    assert error.startswith(f"cannot write {tmp_path / 'o1' / 'a.npy'}: the disk is full (the map needs ")
    assert "iB free in" in error

    # NumPy's short write has no errno ("N requested and M written"): the free space explains it
    def short_write(file, arr, *args, **kwargs):
        raise OSError(f"{arr.nbytes} requested and 4096 written")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    report = precompute_distance_maps([tmp_path], tmp_path / "o2", 3, workers=1, progress=False, engine="scipy")
    assert "a.npy: the disk is full (the map needs 2.7 KiB, 0.0 KiB free in" in report.failed[0].error
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == []  # no temporaries either


_CLI = [sys.executable, "-m", "segloss_core.cli", "distmap", "--num-classes", "3", "--engine", "scipy", "--quiet"]


def _run_one_worker(source: Path, out: Path, preexec_fn: Callable[[], None]) -> subprocess.CompletedProcess:
    """``segloss distmap`` with one worker on ``source`` into ``out``, ``preexec_fn`` run in the child."""
    return subprocess.run(
        [*_CLI, "--workers", "1", str(source), "--out", str(out)],
        preexec_fn=preexec_fn,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_file_size_limit_is_said_in_words(tmp_path, rng):
    import resource

    np.save(tmp_path / "a.npy", _labels(rng, (20, 20, 20)))  # a map of 3 * 8000 float32: 96 kB
    limit = 16384

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    result = _run_one_worker(tmp_path / "a.npy", out, limited)
    assert result.returncode == 1, result.stderr
    assert f"cannot write {out / 'a.npy'}: the map (96128 bytes) exceeds this process's file-size limit" in (
        result.stdout
    )
    assert f"of {limit} bytes (ulimit -f)" in result.stdout and "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def _without_root_overrides() -> None:
    """In the child (preexec_fn): root ignores permission bits through CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH; dropping them from the bounding set makes the exec'd command obey them."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX permissions, Linux capabilities")
def test_a_read_only_output_directory_is_said_in_words(tmp_path, rng):
    np.save(tmp_path / "a.npy", _labels(rng, (5, 5, 5)))
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(out / 'probe')!r}, 'w')"],
            preexec_fn=_without_root_overrides,
            capture_output=True,
        )
        if probe.returncode == 0:
            pytest.skip("this user can write into a read-only directory")
        result = _run_one_worker(tmp_path / "a.npy", out, _without_root_overrides)
    finally:
        out.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert f"cannot write {out / 'a.npy'}: permission denied (the directory {out} is not writable" in (result.stdout), (
        result.stdout + result.stderr
    )
    assert list(out.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="the planted kill relies on fork() inheriting the patch")
def test_a_dead_worker_costs_only_its_own_file(tmp_path, rng, monkeypatch):
    """One worker is SIGKILLed in the middle of a file: that file fails with the reason, a new
    worker takes over, and every other file is written (the docs: one bad file never stops the others)."""
    import signal

    from segloss_core.datasets import distmap as distmap_dataset

    for i in range(8):
        np.save(tmp_path / f"v{i}.npy", _labels(rng, (6, 6, 5)))
    real = distmap_dataset._distance_map_of_volume

    def dies_on_v3(labels, *args, **kwargs):
        if np.array_equal(labels, np.load(tmp_path / "v3.npy")):
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return real(labels, *args, **kwargs)

    monkeypatch.setattr(distmap_dataset, "_distance_map_of_volume", dies_on_v3)
    report = precompute_distance_maps([tmp_path], tmp_path / "out", 3, workers=2, progress=False, engine="scipy")
    assert [p.name for p in report.done] == [f"v{i}.npy" for i in range(8) if i != 3]
    assert [f.path.name for f in report.failed] == ["v3.npy"]
    assert "worker process died while computing this map (killed by SIGKILL" in report.failed[0].error
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npy")) == [f"v{i}.npy" for i in range(8) if i != 3]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_workers_die_with_a_killed_command(tmp_path, rng):
    """SIGKILL of `segloss distmap --workers 2`: its workers end within seconds and write nothing more."""
    import signal
    import time

    for i in range(12):
        labels = np.zeros((48, 48, 48), dtype=np.uint8)
        labels[i : i + 20, 5:30, 10:40] = 1
        labels[30:, :, : 10 + i] = 2
        np.save(tmp_path / f"v{i:02}.npy", labels)
    out = tmp_path / "out"
    command = subprocess.Popen([*_CLI, "--workers", "2", str(tmp_path), "--out", str(out)])
    try:
        deadline = time.monotonic() + 120
        while not (len(_children(command.pid)) == 2 and list(out.glob("*.npy"))):
            assert command.poll() is None and time.monotonic() < deadline, "the command ended before the test"
            time.sleep(0.05)
        workers = _children(command.pid)
    finally:
        command.send_signal(signal.SIGKILL)
        command.wait()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in workers), "workers outlived the command"
    written = sorted(p.name for p in out.iterdir())
    time.sleep(1.0)
    assert sorted(p.name for p in out.iterdir()) == written  # nothing written after they ended
    assert len([n for n in written if n.endswith(".npy")]) < 12  # they were stopped, not finished
    assert not [n for n in written if n.endswith(".tmp")]  # and removed their temporary files
