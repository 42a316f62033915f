"""mriface.deface: methods on the analytic phantom, brain protection, bad inputs, files and the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mriface.deface import (
    AlreadyDefacedError,
    DefaceError,
    RegistrationError,
    UnsupportedScanError,
    available_methods,
    deface,
    get_method,
    load_template,
    prepare,
    register_method,
    run_method,
)
from mriface.deface.io import deface_batch, deface_file, defaced_name
from mriface.volume import Volume, load_volume
from tests.phantoms import head_phantom, voxel_of

METHODS = ["mask", "plane", "blur", "reface"]


@pytest.fixture(scope="module")
def phantom():
    vol, ph = head_phantom((2.0, 2.0, 2.0), seed=0)
    return vol


@pytest.fixture(scope="module")
def context(phantom):
    return prepare(phantom)


def test_registry_lists_builtins_and_names_choices_when_unknown():
    assert set(METHODS) <= set(available_methods())
    with pytest.raises(DefaceError, match="unknown defacing method 'nope'.*mask"):
        get_method("nope")
    with pytest.raises(DefaceError, match="registered already"):
        register_method("mask", lambda v, c: v.data)


def test_template_brain_mask_is_a_brain_clear_of_the_scalp():
    from scipy import ndimage as ndi

    from mriface.deface._register import head_mask

    tpl = load_template()
    litres = tpl.brain.sum() * np.prod(tpl.head.zooms) / 1e6
    assert 1.0 < litres < 1.7, litres
    # the pinned MNI -> template transform puts the brain >= 6 mm inside the head surface
    inner = ndi.binary_erosion(head_mask(tpl.head), iterations=6)
    assert (tpl.brain & ~inner).sum() < 1e-3 * tpl.brain.sum()
    assert not (tpl.face & tpl.brain).any()


def test_registration_lands_face_and_brain_on_the_phantom(phantom, context):
    assert context.registration.overlap > 0.9
    assert context.face[voxel_of(phantom, [0, 100, -18])]  # nose tip
    assert context.face[voxel_of(phantom, [0, 80, -80])]  # chin
    assert context.brain[voxel_of(phantom, [0, -10, 30])]  # middle of the head
    assert not (context.face & context.brain).any()


@pytest.mark.parametrize("method", METHODS)
def test_method_changes_face_and_keeps_brain_byte_identical(phantom, context, method):
    before = phantom.data.copy()
    r = run_method(method, phantom, context=context)
    assert np.array_equal(phantom.data, before)  # input untouched
    nose, chin = voxel_of(phantom, [0, 100, -18]), voxel_of(phantom, [0, 80, -80])
    assert abs(r.volume.data[nose] - before[nose]) > 0.3
    assert abs(r.volume.data[chin] - before[chin]) > 0.2
    brain = r.brain_mask
    assert brain.sum() > 50_000
    assert r.volume.data[brain].tobytes() == before[brain].tobytes()
    assert r.changed_in_brain == 0
    assert r.changed_outside_brain == int((r.volume.data != before).sum()) > 1000
    assert r.face_mask[nose]
    # the back of the head is not the face
    assert r.volume.data[voxel_of(phantom, [0, -90, 0])] == before[voxel_of(phantom, [0, -90, 0])]
    s = r.summary()
    assert s["voxels_changed_inside_brain_mask"] == 0 and s["method"] == method
    json.dumps(s)


def test_user_method_plugs_in_and_cannot_touch_the_brain(phantom, context):
    def scribble(volume, ctx, *, value=5.0):
        return np.full(volume.shape, value, np.float32)  # tries to change every voxel

    m = register_method("test-scribble", scribble, description="writes everywhere", replace=True)
    r = deface(phantom, method="test-scribble", context=context, value=7.0)
    assert m.name in available_methods()
    assert r.blocked_in_brain == int(r.brain_mask.sum()) > 0
    assert r.changed_in_brain == 0
    assert np.all(r.volume.data[~r.brain_mask] == 7.0)


def test_ct_is_refused_naming_the_input(phantom):
    ct = Volume(phantom.data * 1000 - 1000, phantom.affine, modality="ct", path=None)
    with pytest.raises(UnsupportedScanError, match="in-memory volume.*CT"):
        prepare(ct)


def test_already_defaced_scan_is_refused(phantom, context):
    defaced = run_method("mask", phantom, context=context).volume
    with pytest.raises(AlreadyDefacedError, match="defaced already"):
        prepare(defaced)


def test_failed_registration_is_refused():
    rng = np.random.default_rng(0)
    data = np.zeros((60, 60, 60), np.float32)
    data[10:50, 25:35, 5:55] = 1.0  # a slab: nothing like a head
    data += rng.normal(0, 0.02, data.shape).astype(np.float32)
    vol = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]), "mr")
    with pytest.raises(RegistrationError, match="did not register"):
        prepare(vol)


def _write_scan(vol: Volume, path, *, flip_x=True, slope=0.5, inter=10.0):
    """Save ``vol`` as int16 with scaling in LAS orientation: what write_defaced must preserve."""
    data = vol.data
    aff = vol.affine.copy()
    if flip_x:
        data = data[::-1]
        aff = aff @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    raw = np.round((data * 1000 - inter) / slope).astype(np.int16)
    img = nib.Nifti1Image(raw, aff)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def test_deface_file_keeps_header_and_unchanged_voxels_and_refuses_overwrite(phantom, context, tmp_path):
    src = _write_scan(phantom, tmp_path / "sub-01_T1w.nii.gz")
    dest = tmp_path / "out" / defaced_name(src)
    assert dest.name == "sub-01_T1w_defaced.nii.gz"
    # the file holds the phantom's grid (flipped on disk): the phantom's registration fits it
    assert np.allclose(load_volume(src).affine, phantom.affine)
    info = deface_file(src, dest, method="mask", context=context)
    a, b = nib.load(str(src)), nib.load(str(dest))
    assert b.get_data_dtype() == np.int16 and np.allclose(a.affine, b.affine)
    assert b.dataobj.slope == a.dataobj.slope and b.dataobj.inter == a.dataobj.inter
    ra, rb = np.asarray(a.dataobj.get_unscaled()), np.asarray(b.dataobj.get_unscaled())
    changed = ra != rb
    assert changed.sum() == info["voxels_changed_outside_brain_mask"] > 1000
    assert info["voxels_changed_inside_brain_mask"] == 0
    side = json.loads((dest.parent / "sub-01_T1w_defaced.json").read_text())
    assert side["method"] == "mask" and side["InputSHA256"] and side["TemplateFiles"]
    assert side["Sources"] == [src.name]  # sidecars travel with shared data: no absolute path
    # the brain-protection mask, on the file's grid, is bit-for-bit the input
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    brain = apply_orientation(context.brain, ornt_transform(axcodes2ornt("RAS"), io_orientation(a.affine))) > 0
    assert brain.sum() > 50_000
    assert ra[brain].tobytes() == rb[brain].tobytes()
    with pytest.raises(DefaceError, match="exists already"):
        deface_file(src, dest, method="mask", context=context)
    with pytest.raises(DefaceError, match="never overwrites the input"):
        deface_file(src, src, method="mask", overwrite=True, context=context)
    plain = deface_file(src, tmp_path / "plain.nii", method="mask", context=context)
    assert nib.load(str(tmp_path / "plain.nii")).shape == a.shape and plain["OutputSHA256"]
    with pytest.raises(DefaceError, match="must be a NIfTI"):
        deface_file(src, tmp_path / "x.mgz", method="mask", context=context)
    before = dest.stat().st_mtime_ns
    deface_file(src, dest, method="plane", overwrite=True, context=context)
    assert dest.stat().st_mtime_ns != before


def test_cli_bids_folder_records_problems_and_goes_on(phantom, tmp_path, capsys):
    from mriface.cli import main

    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "sub-02" / "anat").mkdir(parents=True)
    _write_scan(phantom, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    ct = Volume(phantom.data * 1000 - 1000, phantom.affine, "ct")
    nib.save(nib.Nifti1Image(ct.data.astype(np.int16), ct.affine), str(bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz"))
    out = tmp_path / "defaced"
    assert main(["deface", str(bids), str(out), "--method", "mask"]) == 0
    assert (out / "sub-01" / "anat" / "sub-01_T1w_defaced.nii.gz").is_file()
    assert (out / "sub-01" / "anat" / "sub-01_T1w_defaced.json").is_file()
    assert not (out / "sub-02" / "anat" / "sub-02_T1w_defaced.nii.gz").exists()
    summary = json.loads((out / "deface.json").read_text())
    assert len(summary["written"]) == 1
    assert summary["problems"][0]["kind"] == "UnsupportedScanError"
    assert "sub-02_T1w.nii.gz" in capsys.readouterr().err
    # one scan: an existing output is refused with exit status 2 and one line naming it
    one = out / "sub-01" / "anat" / "sub-01_T1w_defaced.nii.gz"
    assert main(["deface", str(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"), str(one)]) == 2
    assert "exists already" in capsys.readouterr().err


def test_batch_over_a_manifest_records_missing_scans(phantom, context, tmp_path):
    _write_scan(phantom, tmp_path / "a.nii.gz")
    (tmp_path / "m.csv").write_text("subject,scan\ns1,a.nii.gz\ns2,missing.nii.gz\n")
    res = deface_batch(tmp_path / "m.csv", tmp_path / "out", method="blur", context=context)
    assert [d for _, d in res.written] == [tmp_path / "out" / "s1" / "a_defaced.nii.gz"]
    assert (tmp_path / "out" / "s1" / "a_defaced.json").is_file()
    assert [p.kind for p in res.problems] == ["missing_scan"]
    assert json.loads((tmp_path / "out" / "deface.json").read_text())["problems"][0]["kind"] == "missing_scan"


@pytest.mark.slow
def test_sample_average_head_keeps_the_brain(sample_path):
    # the 2 mm average head: the four methods on a real-looking head, quickly
    vol = load_volume(sample_path("voxface"))
    ctx = prepare(vol)
    for method in METHODS:
        r = run_method(method, vol, context=ctx)
        assert r.changed_in_brain == 0 and r.changed_outside_brain > 0
        assert np.array_equal(r.volume.data[r.brain_mask], vol.data[r.brain_mask])
