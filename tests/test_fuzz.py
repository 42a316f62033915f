"""Issue 13 item 11: no single bad item stops a study (the fuzz test).

A cohort is generated in which every broken item is broken in a different
way: 40+ kinds across manifest rows, scan files, the stages' own failures,
photographs and cache entries (damaged after a first run). The study runs
through the command line's ``main`` and must finish with exit status 0 and
exactly one problem line per broken item, while every intact participant
is still ranked first.

The stages are the cheap fakes of ``tests/test_study.py`` (text-file scans,
grey photographs), except that scan files other than ``.txt`` go through
mriface's real readers (:func:`mriface.scans.load_scan`: NIfTI, MGH, meshes,
surfaces, DICOM folders), and photographs through the real reading check.
"""

from __future__ import annotations

import csv
import errno
import functools
import gzip
import os
import pickle
import struct
import zlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_study import FakePipeline, _photo

import mriface.study as study
import mriface.study.cache as cache
from mriface.errors import SurfaceError, VolumeError
from mriface.surface import HeadSurface
from mriface.volume import Volume


@pytest.fixture(autouse=True)
def _stable_code_digest(monkeypatch):
    monkeypatch.setattr(cache, "code_digest", lambda *modules: "code:" + ",".join(modules))


class FuzzPipeline(FakePipeline):
    """FakePipeline with mriface's real scan readers and a few stage failures keyed by subject/identity."""

    def load(self, path):
        path = Path(path)
        if path.suffix == ".txt":
            return super().load(path)
        obj = study.Pipeline.load(self, path)  # the real readers: NIfTI, MGH, meshes, DICOM, .npz
        if isinstance(obj, HeadSurface):
            raise SurfaceError(f"{path}: a mesh, not used by the fake stages (test)")
        assert isinstance(obj, Volume)
        data = np.asarray(obj.data, float)
        if not np.isfinite(data).all():
            raise VolumeError(f"{path}: voxels that are not finite (test)")
        if data.max() <= 0:
            raise VolumeError(f"{path}: an empty volume, no head (test)")
        return str(int(round(data.max())))

    def surface(self, volume):
        if volume.endswith("oom"):
            raise MemoryError("cannot allocate (test)")
        return super().surface(volume.split()[0] + (" defaced" if "defaced" in volume else ""))

    def render(self, surface, subject, protocol):
        if subject == "X-render-bug":
            raise KeyError("a bug in a renderer (test)")
        return super().render(surface, subject, protocol)

    def embed(self, crops):
        if any(int(round(float(c[0, 0, 0]) * 1000)) == 77 for c in crops):
            raise RuntimeError("CUDA error: an illegal memory access (test)")
        return super().embed(crops)

    def align(self, images):
        if not hasattr(images, "shape") and any(Path(p).name.startswith("bug") for p in images):
            raise ValueError("operands could not be broadcast together (test)")
        return super().align(images)


# --------------------------------------------------------------------------- file makers
def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _png_with_size(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb when huge)."""
    _photo(path, 5)
    raw = bytearray(path.read_bytes())
    ihdr = bytearray(raw[16:29])
    ihdr[0:8] = struct.pack(">II", w, h)
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))


def _npz(path: Path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _pickled_npz(path: Path) -> None:
    arrays = dict(np.load(path))
    arrays["embeddings"] = np.array([{"x": 1}], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


GOOD = 10  # intact participants S1..S10 (ids 1..10; S8 a real NIfTI): each ranked first at the end


def _build(root: Path):
    """Manifest, photographs and the expected problems: {(kind, item): 1} (item = subject or file name)."""
    scans, photos = root / "scans", root / "photos"
    scans.mkdir(parents=True)
    rows: list[list[str]] = []
    expected: Counter = Counter()

    def row(subject, scan, kind, item=None, probe=""):
        rows.append([subject, scan, probe])
        if kind:
            expected[(kind, item if item is not None else subject)] += 1

    # intact participants: text scans, photos; S8's scan is a real NIfTI (value 8)
    for i in range(1, GOOD + 1):
        if i == 8:
            v = np.zeros((6, 6, 6), np.float32)
            v[2:4, 2:4, 2:4] = 8
            _nifti(scans / "s8.nii.gz", v)
            row("S8", "scans/s8.nii.gz", None)
            continue
        (scans / f"s{i}.txt").write_text(str(i))
        row(f"S{i}", f"scans/s{i}.txt", None)

    # ---- manifest rows (read_manifest)
    row("M-missing", "scans/nowhere.nii.gz", "missing_scan")
    rows.append(["", "scans/s1.txt", ""])  # no subject: its problem has no subject either
    expected[("empty_row", None)] += 1
    row("M-noscan", "", "empty_row")
    row("S1", "scans/s2.txt", "duplicate_subject", "S1")
    (scans / "emptydir").mkdir()
    row("M-emptydir", "scans/emptydir", "missing_scan")
    (scans / "dangling.nii").symlink_to(scans / "gone.nii")
    row("M-dangling", "scans/dangling.nii", "missing_scan")
    (scans / "loop1.nii").symlink_to(scans / "loop2.nii")
    (scans / "loop2.nii").symlink_to(scans / "loop1.nii")
    row("M-loop", "scans/loop1.nii", "missing_scan")
    row("M-toolong", "scans/" + "x" * 300 + ".nii", "unreadable_scan")
    (scans / "locked.nii").write_bytes(b"x")  # Path.is_file raises PermissionError for it (monkeypatched)
    row("M-denied", "scans/locked.nii", "unreadable_scan")
    (scans / "s20.txt").write_text("20")
    photos_for = {"M-probe": 20}
    row("M-probe", "scans/s20.txt", "missing_probe_scan", probe="scans/no-probe.nii")

    # ---- scan files (the real readers) and the stages' own failures
    (scans / "empty.nii").write_bytes(b"")
    row("X-empty-file", "scans/empty.nii", "scan_failed")
    (scans / "random.nii").write_bytes(np.random.default_rng(0).bytes(2000))
    row("X-random-bytes", "scans/random.nii", "scan_failed")
    good = (scans / "s8.nii.gz").read_bytes()
    (scans / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    row("X-truncated-gz", "scans/trunc.nii.gz", "scan_failed")
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.uint8)
    (scans / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\1" * 64)
    row("X-30000-cubed", "scans/huge.nii", "scan_failed")
    _nifti(scans / "flat.nii", np.ones((8, 8), np.float32))
    row("X-2d", "scans/flat.nii", "scan_failed")
    _nifti(scans / "zeros.nii", np.zeros((5, 5, 5), np.float32))
    row("X-all-zero", "scans/zeros.nii", "scan_failed")
    _nifti(scans / "nan.nii", np.full((5, 5, 5), np.nan, np.float32))
    row("X-nan", "scans/nan.nii", "scan_failed")
    (scans / "junk.mgz").write_bytes(gzip.compress(b"not an mgh header"))
    row("X-mgz-junk", "scans/junk.mgz", "scan_failed")
    (scans / "junk.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nend_header\n1 2\n")
    row("X-ply-junk", "scans/junk.ply", "scan_failed")
    (scans / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    row("X-npz-junk", "scans/junk.npz", "scan_failed")
    (scans / "table.csv").write_text("a,b\n1,2\n")
    row("X-csv-as-scan", "scans/table.csv", "scan_failed")
    (scans / "bad.txt").write_text("bad")
    row("X-volume-error", "scans/bad.txt", "scan_failed")
    (scans / "oom.txt").write_text("30 oom")
    row("X-memory-error", "scans/oom.txt", "scan_failed")
    (scans / "s11.txt").write_text("11")
    row("X-render-bug", "scans/s11.txt", "scan_failed")
    (scans / "s77.txt").write_text("77")
    row("X-embed-cuda", "scans/s77.txt", "scan_failed")
    (scans / "defaced.txt").write_text("12 defaced")
    row("X-defaced", "scans/defaced.txt", "no_face_in_renders")
    dcm = scans / "dicom-not"
    dcm.mkdir()
    (dcm / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00junk")
    row("X-dicom-junk", "scans/dicom-not", "scan_failed")

    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "scan", "probe_scan"])
        w.writerows(rows)

    # ---- photographs: intact ones, then one broken item each
    for i in range(1, GOOD + 1):
        _photo(photos / f"S{i}" / "a.png", i)
    _photo(photos / "M-probe" / "a.png", photos_for["M-probe"])
    (photos / "S1" / "empty.jpg").write_bytes(b"")
    expected[("unreadable_photo", "empty.jpg")] += 1
    jpg = photos / "S1" / "trunc.jpg"
    Image.fromarray(np.full((64, 64, 3), 1, np.uint8)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:200])
    expected[("unreadable_photo", "trunc.jpg")] += 1
    _png_with_size(photos / "S2" / "bomb.png", 100_000, 100_000)
    expected[("unreadable_photo", "bomb.png")] += 1
    (photos / "S2" / "anim.gif").write_bytes(b"GIF89a\x01\x00\x01\x00")
    expected[("skipped_file", "anim.gif")] += 1
    (photos / "S3" / "text.png").write_text("I am not a PNG")
    expected[("unreadable_photo", "text.png")] += 1
    (photos / "S3" / "junk.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPjunk")
    expected[("unreadable_photo", "junk.webp")] += 1
    (photos / "S4" / "subfolder").mkdir()
    expected[("skipped_file", "subfolder")] += 1
    (photos / "S4" / "link.jpg").symlink_to(photos / "gone.jpg")
    expected[("skipped_file", "link.jpg")] += 1
    _photo(photos / "S5" / "bug.png", 5)  # readable; the aligner raises on it
    expected[("unreadable_photo", "bug.png")] += 1
    (photos / "S6" / "notes.docx").write_bytes(b"PK")
    expected[("skipped_file", "notes.docx")] += 1
    (photos / "M-emptyfolder-S7").mkdir()
    expected[("unknown_participant", "M-emptyfolder-S7")] += 1
    _photo(photos / "Nobody" / "a.png", 3)
    expected[("unknown_participant", "Nobody")] += 1
    # an intact participant's folder emptied of photographs: S7 keeps its scan, no probe
    (photos / "S7" / "a.png").unlink()
    expected[("empty_photo_folder", "S7")] += 1
    return root / "manifest.csv", photos, expected


def _damage_cache(cache_root: Path) -> Counter:
    """Damage one entry of each intact participant in a different way; {(kind, subject): 1}."""
    expected: Counter = Counter()

    def stems(folder, prefix):
        return sorted(p.with_suffix("") for p in (cache_root / folder).glob(f"{prefix}-*.json"))

    def damage(folder, subject, how):
        stem = stems(folder, subject)[0]
        how(stem)
        expected[("damaged_cache_entry", subject)] += 1

    npz, js = (lambda s: s.with_suffix(".npz")), (lambda s: s.with_suffix(".json"))
    damage("renders", "S1", lambda s: npz(s).write_bytes(npz(s).read_bytes()[:60]))  # truncated zip
    damage("renders", "S2", lambda s: npz(s).write_bytes(b""))  # empty file
    damage("renders", "S3", lambda s: js(s).write_text("{\"cache_version\": 3, "))  # cut JSON
    damage("renders", "S4", lambda s: js(s).write_text("[]"))  # a list, not an object
    damage("embeddings", "S5", lambda s: _npz(npz(s), **{**dict(np.load(npz(s))),
                                                        "embeddings": np.zeros((9, 3), np.float32)}))
    damage("embeddings", "S6", lambda s: _npz(npz(s), **{k: v * (1.0001 if k == "embeddings" else 1)
                                                        for k, v in dict(np.load(npz(s))).items()}))
    damage("embeddings", "S8", lambda s: _pickled_npz(npz(s)))  # an object array: never unpickled
    # photograph entries
    damage("photos", "S9", lambda s: npz(s).write_bytes(np.random.default_rng(1).bytes(300)))  # BadZipFile
    damage("renders", "S10", lambda s: js(s).write_text(js(s).read_text().replace(  # an older format
        f'"cache_version": {cache.CACHE_VERSION}', '"cache_version": 1')))
    # surfaces: their render entries removed (so the surface is read) and the surface damaged
    surf_s4 = stems("surfaces", "S4")[0]
    for r in stems("renders", "S4"):
        npz(r).unlink()
        js(r).unlink()
    expected[("damaged_cache_entry", "S4")] -= 1  # S4's render entry is removed: its surface is the damage
    arrays = dict(np.load(npz(surf_s4)))
    arrays["faces"] = arrays["faces"] + 50  # faces of vertices that are not there
    _npz(npz(surf_s4), **arrays)
    expected[("damaged_cache_entry", "S4")] += 1
    surf_s7 = stems("surfaces", "S7")[0]
    for r in stems("renders", "S7"):
        npz(r).unlink()
        js(r).unlink()
    js(surf_s7).unlink()
    js(surf_s7).mkdir()  # a sidecar that is a folder: IsADirectoryError
    expected[("damaged_cache_entry", "S7")] += 1
    return +expected


def test_fuzz_cohort_every_broken_item_is_one_problem_and_the_study_finishes(tmp_path, monkeypatch, capsys):
    from mriface.cli import main

    m, photos, expected = _build(tmp_path / "in")
    real_is_file = Path.is_file

    def is_file(self):
        if self.name == "locked.nii":  # Python 3.11: a folder above that may not be entered
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    out = tmp_path / "out"
    # a first run fills the cache; then intact participants' cache entries are damaged, each differently
    pipeline = FuzzPipeline()
    monkeypatch.setattr(study, "run_study", functools.partial(study.run_study, pipeline=pipeline))
    args = ["study", str(m), "--photos", str(photos), "--out", str(out), "--no-progress", "--views", "3",
            "--size", "32", "--workers", "1"]
    assert main(args) == 0
    expected += _damage_cache(out / "cache")
    assert len(expected) >= 45 and all(v == 1 for v in expected.values())

    monkeypatch.setattr(study, "run_study", functools.partial(study.run_study, pipeline=FuzzPipeline()))
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    problems = pd.read_csv(out / "problems.csv", keep_default_na=False)
    got: Counter = Counter()
    for kind, where, subject in zip(problems["kind"], problems["where"], problems["subject"]):
        name = Path(where).name
        photo_kinds = ("unreadable_photo", "skipped_file", "unknown_participant")
        got[(kind, name if kind in photo_kinds else (subject or None))] += 1
    assert got == expected, (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert len(problems) == sum(expected.values())
    # every intact participant with a photograph is still found first
    t = pd.read_csv(out / "participants.csv").set_index("participant")
    for i in range(1, GOOD + 1):
        if i != 7:
            assert t.loc[f"S{i}", "true_rank"] == 1, i
    assert "rank 1" in captured.out
