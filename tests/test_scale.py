"""Cohorts at scale: the streaming executor and Ray give the sequential path's tables, and survive killed workers.

Most tests use a cheap pipeline (scans are text files, "renders" are 4x4
images that encode the subject) so that what is tested - which process does
what, that results come back in order and bit for bit, that a killed worker
costs nothing but time, that a rerun resumes from the cache - takes seconds.
The slow test runs the real stages on the 2 mm voxface head.
"""

from __future__ import annotations

import filecmp
import os
import signal
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

from mriface.study import Pipeline, run_study
from mriface.study.executor import Executor, StreamingExecutor, busy_summary, open_executor
from mriface.surface import FaceFrame, HeadSurface

TABLES = ("participants.csv", "probes.csv")


# --------------------------------------------------------------------------- a cheap pipeline
def _identity(i: int) -> np.ndarray:
    v = np.random.default_rng(1000 + i).normal(size=64)
    return v / np.linalg.norm(v)


class CheapPipeline(Pipeline):
    """Scans are text files ``"<id>"``; photographs grey PNGs of value <id>; embeddings near a vector per id.

    ``kill_once``: a file path; the first worker process (not the main one)
    that reconstructs subject id ``kill_id`` creates the file and kills
    itself with SIGKILL, as the kernel's out-of-memory killer would.
    """

    dim = 64

    def __init__(self, kill_once: "Path | None" = None, kill_id: int = 3, load_s: float = 0.02):
        super().__init__(device="cpu", backend="embree")
        self.calls = Counter()
        self.main_pid = os.getpid()
        self.kill_once, self.kill_id, self.load_s = kill_once, kill_id, load_s

    def model_id(self):
        return {"cheap": 1}

    def prepare(self, image_size):
        pass

    def load(self, path):
        self.calls["load"] += 1
        time.sleep(self.load_s)  # something to measure as busy time
        return Path(path).read_text()

    def surface(self, volume):
        self.calls["surface"] += 1
        ident = int(volume.split()[0])
        if (self.kill_once is not None and ident == self.kill_id and os.getpid() != self.main_pid
                and not self.kill_once.exists()):
            self.kill_once.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        verts = np.array([[ident, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
        frame = FaceFrame(np.zeros(3), np.array([0.0, 1, 0]), np.array([0.0, 0, 1]))
        return HeadSurface(verts, np.array([[0, 1, 2]]), np.tile([[0, 1, 0]], (3, 1)).astype(np.float32), frame)

    def render(self, surface, subject, protocol):
        self.calls["render"] += 1
        ident, v = int(surface.verts[0, 0]), protocol.views
        rng = np.random.default_rng([protocol.seed, ident])
        images = torch.zeros(v, 4, 4, 3)
        images[:, 0, 0, 0] = ident / 1000
        images[:, 0, 1, 0] = torch.as_tensor(rng.uniform(0, 1, v), dtype=torch.float32)
        df = pd.DataFrame({"subject": [subject] * v, "view": np.arange(v), "azimuth_deg": rng.uniform(-20, 20, v)})
        return SimpleNamespace(images=images, to_dataframe=lambda: df)

    def align(self, images):
        self.calls["align"] += 1
        if not isinstance(images, torch.Tensor):  # photographs (paths)
            arrs = [np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in images]
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
            e = _identity(int(round(float(c[0, 0, 0]) * 1000)))
            e = e + 0.05 * np.random.default_rng(int(float(c[0, 0, 1]) * 1e6)).normal(size=64)
            out.append(e / np.linalg.norm(e))
        return np.asarray(out, np.float32)


def _cohort(folder: Path, n: int) -> tuple[Path, Path]:
    """n text scans S1..Sn and one or two photographs each (of the same person)."""
    (folder / "scans").mkdir(parents=True, exist_ok=True)
    rows = ["subject,scan"]
    for i in range(1, n + 1):
        (folder / "scans" / f"s{i}.txt").write_text(str(i))
        rows.append(f"S{i},scans/s{i}.txt")
        for j in range(1 + i % 2):
            dest = folder / "photos" / f"S{i}" / f"{j}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(dest)
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv", folder / "photos"


def _same_tables(a: Path, b: Path) -> None:
    for t in TABLES:
        assert filecmp.cmp(a / t, b / t, shallow=False), f"{t} differs between {a.name} and {b.name}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A cohort of 6 and its study run one scan at a time (the reference tables)."""
    root = tmp_path_factory.mktemp("scale")
    manifest, photos = _cohort(root / "cohort", 6)
    run_study(manifest, out=root / "sequential", photos=photos, views=3, size=32, progress=False,
              pipeline=CheapPipeline(), executor="sequential")
    return SimpleNamespace(root=root, manifest=manifest, photos=photos, out=root / "sequential")


# --------------------------------------------------------------------------- the seam
def test_executor_names_and_the_cli_flags():
    assert type(open_executor("auto", 1)) is Executor
    assert isinstance(open_executor("auto", 2), StreamingExecutor)
    assert open_executor("streaming", 3).workers == 3
    with pytest.raises(Exception, match="executor='threads'"):
        open_executor("threads", 2)
    with pytest.raises(Exception, match="workers=0"):
        open_executor("streaming", 0)
    from mriface.cli import _executor_args, build_parser

    parse = build_parser().parse_args
    assert _executor_args(parse(["study", "m.csv", "--out", "o", "--workers", "1"])) == {
        "executor": "auto", "workers": 1}
    assert _executor_args(parse(["study", "m.csv", "--out", "o"]))["workers"] >= 1  # the machine's cores
    assert _executor_args(parse(["study", "m.csv", "--out", "o", "--ray"]))["ray_address"] is None
    assert _executor_args(parse(["study", "m.csv", "--out", "o", "--ray", "10.0.0.5:6379"])) == {
        "executor": "ray", "workers": None, "ray_address": "10.0.0.5:6379"}


def test_busy_summary_measures_overlap():
    s = busy_summary([("workers", "surface", 0.0, 4.0), ("main", "render", 2.0, 5.0), ("main", "wait", 0.0, 2.0)],
                     wall=5.0)
    assert s["overlap_s"] == pytest.approx(2.0) and s["workers_busy_s"] == 4.0 and s["main_busy_s"] == 3.0
    assert s["parallelism"] == pytest.approx(7.0 / 5.0)


# --------------------------------------------------------------------------- streaming
def test_streaming_gives_the_same_tables_survives_a_killed_worker_and_resumes(reference, tmp_path):
    marker = tmp_path / "killed"
    pipe = CheapPipeline(kill_once=marker)
    ex = StreamingExecutor(2)
    out = tmp_path / "streaming"
    r = run_study(reference.manifest, out=out, photos=reference.photos, views=3, size=32, progress=False,
                  pipeline=pipe, executor=ex)
    _same_tables(reference.out, out)
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker was killed ...
    s = ex.stats
    assert s["worker_deaths"] == 1  # ... noticed, and its scan done here
    assert s["prefetched"] >= 4 and s["prefetched"] + s["computed_here"] == 6
    assert pipe.calls["load"] == s["computed_here"]  # the main process loaded only what no worker did
    assert s["busy_s"]["load (workers)"] > 0 and s["busy_s"]["render (main)"] >= 0
    assert s["photos_while_waiting"] >= 0 and r.computed == 6 + 6  # 6 scans, 6 participants' photographs
    log = (out / "study.log").read_text()
    assert "died" in log and "executor streaming (2 workers): wall" in log and "busy at once" in log
    # a rerun resumes: nothing recomputed, anywhere
    ex2 = StreamingExecutor(2)
    again = run_study(reference.manifest, out=out, photos=reference.photos, views=3, size=32, progress=False,
                      pipeline=CheapPipeline(), executor=ex2)
    assert again.computed == 0 and again.cached == 12 and ex2.stats["prefetched"] == 0
    _same_tables(reference.out, out)
    reference.local = out  # the local executor's tables, for the Ray test


# --------------------------------------------------------------------------- Ray
def test_ray_local_runtime_gives_the_local_tables_and_retries_a_killed_task(reference, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray extra: pip install 'mriface[ray]' (make test installs it)")
    from mriface.study.ray_executor import RayExecutor

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    marker = tmp_path / "killed"
    # the local (streaming) executor's tables; when this test runs alone, the sequential ones, which the
    # streaming test shows to be the same bytes
    local = getattr(reference, "local", reference.out)
    ex = RayExecutor(num_cpus=2)
    out = tmp_path / "ray"
    r = run_study(reference.manifest, out=out, photos=reference.photos, views=3, size=32, progress=False,
                  pipeline=CheapPipeline(kill_once=marker), executor=ex)
    assert not ray.is_initialized()  # the runtime it started is stopped again
    assert marker.exists()  # a surface task's worker was killed mid-run ...
    assert ex.stats["computed_by_driver_fallback"] == 0  # ... and Ray retried the task
    assert r.computed == 12 and not r.problems
    assert filecmp.cmp(local / "participants.csv", out / "participants.csv", shallow=False)
    _same_tables(reference.out, out)
    assert "executor ray: local runtime, 2 CPUs" in (out / "study.log").read_text()


# --------------------------------------------------------------------------- the real stages
@pytest.mark.slow
def test_streaming_real_stages_byte_identical_tables(tmp_path, sample_path):
    """voxface and two rotated copies, real load/surface/render/align/embed: the same bytes either way."""
    from mriface.volume import rotate_resample

    head = sample_path("voxface")
    rows = ["subject,scan", f"vox,{head}"]
    for i in range(2):
        dest = tmp_path / f"rot{i}.nii.gz"
        rotate_resample(head, dest, axis=(0, 0, 1), degrees=6.0 + 5 * i, voxel_mm=2.0)
        rows.append(f"rot{i},{dest.name}")
    m = tmp_path / "manifest.csv"
    m.write_text("\n".join(rows) + "\n")
    kw = dict(views=2, size=128, device="cpu", progress=False, probes="protocol")
    run_study(m, out=tmp_path / "seq", executor="sequential", **kw)
    ex = StreamingExecutor(2)
    run_study(m, out=tmp_path / "str", executor=ex, **kw)
    _same_tables(tmp_path / "seq", tmp_path / "str")
    assert ex.stats["prefetched"] == 3 and ex.stats["busy_s"]["surface (workers)"] > 0
