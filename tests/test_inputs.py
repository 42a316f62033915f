"""Study inputs: manifests, BIDS discovery, photograph folders and CSVs, and their problems."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mriface.errors import ManifestError, MRIFaceError
from mriface.inputs import discover_bids, is_bids, load_inputs, read_manifest, read_photos


def _touch(path: Path, data: bytes = b"scan") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)
    return path


def test_manifest_resolves_relative_paths_against_its_folder(tmp_path, monkeypatch):
    _touch(tmp_path / "scans" / "a.nii.gz")
    _touch(tmp_path / "scans" / "b.nii.gz")
    _touch(tmp_path / "defaced" / "a.nii.gz")
    m = tmp_path / "m.csv"
    m.write_text("Subject_ID,Scan,probe_scan\nA,scans/a.nii.gz,defaced/a.nii.gz\n"
                 f"B,{tmp_path / 'scans' / 'b.nii.gz'},\n")
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    gallery, probes, problems = read_manifest(m)
    assert [s.subject for s in gallery] == ["A", "B"]
    assert gallery[0].path == (tmp_path / "scans" / "a.nii.gz").resolve()
    assert [(p.subject, p.path.name, p.path.parent.name) for p in probes] == [("A", "a.nii.gz", "defaced")]
    assert problems == []


def test_manifest_rows_with_missing_files_and_duplicates_become_problems(tmp_path):
    _touch(tmp_path / "a.nii")
    _touch(tmp_path / "b.nii")
    m = tmp_path / "cohort.csv"
    m.write_text("subject,scan\nA,a.nii\nB,missing.nii\nA,b.nii\n,\nC,\n")
    gallery, _, problems = read_manifest(m)
    assert [s.subject for s in gallery] == ["A"]
    kinds = {p.kind: p for p in problems}
    assert set(kinds) == {"missing_scan", "duplicate_subject", "empty_row"}
    # each problem names the row and the file and says what to do, on one line
    assert "cohort.csv line 3" in kinds["missing_scan"].where
    assert "missing.nii" in kinds["missing_scan"].message and "fix the path" in kinds["missing_scan"].message
    assert "line 4" in kinds["duplicate_subject"].where and "line 2" in kinds["duplicate_subject"].message
    assert all("\n" not in str(p) for p in problems)


@pytest.mark.parametrize("text, match", [
    ("", "empty file"),
    ("name,file\nA,a.nii\n", "lacks a subject column"),
])
def test_unusable_manifests_raise_one_clear_error(tmp_path, text, match):
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(ManifestError, match=match):
        read_manifest(m)


def test_missing_manifest_and_all_rows_bad(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_inputs(tmp_path / "nope.csv")
    m = tmp_path / "m.csv"
    m.write_text("subject,scan\nA,gone.nii\n")
    with pytest.raises(ManifestError, match="no usable scan.*gone.nii"):
        load_inputs(m)


def test_bids_discovery_sessions_suffixes_and_subjects_without_scans(tmp_path):
    root = tmp_path / "bids"
    _touch(root / "dataset_description.json", b"{}")
    _touch(root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz")
    _touch(root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T1w.nii.gz")
    _touch(root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_T2w.nii.gz")  # not a suffix we take
    _touch(root / "sub-02" / "anat" / "sub-02_FLAIR.nii")
    _touch(root / "sub-03" / "anat" / "sub-03_T2w.nii.gz")
    assert is_bids(root) and not is_bids(tmp_path / "nothing")
    gallery, probes, problems = discover_bids(root)
    assert [(s.subject, s.session, s.path.name) for s in gallery] == [
        ("sub-01", "ses-1", "sub-01_ses-1_T1w.nii.gz"), ("sub-02", None, "sub-02_FLAIR.nii")]
    assert [(s.subject, s.session) for s in probes] == [("sub-01", "ses-2")]
    assert [(p.kind, p.subject) for p in problems] == [("missing_scan", "sub-03")]
    # FLAIR first when asked
    _touch(root / "sub-02" / "anat" / "sub-02_T1w.nii")
    g2, _, _ = discover_bids(root, suffixes=("FLAIR", "T1w"))
    assert g2[1].path.name == "sub-02_FLAIR.nii"
    g3, _, _ = discover_bids(root)
    assert g3[1].path.name == "sub-02_T1w.nii"


def test_photo_folders_report_unknown_empty_and_unreadable(tmp_path):
    photos = tmp_path / "photos"
    _png(photos / "A" / "1.jpg")
    _png(photos / "A" / "2.png")
    (photos / "A" / "notes.txt").write_text("not a photo")  # not an image suffix: reported as skipped
    _png(photos / "01" / "x.png")  # BIDS participant "sub-01" under its bare label
    _png(photos / "stranger" / "s.jpg")
    (photos / "B").mkdir()
    _touch(photos / "C" / "broken.jpg", b"\xff\xd8\xff not really a jpeg")
    _png(photos / "C" / "ok.png")
    got, problems = read_photos(photos, ["A", "B", "C", "sub-01"])
    assert {k: [p.name for p in v] for k, v in got.items()} == {
        "A": ["1.jpg", "2.png"], "sub-01": ["x.png"], "C": ["ok.png"]}
    by_kind = {p.kind: p for p in problems}
    assert set(by_kind) == {"unknown_participant", "empty_photo_folder", "unreadable_photo", "skipped_file"}
    assert by_kind["skipped_file"].where.endswith("notes.txt")  # issue 13 item 12: never dropped silently
    assert "stranger" in by_kind["unknown_participant"].message
    assert by_kind["empty_photo_folder"].subject == "B"
    assert "broken.jpg" in by_kind["unreadable_photo"].message


def test_truncated_photograph_is_unreadable(tmp_path):
    good = _png(tmp_path / "full.png")
    data = good.read_bytes()
    _touch(tmp_path / "p" / "A" / "cut.png", data[: len(data) // 2])
    got, problems = read_photos(tmp_path / "p", ["A"])
    assert got == {} and [p.kind for p in problems] == ["unreadable_photo"]


def test_photo_csv(tmp_path):
    _png(tmp_path / "img" / "a.png")
    csv = tmp_path / "photos.csv"
    csv.write_text("participant,photo\nA,img/a.png\nA,img/gone.png\nZ,img/a.png\n")
    got, problems = read_photos(csv, ["A"])
    assert [p.name for p in got["A"]] == ["a.png"]
    assert sorted(p.kind for p in problems) == ["missing_photo", "unknown_participant"]
    assert any("photos.csv line 3" == p.where for p in problems)


def test_loose_photographs_without_participant_folders_raise(tmp_path):
    _png(tmp_path / "p" / "a.jpg")
    with pytest.raises(ManifestError, match="folder named after the participant"):
        read_photos(tmp_path / "p", ["A"])


def test_load_inputs_combines_and_probe_manifest_replaces_probes(tmp_path):
    _touch(tmp_path / "a.nii")
    _touch(tmp_path / "b.nii")
    _touch(tmp_path / "a_defaced.nii")
    m = tmp_path / "m.csv"
    m.write_text("subject,scan\nA,a.nii\nB,b.nii\n")
    pm = tmp_path / "probes.csv"
    pm.write_text("subject,scan\nA,a_defaced.nii\nQ,a_defaced.nii\n")
    _png(tmp_path / "photos" / "A" / "1.png")
    inputs = load_inputs(m, photos=tmp_path / "photos", probe_manifest=pm)
    assert inputs.subjects == ["A", "B"]
    assert [(s.subject, s.path.name) for s in inputs.probe_scans] == [("A", "a_defaced.nii")]
    assert [p.kind for p in inputs.problems] == ["unknown_participant"]
    assert list(inputs.photos) == ["A"]
    assert isinstance(ManifestError("x"), MRIFaceError)


def test_load_scan_reads_a_volume_or_a_mesh_file(tmp_path):
    """A manifest row's file: NIfTI -> Volume; OBJ/PLY/FreeSurfer/.npz -> HeadSurface with a face frame."""
    import nibabel as nib
    import numpy as np

    from mriface.errors import InputFileError
    from mriface.inputs import load_scan
    from mriface.render._synthetic import synthetic_head
    from mriface.surface import HeadSurface, save_surface, save_surface_npz
    from mriface.volume import Volume

    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(4, 5, 6), np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert isinstance(load_scan(tmp_path / "v.nii.gz"), Volume)
    head = synthetic_head(24, 32)
    save_surface(head, tmp_path / "h.ply")
    nib.freesurfer.write_geometry(str(tmp_path / "lh.seghead"), head.verts.astype(np.float64), head.faces)
    save_surface_npz(head, tmp_path / "h.npz")
    for name in ("h.ply", "lh.seghead", "h.npz"):
        s = load_scan(tmp_path / name)
        assert isinstance(s, HeadSurface) and s.n_faces == head.n_faces, name
        assert float(np.dot(s.frame.forward, head.frame.forward)) > 0.95, name
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputFileError, match="bad.npz: not a surface .npz written by mriface"):
        load_scan(tmp_path / "bad.npz")
