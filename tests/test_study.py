"""The study end to end: caching and resuming, bad inputs, probe modes, outputs, privacy.

The first tests swap in a cheap fake of the per-scan stages (``Pipeline``
subclass) so the study's own logic -- cache keys, resume, failure counting,
output files -- is checked in milliseconds. The tests marked ``slow`` run
the real stages on the 2 mm voxface head at a small image size, including a
run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mriface.errors import InputFileError, MRIFaceError, VolumeError
from mriface.inputs import load_inputs
from mriface.study import Pipeline, run_study
from mriface.surface import FaceFrame, HeadSurface

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a fake of the stages
def _identity(i: int) -> np.ndarray:
    v = np.random.default_rng(1000 + i).normal(size=512)
    return v / np.linalg.norm(v)


class FakePipeline(Pipeline):
    """Scans are text files ``"<id> [defaced]"``; photographs are grey PNGs of value <id>.

    A render or photo of identity i embeds near a fixed random unit vector
    of i, with per-view noise; a defaced scan's renders show no face.
    """

    dim = 512

    def __init__(self):
        super().__init__(device="cpu", backend="embree")
        self.calls = Counter()

    def model_id(self):
        return {"fake": 1}

    def prepare(self, image_size):
        pass

    def load(self, path):
        self.calls["load"] += 1
        text = Path(path).read_text()
        if text.startswith("bad"):
            raise VolumeError(f"{path}: not a volume (test)")
        return text

    def surface(self, volume):
        self.calls["surface"] += 1
        ident, *flags = volume.split()
        verts = np.array([[int(ident), 0, 0], [float("defaced" in flags), 1, 0], [0, 0, 1]], np.float32)
        frame = FaceFrame(np.zeros(3), np.array([0.0, 1, 0]), np.array([0.0, 0, 1]))
        return HeadSurface(verts, np.array([[0, 1, 2]]), np.tile([[0, 1, 0]], (3, 1)).astype(np.float32), frame)

    def render(self, surface, subject, protocol):
        self.calls["render"] += 1
        ident, defaced = int(surface.verts[0, 0]), bool(surface.verts[1, 0])
        v = protocol.views
        rng = np.random.default_rng([protocol.seed, ident])
        images = torch.zeros(v, 4, 4, 3)
        images[:, 0, 0, 0] = 0.0 if defaced else ident / 1000
        images[:, 0, 1, 0] = torch.as_tensor(rng.uniform(0, 1, v), dtype=torch.float32)
        df = pd.DataFrame({"subject": [subject] * v, "view": np.arange(v), "azimuth_deg": rng.uniform(-20, 20, v)})
        return SimpleNamespace(images=images, to_dataframe=lambda: df, subjects=[subject] * v,
                               view=torch.arange(v))

    def align(self, images):
        self.calls["align"] += 1
        if not isinstance(images, torch.Tensor):  # photographs (paths)
            try:
                arrs = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in images]
            except OSError as exc:
                raise InputFileError(f"cannot read image: {exc}") from exc
            images = torch.stack([torch.as_tensor(a[:4, :4]) for a in arrs])
            images[:, 0, 0, 0] = torch.round(images[:, 0, 0, 0] * 255) / 1000
        found = images[:, 0, 0, 0] > 0
        n = images.shape[0]
        return SimpleNamespace(crops=images.permute(0, 3, 1, 2), found=found,
                               prob=torch.where(found, 0.99, float("nan")), boxes=torch.zeros(n, 4),
                               n_faces=found.long())

    def embed(self, crops):
        self.calls["embed"] += 1
        out = []
        for c in crops:
            ident = int(round(float(c[0, 0, 0]) * 1000))
            noise = np.random.default_rng(int(float(c[0, 0, 1]) * 1e6)).normal(size=512)
            e = _identity(ident) + 0.02 * noise
            out.append(e / np.linalg.norm(e))
        return np.asarray(out, np.float32)


def _cohort(tmp_path: Path, n: int = 4) -> Path:
    """Manifest of n fake scans, ids 1..n, named S1..Sn."""
    scans = tmp_path / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    rows = ["subject,scan"]
    for i in range(1, n + 1):
        (scans / f"s{i}.txt").write_text(f"{i}")
        rows.append(f"S{i},scans/s{i}.txt")
    m = tmp_path / "manifest.csv"
    m.write_text("\n".join(rows) + "\n")
    return m


def _photo(path: Path, ident: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), ident, np.uint8)).save(path)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- fake-stage tests
@pytest.fixture(autouse=True)
def _stable_code_digest(request, monkeypatch):
    """Fake-stage tests: the stages' source (part of every cache key) held fixed.

    Its effect is tested on its own below; the real-stage tests use the real digest.
    """
    if "slow" not in request.keywords:
        import mriface.study.cache as cache

        monkeypatch.setattr(cache, "code_digest", lambda *modules: "code:" + ",".join(modules))


def test_rerun_recomputes_nothing_and_a_changed_option_or_file_does(tmp_path):
    m = _cohort(tmp_path)
    p1 = FakePipeline()
    r1 = run_study(m, out=tmp_path / "out", views=3, size=64, progress=False, pipeline=p1)
    assert (r1.computed, r1.cached) == (8, 0)  # 4 gallery + 4 probe-protocol entries
    assert list(r1.participants["true_rank"]) == [1, 1, 1, 1]
    before = _mtimes(tmp_path / "out" / "cache")

    p2 = FakePipeline()
    r2 = run_study(m, out=tmp_path / "out", views=3, size=64, progress=False, pipeline=p2)
    assert (r2.computed, r2.cached) == (0, 8)
    assert p2.calls == Counter()  # no stage ran at all
    assert _mtimes(tmp_path / "out" / "cache") == before
    pd.testing.assert_frame_equal(r1.participants, r2.participants)
    pd.testing.assert_frame_equal(r1.probes, r2.probes)

    # a changed render option misses the render cache but reuses the surfaces
    p3 = FakePipeline()
    r3 = run_study(m, out=tmp_path / "out", views=3, size=64, seed=5, progress=False, pipeline=p3)
    assert r3.computed == 8 and p3.calls["surface"] == 0 and p3.calls["render"] == 8

    # a changed scan file: only that subject is recomputed
    (tmp_path / "scans" / "s2.txt").write_text("2 ")
    p4 = FakePipeline()
    r4 = run_study(m, out=tmp_path / "out", views=3, size=64, progress=False, pipeline=p4)
    assert (r4.computed, r4.cached) == (2, 6) and p4.calls["surface"] == 1

    log = (tmp_path / "out" / "study.log").read_text()
    assert "gallery S1: cached" in log and "gallery S2: computed" in log


def test_changed_stage_code_misses_the_cache(tmp_path, monkeypatch):
    import mriface.study.cache as cache

    m = _cohort(tmp_path, 2)
    run_study(m, out=tmp_path / "out", views=2, size=32, progress=False, pipeline=FakePipeline())
    monkeypatch.setattr(cache, "code_digest", lambda *modules: "other:" + ",".join(modules))
    p = FakePipeline()
    r = run_study(m, out=tmp_path / "out", views=2, size=32, progress=False, pipeline=p)
    assert r.computed == 4 and p.calls["surface"] == 2  # a new surface code: surfaces too
    # the real digest follows the source files
    monkeypatch.undo()
    assert cache.code_digest("render") != cache.code_digest("recognition")
    assert len(cache.code_digest("surface")) == 64


def test_bad_inputs_are_counted_while_the_study_finishes(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in (1, 2, 3):
        (scans / f"s{i}.txt").write_text(f"{i}")
    (scans / "defaced.txt").write_text("4 defaced")
    (scans / "broken.txt").write_text("bad")
    m = tmp_path / "m.csv"
    m.write_text("subject,scan\nS1,scans/s1.txt\nS2,scans/s2.txt\nS3,scans/s3.txt\nS4,scans/defaced.txt\n"
                 "S5,scans/broken.txt\nS6,scans/nowhere.txt\nS1,scans/s2.txt\n")
    photos = tmp_path / "photos"
    for i in (1, 2, 4):
        _photo(photos / f"S{i}" / "a.png", i)
        _photo(photos / f"S{i}" / "b.png", i)
    (photos / "S3").mkdir()  # empty folder
    _photo(photos / "S9" / "a.png", 9)  # nobody in the gallery
    (photos / "S2" / "c.jpg").write_bytes(b"GIF89a garbage")  # unreadable
    _photo(photos / "S2" / "noface.png", 0)  # a photograph without a face

    r = run_study(m, out=tmp_path / "out", photos=photos, views=3, size=64, progress=False,
                  pipeline=FakePipeline())
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    f = s["failures"]
    assert f["missing_scan"] == 1 and f["duplicate_subject"] == 1
    assert f["unknown_participant"] == 1 and f["empty_photo_folder"] == 1 and f["unreadable_photo"] == 1
    assert f["scan_failed"] == 1 and f["no_face_in_renders"] == 1
    assert f["no_face_photos"] == 1 and f["true_subject_without_face"] == 1
    assert s["mode"] == "photos" and s["n_gallery"] == 5  # S1-S5: the failed scan stays, unmatched
    table = r.participants.set_index("participant")
    assert list(table.index) == ["S1", "S2", "S4"]
    assert table.loc["S1", "true_rank"] == 1 and table.loc["S2", "true_rank"] == 1
    assert np.isnan(table.loc["S4", "true_rank"])  # defaced: cannot be found
    assert s["rank1"]["count"] == 2 and s["rank1"]["n"] == 3
    problems = pd.read_csv(tmp_path / "out" / "problems.csv")
    assert set(problems["kind"]) >= {"missing_scan", "duplicate_subject", "scan_failed", "no_face_in_renders"}
    assert all("\n" not in m for m in problems["message"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "no_face_in_renders" in html and "nowhere.txt" in html


def test_a_photo_unreadable_while_aligning_is_isolated_and_counted(tmp_path):
    m = _cohort(tmp_path, 2)
    photos = tmp_path / "photos"
    _photo(photos / "S1" / "a.png", 1)
    (photos / "S1" / "b.png").write_bytes(b"\x89PNG junk")
    _photo(photos / "S2" / "a.png", 2)
    inputs = load_inputs(m, photos=photos, check_images=False)  # not caught while reading
    assert [p.name for p in inputs.photos["S1"]] == ["a.png", "b.png"]
    r = run_study(inputs, out=tmp_path / "o", views=2, size=32, progress=False, pipeline=FakePipeline())
    assert r.summary["failures"]["unreadable_photo"] == 1
    assert "b.png" in "".join(r.summary["problems"])
    t = r.participants.set_index("participant")
    assert t.loc["S1", "n_photos"] == 2 and t.loc["S1", "n_faces"] == 1 and t.loc["S1", "true_rank"] == 1


def test_probe_scans_from_a_second_column_and_from_a_probe_manifest(tmp_path):
    m = _cohort(tmp_path, 3)
    (tmp_path / "scans" / "s1_defaced.txt").write_text("1 defaced")
    (tmp_path / "scans" / "s2_copy.txt").write_text("2")
    with_column = tmp_path / "with_probe.csv"
    with_column.write_text("subject,scan,probe_scan\nS1,scans/s1.txt,scans/s1_defaced.txt\n"
                           "S2,scans/s2.txt,scans/s2_copy.txt\nS3,scans/s3.txt,\n")
    r = run_study(with_column, out=tmp_path / "o1", views=3, size=64, progress=False, pipeline=FakePipeline())
    assert r.summary["mode"] == "scans"
    table = r.participants.set_index("participant")
    assert list(table.index) == ["S1", "S2"]
    assert table.loc["S2", "true_rank"] == 1 and table.loc["S1", "n_faces"] == 0
    assert r.summary["options"]["probe_seed"] == 1  # probe views differ from the gallery's

    probe_m = tmp_path / "probes.csv"
    probe_m.write_text("subject,scan\nS3,scans/s3.txt\n")
    r2 = run_study(m, out=tmp_path / "o2", probe_manifest=probe_m, views=3, size=64, progress=False,
                   pipeline=FakePipeline())
    assert list(r2.participants["participant"]) == ["S3"] and r2.summary["mode"] == "scans"


def test_bids_dataset_with_two_sessions_runs_scan_to_scan(tmp_path):
    root = tmp_path / "bids"
    for i in (1, 2, 3):
        for ses in ("ses-a", "ses-b"):
            f = root / f"sub-0{i}" / ses / "anat" / f"sub-0{i}_{ses}_T1w.nii.gz"
            f.parent.mkdir(parents=True)
            f.write_text(f"{i}")
    r = run_study(root, out=tmp_path / "o", views=2, size=32, progress=False, pipeline=FakePipeline())
    assert r.summary["mode"] == "scans"
    assert list(r.participants["participant"]) == ["sub-01", "sub-02", "sub-03"]
    assert (r.participants["true_rank"] == 1).all()
    roles = sorted({(x.role, x.path.parent.parent.name) for x in r.scans})
    assert roles == [("gallery", "ses-a"), ("probe-scan", "ses-b")]


def test_protocol_mode_needs_a_different_protocol(tmp_path):
    from mriface.render import RenderProtocol

    m = _cohort(tmp_path, 2)
    same = RenderProtocol(views=2, image_size=32, seed=3)
    with pytest.raises(MRIFaceError, match="probe protocol equals the gallery protocol"):
        run_study(m, out=tmp_path / "o", protocol=same, probe_protocol=same, progress=False,
                  pipeline=FakePipeline())
    with pytest.raises(MRIFaceError, match="no usable photograph"):
        run_study(m, out=tmp_path / "o", probes="photos", views=2, size=32, progress=False,
                  pipeline=FakePipeline())
    with pytest.raises(MRIFaceError, match="photo_agg='median'"):
        run_study(m, out=tmp_path / "o", photo_agg="median", pipeline=FakePipeline())
    with pytest.raises(MRIFaceError, match="probe mode"):
        run_study(m, out=tmp_path / "o", probes="nonsense", pipeline=FakePipeline())


def test_outputs_hold_no_face_images_unless_asked(tmp_path):
    m = _cohort(tmp_path, 2)
    m.write_text(m.read_text().replace("S1,", "sub.1 v2,"))  # ids with dots and spaces are fine
    r = run_study(m, out=tmp_path / "out", views=2, size=32, progress=False, pipeline=FakePipeline())
    out = tmp_path / "out"
    for name in ("participants.csv", "probes.csv", "renders.csv", "problems.csv", "summary.json",
                 "report.html", "report.md", "cmc.png", "rank_histogram.png", "study.log"):
        assert (out / name).is_file(), name
    pngs = sorted(p.name for p in out.rglob("*.png"))
    assert pngs == ["cmc.png", "rank_histogram.png"]
    assert not (out / "images").exists()
    probes = pd.read_csv(out / "probes.csv")
    assert set(probes.columns) >= {"participant", "rank", "subject", "confidence"}
    renders = pd.read_csv(out / "renders.csv")
    assert len(renders) == 2 * 2 * 2 and {"face_found", "face_prob", "azimuth_deg"} <= set(renders.columns)
    assert r.files["html"] == out / "report.html"
    assert list(r.participants["participant"]) == ["sub.1 v2", "S2"]
    again = run_study(m, out=tmp_path / "out", views=2, size=32, progress=False, pipeline=FakePipeline())
    assert again.computed == 0


def test_include_images_writes_renders_and_lists_them(tmp_path):
    m = _cohort(tmp_path, 2)
    run_study(m, out=tmp_path / "out", views=2, size=32, progress=False, pipeline=FakePipeline())
    # asked later, from a finished cache: the renders are made again for the images
    r = run_study(m, out=tmp_path / "out", views=2, size=32, include_images=True, progress=False,
                  pipeline=FakePipeline())
    gallery_pngs = sorted(p.name for p in (tmp_path / "out" / "images" / "gallery").rglob("*.png"))
    assert gallery_pngs == ["S1_view00.png", "S1_view01.png", "S2_view00.png", "S2_view01.png"]
    assert len(list((tmp_path / "out" / "images" / "probe-protocol").rglob("*.png"))) == 4
    html = (tmp_path / "out" / "report.html").read_text()
    assert "images/gallery/S1/S1_view00.png" in html and "No face images are included" not in html
    assert r.summary["options"]["include_images"] is True


# --------------------------------------------------------------------------- real stages
def _voxface_cohort(tmp_path: Path, sample_path, n_copies: int = 2, defaced: bool = False) -> Path:
    """voxface plus rotated, resampled copies of it (and a defaced copy) as a manifest."""
    from mriface.volume import rotate_resample

    head = sample_path("voxface")
    rows = ["subject,scan", f"vox,{head}"]
    for i in range(n_copies):
        dest = tmp_path / f"vox_rot{i}.nii.gz"
        rotate_resample(head, dest, axis=(0, 0, 1), degrees=8.0 + 4 * i, voxel_mm=2.0)
        rows.append(f"rot{i},{dest.name}")
    if defaced:
        rows.append(f"defaced,{_defaced_voxface(tmp_path, sample_path).name}")
    m = tmp_path / "manifest.csv"
    m.write_text("\n".join(rows) + "\n")
    return m


def _defaced_voxface(tmp_path: Path, sample_path) -> Path:
    """voxface with its own deface mask's voxels set to zero (the face region removed)."""
    import nibabel as nib

    img = nib.load(str(sample_path("voxface")))
    mask = np.asarray(nib.load(str(sample_path("voxface-facemask"))).dataobj) > 0
    data = np.asarray(img.dataobj, np.float32)
    assert mask.shape == data.shape[:3] and mask.any()
    data[mask] = 0  # voxface's mask marks the voxels a defacer removes
    dest = tmp_path / "vox_defaced.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(dest))
    return dest


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mriface", *args], capture_output=True, text=True,
                          cwd=REPO, **kw)


@pytest.mark.slow
def test_real_study_killed_with_sigkill_resumes_without_recomputing(tmp_path, sample_path):
    m = _voxface_cohort(tmp_path, sample_path, n_copies=2)  # 3 subjects: 6 cache entries
    args = ["study", str(m), "--views", "3", "--size", "160", "--device", "cpu", "--no-progress"]
    # an uninterrupted run for reference (in this process: the same code, no start-up cost)
    run_study(m, out=tmp_path / "ref", views=3, size=160, device="cpu", progress=False)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mriface", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if list((out / "cache" / "renders").glob("*-gallery-*.json")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the study finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "renders").glob("*.json")}
    assert 1 <= len(done) < 6 and not (out / "summary.json").exists()
    # an entry is finished once its .json, written last, exists; a lone .npz may be redone
    entries = [p.with_suffix("") for p in (out / "cache").rglob("*.json")]
    finished = {p: p.stat().st_mtime_ns for stem in entries for p in (stem.with_suffix(".json"), stem.with_suffix(".npz"))
                if p.exists()}

    again = _cli(*args, "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr
    for path, mtime in finished.items():  # finished surfaces and entries untouched
        assert path.stat().st_mtime_ns == mtime, path
    log = (out / "study.log").read_text().split("study started: ")[-1]  # the second run's part
    assert log.count(": cached") == len(done)
    assert log.count(": computed") == 6 - len(done)
    for table in ("participants.csv", "probes.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / table), pd.read_csv(tmp_path / "ref" / table))
    s1 = json.loads((out / "summary.json").read_text())
    s0 = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert s1["rank1"] == s0["rank1"] and s1["top5"] == s0["top5"]


@pytest.mark.slow
def test_real_study_with_photographs_and_a_defaced_scan(tmp_path, sample_path):
    """Photographs of two people against voxface, its rotated copy and its defaced copy."""
    import shutil

    m = _voxface_cohort(tmp_path, sample_path, n_copies=1, defaced=True)
    photos = tmp_path / "photos"
    # participant ids are gallery ids; the ranks mean nothing, the bookkeeping does
    (photos / "vox").mkdir(parents=True)
    for k in ("obama", "obama2"):
        shutil.copy(sample_path(k), photos / "vox" / f"{k}.jpg")
    (photos / "rot0").mkdir()
    shutil.copy(sample_path("biden"), photos / "rot0" / "biden.jpg")
    (photos / "rot0" / "broken.jpg").write_bytes(sample_path("obama3").read_bytes()[:2000])
    (photos / "defaced").mkdir()  # empty
    (photos / "someone").mkdir()
    shutil.copy(sample_path("obama3"), photos / "someone" / "x.jpg")

    r = run_study(m, out=tmp_path / "out", photos=photos, views=3, size=160, device="cpu", progress=False)
    s = r.summary
    assert s["mode"] == "photos" and s["n_gallery"] == 3
    assert s["failures"]["unreadable_photo"] == 1
    assert s["failures"]["empty_photo_folder"] == 1 and s["failures"]["unknown_participant"] == 1
    gallery = {x.subject: x for x in r.scans if x.role == "gallery"}
    assert gallery["vox"].n_found >= 2 and gallery["rot0"].n_found >= 2  # whole faces are detected
    assert gallery["defaced"].n_found <= 1  # the face region is gone
    assert list(r.participants["participant"]) == ["vox", "rot0"]  # gallery order
    assert r.participants["n_faces"].tolist() == [2, 1]  # each photograph shows a face
    assert r.participants["true_rank"].between(1, 3).all()
    # per-photograph lists: each photograph lists every matchable gallery subject once
    lists = r.probes[r.probes["face_found"]]
    assert lists.groupby(["participant", "photo"])["subject"].nunique().max() <= 3


@pytest.mark.slow
def test_benchmark_small_mode_runs_the_study_end_to_end(tmp_path):
    from benchmarks import bench_study

    dest = tmp_path / "study.json"
    assert bench_study.main(["--small", "--skip-per-scan", "--scans", "3", "--json", str(dest),
                             "--workdir", str(tmp_path / "work")]) == 0
    got = json.loads(dest.read_text())["study"]
    assert got["scans"] == 3 and got["renders"] == 9 and got["photos"] == 6
    assert got["study_s"] > got["rerun_from_cache_s"] > 0
    assert set(got["stage_sums_s"]) == {"load", "surface", "render", "align", "embed"}
    assert all(v > 0 for v in got["stage_sums_s"].values())
    manifest = pd.read_csv(tmp_path / "work" / "cohort" / "manifest.csv")
    assert len(manifest) == 3 and len(list((tmp_path / "work" / "cohort" / "photos").rglob("*.jpg"))) == 6


# --------------------------------------------------------------------------- the probe-transform hook
def _deface_text(volume: str) -> str:
    """FakePipeline's scans are text: a defacing function marks the volume defaced."""
    return volume + " defaced"


def test_a_transform_is_the_probe_source_and_its_failures_are_problems(tmp_path):
    from mriface.study import TransformProbes

    m = _cohort(tmp_path, 3)
    r = run_study(m, out=tmp_path / "o", probes=TransformProbes(_deface_text), views=2, size=32, progress=False,
                  pipeline=FakePipeline())
    assert r.summary["mode"] == "transform" and r.summary["options"]["transform"] == "_deface_text"
    assert r.summary["options"]["probe_seed"] == 1  # rendered under the probe protocol
    t = r.participants.set_index("participant")
    assert list(t.index) == ["S1", "S2", "S3"] and (t["n_faces"] == 0).all() and t["true_rank"].isna().all()
    assert r.summary["rank1"]["count"] == 0
    roles = Counter(x.role for x in r.scans)
    assert roles == {"gallery": 3, "probe-transform": 3}

    # a plain function is taken as TransformProbes(fn); one that keeps the face finds everyone
    r2 = run_study(m, out=tmp_path / "o2", probes=lambda vol: vol, views=2, size=32, progress=False,
                   pipeline=FakePipeline())
    assert r2.summary["mode"] == "transform" and (r2.participants["true_rank"] == 1).all()

    # a transform that raises for one subject, or returns nothing for another: problems, not a crash
    def picky(vol):
        if vol.startswith("2"):
            raise RuntimeError("cannot find the nose\nsecond line")
        return None if vol.startswith("3") else vol

    r3 = run_study(m, out=tmp_path / "o3", probes=TransformProbes(picky), views=2, size=32, progress=False,
                   pipeline=FakePipeline())
    assert r3.summary["failures"]["transform_failed"] == 2
    msgs = "\n".join(r3.summary["problems"])
    assert "'picky' raised RuntimeError: cannot find the nose" in msgs and "second line" not in msgs
    assert "'picky' returned NoneType" in msgs
    t3 = r3.participants.set_index("participant")
    assert t3.loc["S1", "true_rank"] == 1 and t3[["true_rank"]].loc[["S2", "S3"]].isna().all().all()


_SEEN: list = []


def test_a_transform_on_surfaces_and_its_cache_key(tmp_path):
    from mriface.study import TransformProbes
    from mriface.surface import HeadSurface

    m = _cohort(tmp_path, 2)
    seen = _SEEN  # a global: what a function closes over is part of its cache key, globals are not
    seen.clear()

    def shift(surface):
        _SEEN.append(surface)
        return HeadSurface(surface.verts + np.float32(offset), surface.faces, surface.normals, surface.frame)

    offset = 0.0
    p1 = FakePipeline()
    r1 = run_study(m, out=tmp_path / "o", probes=TransformProbes(shift, on="surface"), views=2, size=32,
                   progress=False, pipeline=p1)
    assert len(seen) == 2 and all(isinstance(s, HeadSurface) for s in seen)
    assert p1.calls["surface"] == 2  # the probes reuse the gallery's surfaces
    assert (r1.participants["true_rank"] == 1).all()
    # rerun: the transformed probes come from the cache
    r2 = run_study(m, out=tmp_path / "o", probes=TransformProbes(shift, on="surface"), views=2, size=32,
                   progress=False, pipeline=FakePipeline())
    assert (r2.computed, r2.cached) == (0, 4) and len(seen) == 2
    # a changed value the function closes over is a changed transform: computed again
    offset = 0.5
    r3 = run_study(m, out=tmp_path / "o", probes=TransformProbes(shift, on="surface"), views=2, size=32,
                   progress=False, pipeline=FakePipeline())
    assert (r3.computed, r3.cached) == (2, 2)
    # an explicit key names the version; cache=False recomputes every run
    r4 = run_study(m, out=tmp_path / "o", probes=TransformProbes(shift, on="surface", cache=False), views=2,
                   size=32, progress=False, pipeline=FakePipeline())
    assert (r4.computed, r4.cached) == (2, 2)
    assert TransformProbes(shift, key="v1").identity() == TransformProbes(lambda s: s, name="shift",
                                                                           key="v1").identity()
    with pytest.raises(MRIFaceError, match="use 'volume' or 'surface'"):
        TransformProbes(shift, on="mesh")
