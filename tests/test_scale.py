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
class _CheapRenders(SimpleNamespace):
    """What CheapPipeline.render returns: images and a parameter table (picklable, for the workers)."""

    def to_dataframe(self):
        return self.df


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

    def __init__(self, kill_once: "Path | None" = None, kill_id: int = 3, load_s: float = 0.02,
                 first_render_s: float = 0.0, fail_render_id: "int | None" = None):
        super().__init__(device="cpu", backend="embree")
        self.calls = Counter()
        self.main_pid = os.getpid()
        self.kill_once, self.kill_id, self.load_s = kill_once, kill_id, load_s
        self.first_render_s, self.fail_render_id = first_render_s, fail_render_id

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
        if self.calls["render"] == 1:
            time.sleep(self.first_render_s)  # the workers get ahead: the next scans' surfaces are all ready
        ident, v = int(surface.verts[0, 0]), protocol.views
        if ident == self.fail_render_id:
            from mriface.errors import MRIFaceError

            raise MRIFaceError(f"nothing in front of the face frame of {subject}")
        rng = np.random.default_rng([protocol.seed, ident])
        images = torch.zeros(v, 4, 4, 3)
        images[:, 0, 0, 0] = ident / 1000
        images[:, 0, 1, 0] = torch.as_tensor(rng.uniform(0, 1, v), dtype=torch.float32)
        df = pd.DataFrame({"subject": [subject] * v, "view": np.arange(v), "azimuth_deg": rng.uniform(-20, 20, v)})
        return _CheapRenders(images=images, df=df)

    def align(self, images):
        self.calls["align"] += 1
        self.calls["aligned"] += len(images)
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
    assert s["busy_s"]["load (workers)"] > 0 and s["busy_s"]["render (workers)"] > 0  # on the CPU workers render
    assert pipe.calls["render"] == s["computed_here"]  # ... and this process only aligns and embeds them
    assert pipe.calls["align"] == 6 + 6  # (6 scans, 6 participants' photographs)
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


# --------------------------------------------------------------------------- batches of scans on the device
def test_process_scans_batches_the_device_stages_and_gives_each_scans_own_entries(reference, tmp_path):
    from mriface.inputs import Scan
    from mriface.render import RenderProtocol
    from mriface.study.stages import process_scan, process_scans

    scans = [Scan(f"S{i}", reference.manifest.parent / "scans" / f"s{i}.txt") for i in (1, 2, 3)]
    protocol = RenderProtocol(views=3, image_size=32)
    pipe = CheapPipeline()
    together = process_scans(scans, "gallery", protocol, pipe, tmp_path / "batch")
    assert pipe.calls["align"] == 1 and pipe.calls["aligned"] == 9  # one detection pass over 3 x 3 renders
    assert pipe.calls["embed"] == 1  # one embedding call for the batch
    one = CheapPipeline()
    alone = [process_scan(s, "gallery", protocol, one, tmp_path / "alone") for s in scans]
    assert one.calls["align"] == 3
    for a, b in zip(together, alone):
        assert (a.subject, a.found.tolist(), a.renders) == (b.subject, b.found.tolist(), b.renders)
        assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.prob, b.prob, equal_nan=True)
        assert set(a.timings) == {"load", "surface", "render", "align", "embed"}
    # the same cache entries: a scan done alone afterwards finds the batch's entries
    again = CheapPipeline()
    cached = [process_scan(s, "gallery", protocol, again, tmp_path / "batch") for s in scans]
    assert all(r.cached for r in cached) and again.calls["render"] == 0
    assert all(np.array_equal(r.embeddings, b.embeddings) for r, b in zip(cached, alone))


def test_a_failing_scan_in_a_batch_is_its_own_problem(reference, tmp_path):
    from mriface.inputs import Scan
    from mriface.render import RenderProtocol
    from mriface.study.stages import process_scans

    scans = [Scan(f"S{i}", reference.manifest.parent / "scans" / f"s{i}.txt") for i in (1, 2, 3)]
    pipe = CheapPipeline(fail_render_id=2)
    res = process_scans(scans, "gallery", RenderProtocol(views=3, image_size=32), pipe, tmp_path)
    assert [r.problem is None for r in res] == [True, False, True]
    assert res[1].problem.kind == "scan_failed" and "nothing in front of the face frame of S2" in res[1].problem.message
    assert [r.n_found for r in res] == [3, 0, 3]


def test_streaming_in_batches_of_three_gives_the_same_tables(reference, tmp_path):
    """K=3 on the CPU with the cheap pipeline: batched device stages, the sequential path's bytes."""
    pipe = CheapPipeline(first_render_s=1.0)
    ex = StreamingExecutor(2, batch_scans=3, render_in_workers=False)  # this process renders, in batches
    out = tmp_path / "batched"
    run_study(reference.manifest, out=out, photos=reference.photos, views=3, size=32, progress=False,
              pipeline=pipe, executor=ex)
    _same_tables(reference.out, out)
    s = ex.stats
    assert s["batch_scans"] == 3 and s["batches"] >= 1 and s["mean_batch"] > 1  # scans went through together
    assert pipe.calls["render"] == 6 and s["prefetched"] == 6
    assert "batches of up to 3 scans" in (out / "study.log").read_text()


def test_workers_run_at_a_lower_priority_than_the_main_process():
    """So that the main process's multi-threaded align/embed bursts are not stalled by a worker holding a core."""
    if not hasattr(os, "getpriority"):
        pytest.skip("os.getpriority is POSIX-only; the workers' os.nice is skipped there too")
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    with StreamingExecutor(1) as ex:
        pid = ex._pool[0].proc.pid
        deadline = time.time() + 60
        while os.getpriority(os.PRIO_PROCESS, pid) != want and time.time() < deadline:
            time.sleep(0.1)
        assert os.getpriority(os.PRIO_PROCESS, pid) == want
    with StreamingExecutor(1, nice=0) as ex:
        time.sleep(0.5)
        assert os.getpriority(os.PRIO_PROCESS, ex._pool[0].proc.pid) == os.getpriority(os.PRIO_PROCESS, 0)


def test_batch_scans_defaults_by_device():
    from mriface.study.worker import resolve_batch_scans

    assert resolve_batch_scans(None, SimpleNamespace(device=torch.device("cpu"))) == 1
    assert resolve_batch_scans(None, SimpleNamespace(device=torch.device("cuda"))) == 8
    assert resolve_batch_scans(3, None) == 3
    with pytest.raises(Exception, match="batch_scans=0"):
        StreamingExecutor(2, batch_scans=0)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (its CPU twin: "
                    "test_streaming_in_batches_of_three_gives_the_same_tables)")
def test_cuda_batches_of_scans_match_the_sequential_tables_to_rounding(tmp_path, sample_path):
    """Real stages on CUDA, 3 scans per device batch: the sequential path's tables up to the last bits.

    Batched rendering, detection and embedding on the GPU reorder float sums,
    so the scores may differ in the last bits (docs/scale.md); ranks and
    detections do not.
    """
    from mriface.volume import rotate_resample

    head = sample_path("voxface")
    rows = ["subject,scan", f"vox,{head}"]
    for i in range(3):
        dest = tmp_path / f"rot{i}.nii.gz"
        rotate_resample(head, dest, axis=(0, 0, 1), degrees=6.0 + 5 * i, voxel_mm=2.0)
        rows.append(f"rot{i},{dest.name}")
    m = tmp_path / "manifest.csv"
    m.write_text("\n".join(rows) + "\n")
    kw = dict(views=4, size=256, device="cuda", progress=False, probes="protocol", random_weights=True)
    run_study(m, out=tmp_path / "seq", executor="sequential", **kw)
    ex = StreamingExecutor(2, batch_scans=3)
    run_study(m, out=tmp_path / "batched", executor=ex, **kw)
    assert ex.stats["batch_scans"] == 3
    for t in TABLES:
        a, b = pd.read_csv(tmp_path / "seq" / t), pd.read_csv(tmp_path / "batched" / t)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- Ray
def test_ray_local_runtime_gives_the_local_tables_and_retries_a_killed_task(reference, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray extra: pip install 'mriface[ray]' (make test installs it)")
    from mriface.study.ray_executor import RayExecutor

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    marker = tmp_path / "killed"
    # the local (streaming) executor's tables; when this test runs alone, the sequential ones, which the
    # streaming test shows to be the same bytes
    local = getattr(reference, "local", reference.out)
    ex = RayExecutor(num_cpus=2, batch_scans=3)  # the actor gets scans 3 at a time, with their 3 surface tasks
    out = tmp_path / "ray"
    r = run_study(reference.manifest, out=out, photos=reference.photos, views=3, size=32, progress=False,
                  pipeline=CheapPipeline(kill_once=marker), executor=ex)
    assert not ray.is_initialized()  # the runtime it started is stopped again
    assert marker.exists()  # a surface task's worker was killed mid-run ...
    assert ex.stats["computed_by_driver_fallback"] == 0  # ... and Ray retried the task
    assert ex.stats["batch_scans"] == 3
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
    busy = ex.stats["busy_s"]
    assert ex.stats["prefetched"] == 6 and busy["surface (workers)"] > 0  # 3 surfaces; 3 x 2 lists of renders
    # the one-thread workers rendered, and the tables above are still the main process's bytes
    assert busy["render (workers)"] > 0 and "render (main)" not in busy


def test_render_many_with_a_mesh_batching_backend_gives_each_subject_its_own_renders():
    """The batched render path (zbuffer batches meshes; runs on the CPU too) equals one render call per subject."""
    import dataclasses

    from mriface.render import RenderProtocol
    from mriface.render._synthetic import synthetic_head

    head = synthetic_head()
    other = dataclasses.replace(head, verts=head.verts * 1.05)
    pipe = Pipeline(device="cpu", backend="zbuffer")
    assert pipe.batches_meshes and not Pipeline(device="cpu", backend="embree").batches_meshes
    prot = RenderProtocol(views=2, image_size=40, seed=3)
    many = pipe.render_many([(head, "a"), (other, "b")], prot)
    for (surf, sid), got in zip([(head, "a"), (other, "b")], many):
        alone = pipe.render(surf, sid, prot)
        assert got.subjects == [sid] * 2 and torch.equal(got.images, alone.images)
        assert torch.equal(got.cameras.R, alone.cameras.R)
        pd.testing.assert_frame_equal(got.to_dataframe(), alone.to_dataframe())
