"""DICOM series: geometry (LPS -> RAS+, oblique, gantry tilt), HU rescaling, series choice, damaged series.

Every series here is written with pydicom from an analytic object, so the
truth is known without any DICOM reader: the head phantom of
``tests/phantoms.py`` (surface distances), and balls whose world centres
and radii are given in DICOM's own LPS coordinates.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from mriface.dicom import find_series, folder_digest, is_dicom_folder
from mriface.errors import InputFileError, VolumeError
from mriface.inputs import load_scan, read_manifest
from mriface.volume import load_volume

from phantoms import head_phantom, rotation_about  # tests/ is on sys.path (rootdir conftest)

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- writing series
def _ds(values) -> list:
    return [format_number_as_ds(float(v)) for v in values]


def _base(sop_class: str, series_uid: str, number: int, description: str, modality: str,
          rows: int, cols: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "PHANTOM"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.Modality = modality
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    return ds


def write_series(folder, planes, positions, orientation, spacing, *, slope=1.0, intercept=0.0,
                 modality="MR", number=3, description="T1 phantom", seed=0):
    """Write one slice per plane; shuffled file names and instance numbers (readers must sort by position).

    planes : (n, rows, cols) stored uint16 values; positions : (n, 3) LPS mm;
    orientation : 6 LPS direction cosines (row direction, column direction);
    spacing : (between rows, between columns) mm. Returns the file paths in plane order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    order = np.random.default_rng(seed).permutation(len(planes))
    paths = []
    for k, (plane, pos) in enumerate(zip(planes, positions)):
        ds = _base(CT_STORAGE if modality == "CT" else MR_STORAGE, uid, number, description, modality,
                   *plane.shape)
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = _ds(pos)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds(spacing)
        ds.SliceThickness = "2"
        ds.RescaleSlope = format_number_as_ds(float(slope))
        ds.RescaleIntercept = format_number_as_ds(float(intercept))
        ds.PixelData = np.ascontiguousarray(plane, dtype=np.uint16).tobytes()
        path = folder / f"IM{order[k]:04d}_{number}"  # no extension: found by the DICM magic bytes
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def series_from_volume(data, affine_ras, *, slope, intercept):
    """Planes, LPS positions, orientation and spacing of a volume whose axis 2 is the slice axis."""
    stored = np.round((data - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 65535
    stored = stored.astype(np.uint16)
    lin = RAS_TO_LPS @ affine_ras[:3, :3]
    dcol, drow = np.linalg.norm(lin[:, 0]), np.linalg.norm(lin[:, 1])
    orientation = np.concatenate([lin[:, 0] / dcol, lin[:, 1] / drow])
    origin = RAS_TO_LPS @ affine_ras[:3, 3]
    positions = origin + np.arange(data.shape[2])[:, None] * lin[:, 2]
    planes = np.transpose(stored, (2, 1, 0))  # (slice, row, column)
    return planes, positions, orientation, (drow, dcol), stored


def ball_series(rows, cols, n, *, spacing, orientation, origin, step, centre, radius, inside, outside):
    """Planes sampled from a ball given in LPS, at the pixel centres DICOM defines.

    Pixel (row i, column j) of slice k lies at origin + k*step + j*spacing[1]*r + i*spacing[0]*c.
    """
    r, c = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    planes = []
    for k in range(n):
        p = (np.asarray(origin) + k * np.asarray(step))[None, None] + j[..., None] * spacing[1] * r \
            + i[..., None] * spacing[0] * c
        planes.append(np.where(np.linalg.norm(p - centre, axis=-1) < radius, inside, outside))
    positions = np.asarray(origin) + np.arange(n)[:, None] * np.asarray(step)
    return np.array(planes), positions


def _world_centroid(vol, threshold):
    idx = np.argwhere(vol.data > threshold)
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    return world.mean(axis=0), len(idx)


# --------------------------------------------------------------------------- the head phantom
@pytest.fixture(scope="module")
def oblique_phantom(tmp_path_factory):
    """The analytic head at 1x1x2 mm, written as an oblique DICOM series and as NIfTI with the same affine."""
    import nibabel as nib

    vol, _ = head_phantom((1.0, 1.0, 2.0), sub=1)  # sub=1: as accurate here, and 2.5x faster
    rot = rotation_about(2, 20.0) @ rotation_about(0, -15.0)
    affine = np.eye(4)
    affine[:3, :3] = rot @ vol.affine[:3, :3]
    affine[:3, 3] = rot @ vol.affine[:3, 3]
    slope, intercept = 0.0005, -1.0
    planes, positions, orientation, spacing, stored = series_from_volume(vol.data, affine, slope=slope,
                                                                         intercept=intercept)
    root = tmp_path_factory.mktemp("dicom_phantom")
    write_series(root / "series", planes, positions, orientation, spacing, slope=slope, intercept=intercept)
    nifti = root / "phantom.nii"  # uncompressed: faster to write
    # the same stored values, scaled by the NIfTI header the way the DICOM header scales them
    img = nib.Nifti1Image(stored, affine)
    img.header.set_slope_inter(slope, intercept)
    nib.save(img, nifti)
    return root / "series", nifti, rot


def test_oblique_series_matches_nifti_and_the_true_surface(oblique_phantom):
    from mriface.surface import extract_head_surface

    from phantoms import HeadPhantom

    folder, nifti, rot = oblique_phantom
    dcm = load_volume(folder)
    ref = load_volume(nifti)
    assert dcm.shape == ref.shape
    np.testing.assert_allclose(dcm.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(dcm.data, ref.data, atol=1e-5)
    assert dcm.modality == "mr" and dcm.path == folder
    np.testing.assert_allclose(sorted(dcm.zooms), [1.0, 1.0, 2.0], atol=1e-6)
    # the surface from the DICOM series lies on the analytic (rotated) head
    surf = extract_head_surface(dcm, device="cpu")
    idx = np.random.default_rng(0).permutation(surf.n_verts)[:20_000]
    d = HeadPhantom(rotation=rot).distance(surf.verts[idx].astype(np.float64))
    assert d.mean() < 0.25, d.mean()
    assert np.percentile(d, 99) < 0.5, np.percentile(d, 99)


def test_a_dicom_folder_is_a_valid_manifest_row(tmp_path):
    folder = tmp_path / "P1_dicom"
    _ct_ball(folder, n=4, z0=-3.0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a scan")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"subject,scan\nP1,{folder}\nP2,empty\n")
    gallery, _, problems = read_manifest(manifest)
    assert [s.subject for s in gallery] == ["P1"] and gallery[0].path == folder.resolve()
    assert load_scan(gallery[0].path).modality == "ct"  # what the study reads a row with
    assert len(problems) == 1 and problems[0].subject == "P2"
    assert "DICOM" in problems[0].message
    assert is_dicom_folder(folder) and not is_dicom_folder(tmp_path / "empty")


def test_folder_digest_changes_with_any_file(tmp_path):
    planes, positions = ball_series(8, 8, 3, spacing=(1, 1), orientation=(1, 0, 0, 0, 1, 0), origin=(0, 0, 0),
                                    step=(0, 0, 1), centre=np.zeros(3), radius=3, inside=100, outside=0)
    paths = write_series(tmp_path / "s", planes, positions, (1, 0, 0, 0, 1, 0), (1, 1))
    before = folder_digest(tmp_path / "s")
    assert folder_digest(tmp_path / "s") == before
    data = bytearray(paths[1].read_bytes())
    data[-1] ^= 1
    paths[1].write_bytes(bytes(data))
    assert folder_digest(tmp_path / "s") != before


# --------------------------------------------------------------------------- CT, tilt, series choice
def _ct_ball(folder, *, tilt_deg=0.0, number=2, description="Head CT", n=30, seed=0, z0=-30.0):
    """A water ball (0 HU) in air (-1000 HU) at a known LPS centre, on a (possibly tilted) CT gantry."""
    t = np.deg2rad(tilt_deg)
    orientation = (1.0, 0.0, 0.0, 0.0, np.cos(t), np.sin(t))  # image plane tilted about the x axis
    spacing = (0.8, 0.7)  # between rows, between columns: unequal, so a swap shows
    rows, cols = 44, 52
    origin = (-18.0, -16.0, z0)
    step = (0.0, 0.0, 2.0)  # the table moves along z whatever the tilt
    centre = np.array([2.0, 3.0, 0.0])
    planes, positions = ball_series(rows, cols, n, spacing=spacing, orientation=orientation, origin=origin,
                                    step=step, centre=centre, radius=12.0, inside=1024, outside=24)
    paths = write_series(folder, planes, positions, orientation, spacing, slope=1.0, intercept=-1024.0,
                         modality="CT", number=number, description=description, seed=seed)
    return paths, centre


def test_ct_series_arrives_in_hounsfield_units(tmp_path):
    _ct_ball(tmp_path / "ct")
    vol = load_volume(tmp_path / "ct")
    assert vol.modality == "ct"
    assert vol.data.min() == pytest.approx(-1000.0) and vol.data.max() == pytest.approx(0.0)
    centre, count = _world_centroid(vol, -500.0)
    ras_centre = np.array([-2.0, -3.0, 0.0])  # LPS (2, 3, 0)
    np.testing.assert_allclose(centre, ras_centre, atol=0.3)
    # the ball's volume: 4/3 pi r^3, in voxels of 0.7 x 0.8 x 2 mm
    assert count * 0.7 * 0.8 * 2.0 == pytest.approx(4 / 3 * np.pi * 12.0 ** 3, rel=0.05)


def test_gantry_tilt_gives_a_sheared_affine_with_true_positions(tmp_path):
    _ct_ball(tmp_path / "tilt", tilt_deg=20.0)
    vol = load_volume(tmp_path / "tilt")
    lin = vol.affine[:3, :3]
    cos = [abs(lin[:, a] @ lin[:, b]) / np.linalg.norm(lin[:, a]) / np.linalg.norm(lin[:, b])
           for a, b in ((0, 1), (0, 2), (1, 2))]
    assert max(cos) == pytest.approx(np.sin(np.deg2rad(20.0)), abs=1e-3)  # sheared by the tilt
    centre, count = _world_centroid(vol, -500.0)
    np.testing.assert_allclose(centre, [-2.0, -3.0, 0.0], atol=0.3)
    # a tilted slab of voxels has the same volume as an upright one: |det| carries the shear
    assert count * abs(np.linalg.det(lin)) == pytest.approx(4 / 3 * np.pi * 12.0 ** 3, rel=0.05)
    # every voxel inside the ball maps to a world point inside it (no unsheared stacking)
    idx = np.argwhere(vol.data > -500.0)
    world = idx @ lin.T + vol.affine[:3, 3]
    assert np.linalg.norm(world - [-2.0, -3.0, 0.0], axis=1).max() < 12.0 + 1.5


def test_two_series_in_one_folder_reads_the_largest_and_says_so(tmp_path, caplog):
    _ct_ball(tmp_path / "study" / "big", number=2, description="Head CT")
    _ct_ball(tmp_path / "study" / "small", number=7, description="thick", n=6, seed=1, z0=-5.0)
    # a scout: one 2D slice in another orientation, and a file that is not DICOM at all
    planes, positions = ball_series(16, 16, 1, spacing=(2, 2), orientation=(1, 0, 0, 0, 0, -1),
                                    origin=(-16, 0, 16), step=(0, 1, 0), centre=np.zeros(3), radius=8,
                                    inside=1000, outside=0)
    write_series(tmp_path / "study", planes, positions, (1, 0, 0, 0, 0, -1), (2, 2), number=1,
                 description="scout")
    (tmp_path / "study" / "README.txt").write_text("exported by a PACS")
    found, skipped, damaged = find_series(tmp_path / "study")
    assert damaged == []
    assert [s.number for s in found] == [2, 7]
    assert any("single 2D" in line for line in skipped)
    with caplog.at_level(logging.WARNING, logger="mriface.dicom"):
        vol = load_volume(tmp_path / "study")
    assert vol.shape[2] == 30 or 30 in vol.shape
    text = caplog.text
    assert "series 2 'Head CT'" in text and "series 7 'thick'" in text and "series=" in text
    other = load_volume(tmp_path / "study", series=7)
    assert 6 in other.shape and other.modality == "ct"
    with pytest.raises(VolumeError, match="matches 0"):
        load_volume(tmp_path / "study", series="no such series")


# --------------------------------------------------------------------------- damaged series
def test_a_damaged_file_stops_only_its_own_series(tmp_path):
    _ct_ball(tmp_path / "study" / "big", number=2)
    small, _ = _ct_ball(tmp_path / "study" / "small", number=7, n=6, seed=1, z0=-5.0)
    ds = pydicom.dcmread(small[2])
    del ds.PixelData  # an image file cut before its pixels, header intact
    ds.save_as(small[2], enforce_file_format=True)
    assert load_volume(tmp_path / "study").shape[2] == 30  # series 2 is whole
    with pytest.raises(InputFileError, match="without pixel data") as info:
        load_volume(tmp_path / "study", series=7)
    assert str(small[2]) in str(info.value)


def test_a_missing_slice_is_an_error_naming_folder_and_gap(tmp_path):
    paths, _ = _ct_ball(tmp_path / "gap")
    paths[11].unlink()  # slice 12 of 30, 2 mm apart
    with pytest.raises(VolumeError) as info:
        load_volume(tmp_path / "gap")
    msg = str(info.value)
    assert str(tmp_path / "gap") in msg
    assert "4 mm" in msg and "2 mm apart" in msg and "missing" in msg
    assert paths[10].name in msg and paths[12].name in msg


@pytest.mark.parametrize("cut", ["pixels", "header"])
def test_a_truncated_file_is_an_error_naming_it(tmp_path, cut):
    paths, _ = _ct_ball(tmp_path / "trunc")
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[:-500] if cut == "pixels" else data[:300])
    with pytest.raises(InputFileError) as info:
        load_volume(tmp_path / "trunc")
    assert str(paths[5]) in str(info.value)
    assert "truncated" in str(info.value)


def test_a_series_of_several_volumes_is_not_read_as_one(tmp_path):
    # a time series: every slice position twice (two volumes in one series)
    planes, positions = ball_series(16, 16, 4, spacing=(2, 2), orientation=(1, 0, 0, 0, 1, 0), origin=(0, 0, 0),
                                    step=(0, 0, 2), centre=np.array([16.0, 16.0, 3.0]), radius=8,
                                    inside=1000, outside=0)
    write_series(tmp_path / "fmri", np.concatenate([planes, planes]), np.concatenate([positions, positions]),
                 (1, 0, 0, 0, 1, 0), (2, 2))
    with pytest.raises(VolumeError, match="same slice position|several volumes") as info:
        load_volume(tmp_path / "fmri")
    assert str(tmp_path / "fmri") in str(info.value)


def test_one_2d_file_asks_for_its_folder(tmp_path):
    paths, _ = _ct_ball(tmp_path / "ct", n=3)
    with pytest.raises(VolumeError, match="give the folder"):
        load_volume(paths[0])


def test_memory_guard_refuses_a_series_before_reading_pixels(tmp_path, monkeypatch):
    import mriface.dicom as dicom_module

    _ct_ball(tmp_path / "ct")

    def no_pixels(path):
        raise AssertionError("pixels read before the size check")

    monkeypatch.setattr(dicom_module, "_read_pixels", no_pixels)
    monkeypatch.setenv("MRIFACE_MAX_VOLUME_MB", "0.1")  # 52 x 44 x 30 float32 = 0.26 MiB
    with pytest.raises(VolumeError) as info:
        load_volume(tmp_path / "ct")
    msg = str(info.value)
    assert str(tmp_path / "ct") in msg and "MRIFACE_MAX_VOLUME_MB" in msg and "52x44x30" in msg


def test_a_folder_without_dicom_files_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputFileError, match="without DICOM files"):
        load_volume(tmp_path)


# --------------------------------------------------------------------------- multi-frame
def test_single_file_multiframe_matches_the_folder(tmp_path):
    paths, _ = _ct_ball(tmp_path / "frames", n=12)
    slices = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    first = slices[0]
    ds = _base(ENHANCED_MR_STORAGE, generate_uid(), 9, "enhanced", "CT", first.Rows, first.Columns)
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    orient, meas, scale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = first.ImageOrientationPatient
    meas.PixelSpacing = first.PixelSpacing
    meas.SliceThickness = "2"
    scale.RescaleSlope, scale.RescaleIntercept, scale.RescaleType = "1", "-1024", "HU"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([meas])
    shared.PixelValueTransformationSequence = Sequence([scale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for s in slices[::-1]:  # frames stored top to bottom: the reader sorts by position
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = s.ImagePositionPatient
        item.PlanePositionSequence = Sequence([plane])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = b"".join(s.PixelData for s in slices[::-1])
    single = tmp_path / "enhanced.dcm"
    ds.save_as(single, enforce_file_format=True)
    a, b = load_volume(single), load_volume(tmp_path / "frames")
    assert a.modality == b.modality == "ct"
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    np.testing.assert_array_equal(a.data, b.data)

