"""Scan loading refuses what it cannot hold and says why: memory guard, size claims, permissions.

Issue 13, items 11 and 12: a header that promises more voxels than the memory
limit is refused from the header alone (before any voxel is decoded) with a
message naming the file, the size and the limit, and how to raise it; a file
shorter than its header says is named as such; a permission error says
"permission denied" and names the file.
"""

from __future__ import annotations

import errno
import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mriface.volume as volume_module
from mriface.cli import main as cli_main
from mriface.errors import InputFileError, MRIFaceError, VolumeError
from mriface.volume import load_volume


def _nifti(path: Path, shape=(40, 40, 40)) -> Path:
    """A small int16 NIfTI with a bright cube in it (a usable, non-constant volume)."""
    data = np.zeros(shape, np.int16)
    data[8:-8, 8:-8, 8:-8] = 1000
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _claim_dims(path: Path, dims) -> Path:
    """Rewrite the NIfTI-1 header's dim field (bytes 40-55) so that it claims ``dims``."""
    raw = bytearray(path.read_bytes())
    struct.pack_into("<8h", raw, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    path.write_bytes(bytes(raw))
    return path


@pytest.fixture(autouse=True)
def _no_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv("MRIFACE_MAX_VOLUME_MB", raising=False)


# --------------------------------------------------------------------------- a huge header
@pytest.mark.parametrize("gz", [False, True])
def test_header_claiming_30000_cubed_is_refused_for_its_size(tmp_path, gz):
    path = _claim_dims(_nifti(tmp_path / "huge.nii", (4, 4, 4)), (30000, 30000, 30000))
    if gz:
        gz_path = tmp_path / "huge.nii.gz"
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path = gz_path
    with pytest.raises(VolumeError) as info:
        load_volume(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "30000x30000x30000" in msg and "TiB" in msg  # what is wrong: the size
    assert "limit of 2 GiB" in msg and "MRIFACE_MAX_VOLUME_MB" in msg and "max_volume_mb=" in msg
    assert "truncated" not in msg


def test_cli_prints_the_size_and_exits_2(tmp_path, capsys):
    path = _claim_dims(_nifti(tmp_path / "huge.nii", (4, 4, 4)), (30000, 30000, 30000))
    assert cli_main(["surface", str(path)]) == 2
    err = capsys.readouterr().err
    assert "30000x30000x30000" in err and "MRIFACE_MAX_VOLUME_MB" in err


# --------------------------------------------------------------------------- the memory limit
def test_limit_is_checked_before_decoding_and_can_be_raised(tmp_path, monkeypatch):
    path = _nifti(tmp_path / "head.nii")  # 40^3 float32 = 250 KiB

    def no_decoding(*args, **kwargs):
        raise AssertionError("voxels decoded before the size check")

    with monkeypatch.context() as m:
        m.setattr(volume_module, "_read_data", no_decoding)
        with pytest.raises(VolumeError, match=r"40x40x40 voxels .* more than the limit of 102 KiB"):
            load_volume(path, max_volume_mb=0.1)
        m.setenv("MRIFACE_MAX_VOLUME_MB", "0.1")
        with pytest.raises(VolumeError, match="MRIFACE_MAX_VOLUME_MB"):
            load_volume(path)
    # the parameter wins over the environment, and a raised limit loads the scan
    monkeypatch.setenv("MRIFACE_MAX_VOLUME_MB", "0.1")
    assert load_volume(path, max_volume_mb=1).shape == (40, 40, 40)
    monkeypatch.setenv("MRIFACE_MAX_VOLUME_MB", "1")
    assert load_volume(path).shape == (40, 40, 40)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "nan"])
def test_a_bad_limit_is_an_error_naming_it(tmp_path, monkeypatch, value):
    path = _nifti(tmp_path / "head.nii")
    monkeypatch.setenv("MRIFACE_MAX_VOLUME_MB", value)
    with pytest.raises(VolumeError, match="MRIFACE_MAX_VOLUME_MB"):
        load_volume(path)


def test_file_shorter_than_its_header_says_gives_both_sizes(tmp_path):
    path = _nifti(tmp_path / "cut.nii", (64, 64, 64))  # 512 KiB of int16 voxels
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputFileError) as info:
        load_volume(path)
    msg = str(info.value)
    assert str(path) in msg and "64x64x64" in msg and "512 KiB" in msg and "holds only" in msg
    assert "truncated" in msg


# --------------------------------------------------------------------------- permissions
def _deny(*args, **kwargs):
    target = str(args[0]) if args else "?"
    raise PermissionError(errno.EACCES, "Permission denied", target)


def test_unreadable_scan_says_permission_denied(tmp_path, monkeypatch):
    # the test machine runs as root, whom chmod cannot lock out: refuse the open itself
    path = _nifti(tmp_path / "locked.nii")
    monkeypatch.setattr(nib, "load", _deny)
    with pytest.raises(InputFileError) as info:
        load_volume(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: permission denied")
    assert "not a readable NIfTI" not in msg  # the file's format is not the problem


def test_a_folder_that_cannot_be_entered_says_permission_denied(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    path = _nifti((locked.mkdir() or locked) / "scan.nii")
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if str(self).startswith(str(locked) + "/"):
            _deny(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(MRIFaceError, match="permission denied") as info:
        load_volume(path)
    assert str(path) in str(info.value)


def test_unreadable_dicom_file_says_permission_denied(tmp_path, monkeypatch):
    import pydicom

    path = tmp_path / "IM0001.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    monkeypatch.setattr(pydicom, "dcmread", _deny)
    with pytest.raises(InputFileError, match="permission denied") as info:
        load_volume(tmp_path)
    assert str(path) in str(info.value)
