"""Loading scans: orientation, 4D, modality and every kind of bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from mriface import InputFileError, MRIFaceError, VolumeError, load_volume
from mriface.volume import detect_modality


def _head_like(shape=(20, 24, 28)):
    """A bright ball in dark air with an asymmetric marker, float32."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = np.array(shape) / 2
    data = (((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 64).astype(np.float32) * 100
    data[2, 3, 4] = 7.0  # a voxel to track through reorientation
    return data


def test_sample_head_loads_as_ras_float32(sample_path):
    vol = load_volume(sample_path("voxface"))
    assert vol.data.dtype == np.float32 and vol.data.ndim == 3
    assert np.isfinite(vol.data).all()
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.modality == "mr"
    assert np.allclose(vol.zooms, 2.0)
    assert vol.path is not None and vol.path.name.endswith(".nii.gz")


def test_reorients_to_ras_and_keeps_world_positions(tmp_path):
    data = _head_like()
    # an LPI-stored image: x flipped, z flipped
    aff = np.array([[-2.0, 0, 0, 50], [0, 1.5, 0, -20], [0, 0, -1.2, 30], [0, 0, 0, 1]])
    path = tmp_path / "lpi.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), path)
    vol = load_volume(path)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    # the marked voxel is at the same world position before and after
    w0 = aff @ np.array([2, 3, 4, 1.0])
    idx = np.argwhere(vol.data == 7.0)[0]
    w1 = vol.affine @ np.r_[idx, 1.0]
    assert np.allclose(w0, w1)
    assert np.allclose(sorted(vol.zooms), sorted([2.0, 1.5, 1.2]))


def test_mgz_is_read(tmp_path):
    data = _head_like()
    path = tmp_path / "head.mgz"
    nib.save(nib.MGHImage(data, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    vol = load_volume(path)
    assert vol.shape == data.shape and vol.data.max() == 100


def test_4d_needs_an_index(tmp_path):
    data = np.stack([_head_like(), _head_like() * 2], axis=-1)
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(VolumeError) as e:
        load_volume(path)
    msg = str(e.value)
    assert "series.nii.gz" in msg and "(20, 24, 28, 2)" in msg and "volume_index" in msg
    assert load_volume(path, volume_index=1).data.max() == 200
    assert load_volume(path, volume_index=-2).data.max() == 100
    with pytest.raises(VolumeError, match="out of range"):
        load_volume(path, volume_index=5)


def test_trailing_singleton_axis_is_3d(tmp_path):
    path = tmp_path / "one.nii"
    nib.save(nib.Nifti1Image(_head_like()[..., None], np.eye(4)), path)
    assert load_volume(path).shape == (20, 24, 28)


def test_nonfinite_voxels_become_air(tmp_path):
    data = _head_like()
    data[0, 0, 0] = np.nan
    data[1, 0, 0] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    vol = load_volume(path)
    assert np.isfinite(vol.data).all()
    assert vol.data.min() == 0.0


def test_modality_detection_and_override(tmp_path):
    ct = _head_like() * 10 - 1000  # air -1000 HU, tissue 0 HU
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct.astype(np.int16), np.eye(4)), path)
    assert load_volume(path).modality == "ct"
    assert load_volume(path, modality="mr").modality == "mr"
    assert detect_modality(_head_like()) == "mr"
    with pytest.raises(VolumeError, match="modality"):
        load_volume(path, modality="pet")


# --------------------------------------------------------------------------- bad inputs
def _bad_files(tmp_path):
    """name -> (path, expected error type, phrase the message must contain)."""
    out = {}
    out["missing"] = (tmp_path / "nope.nii.gz", InputFileError, "no such file")
    p = tmp_path / "text.nii"
    p.write_text("this is not an image\n" * 50)
    out["not an image"] = (p, InputFileError, "not a readable")
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32), np.eye(4)), good)
    raw = good.read_bytes()
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(raw[: len(raw) // 2])
    out["truncated"] = (p, InputFileError, "truncated")
    p = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((30, 30), np.float32), np.eye(4)), p)
    out["2D"] = (p, VolumeError, "not a 3D volume")
    p = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), p)
    out["4D"] = (p, VolumeError, "4D")
    p = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), p)
    out["all zero"] = (p, VolumeError, "same value")
    p = tmp_path / "nans.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)), p)
    out["all NaN"] = (p, VolumeError, "NaN")
    p = tmp_path / "folder.nii"
    p.mkdir()
    out["folder"] = (p, InputFileError, "folder")
    return out


@pytest.mark.parametrize("kind", ["missing", "not an image", "truncated", "2D", "4D", "all zero", "all NaN", "folder"])
def test_bad_input_raises_named_error(tmp_path, kind):
    path, err, phrase = _bad_files(tmp_path)[kind]
    with pytest.raises(err) as e:
        load_volume(path)
    assert isinstance(e.value, MRIFaceError)
    assert str(path) in str(e.value)
    assert phrase in str(e.value)


def test_truncated_plain_gzip_member(tmp_path):
    # a gzip stream cut inside the header: nibabel fails while opening
    p = tmp_path / "cut.nii.gz"
    p.write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + b"\x00" * 100)[:40])
    with pytest.raises(InputFileError) as e:
        load_volume(p)
    assert str(p) in str(e.value)
