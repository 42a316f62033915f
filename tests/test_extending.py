"""Extending mriface from outside the package: a defacing function as the probes, a face model, mesh scans.

Everything defined here lives in this test file, not in ``mriface/``: a
plain Python function on a Volume passed to ``run_study`` as the probe
transform, a toy face model registered with
:func:`mriface.recognition.register_model` and a toy render backend
registered with :func:`mriface.render.register_backend` (the render tests
have a rasterizer written from scratch; this one wraps embree). The studies run the real stages
(reconstruction, embree renders, MTCNN) on a gallery that mixes a volume
(the 2 mm voxface head) and a mesh file (its skin as PLY), at a small image
size; they share one cache, so each surface is reconstructed once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mriface.recognition import FACENET_CROP, register_model
from mriface.study import TransformProbes, run_study

VIEWS, SIZE = 2, 160


# --------------------------------------------------------------------------- what a user writes
def erase_face(vol):
    """A crude defacer: zero every voxel in front of a coronal plane 30 mm behind the tip of the nose.

    World RAS+: +y is anterior, so the nose tip is the head voxel with the
    largest y.
    """
    ijk = np.indices(vol.shape).reshape(3, -1).astype(np.float64)
    y = (vol.affine[1, :3] @ ijk + vol.affine[1, 3]).reshape(vol.shape)
    head = vol.data > 0.25 * np.percentile(vol.data, 99)
    nose_tip = y[head].max()
    data = vol.data.copy()
    data[y > nose_tip - 30.0] = 0
    return dataclasses.replace(vol, data=data)


def same_surface(surface):
    """The identity on a HeadSurface: the control for the hook (probes that still show the face)."""
    return surface


class TinyModel:
    """A toy face model: a 4x4 average-pooled crop (48 numbers), L2-normalised."""

    name = "tiny-test"
    dim = 48
    crop = FACENET_CROP
    licence = "CC0-1.0"

    def __init__(self, device):
        self.device = torch.device("cpu") if str(device) == "auto" else torch.device(device)
        self.calls = 0

    def model_id(self) -> dict:
        return {"name": self.name, "version": 1, "crop": self.crop.as_dict()}

    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = torch.nn.functional.adaptive_avg_pool2d(crops.float(), 4).flatten(1)
        return torch.nn.functional.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


BUILT: list = []


class CountingBackend:
    """A toy render backend: embree's hits, counted (what a wrapper around another rasterizer looks like)."""

    name, default_device, batches_meshes = "counting-test", "cpu", False
    calls = 0

    def __init__(self):
        from mriface.render import get_backend

        self.inner = get_backend("embree")

    def hits(self, scene, **options):
        type(self).calls += 1
        return self.inner.hits(scene, **options)


def tiny_factory(*, device="auto", weights=None, random_weights=False, **kw):
    model = TinyModel(device)
    BUILT.append(model)
    return model


# --------------------------------------------------------------------------- the cohort
@pytest.fixture(scope="module")
def cohort(tmp_path_factory, sample_path):
    """A manifest of voxface (a volume) and voxface's skin as a PLY mesh file."""
    from mriface.surface import extract_head_surface, save_surface
    from mriface.volume import load_volume

    d = tmp_path_factory.mktemp("cohort")
    head = sample_path("voxface")
    save_surface(extract_head_surface(load_volume(head), device="cpu"), d / "vox_skin.ply")
    (d / "mixed.csv").write_text(f"subject,scan\nvox,{head}\nmesh,vox_skin.ply\n")
    (d / "cache").mkdir()  # shared by the studies below: each surface is reconstructed once
    return d


@pytest.mark.slow
def test_a_defacing_function_as_the_probes_counts_defaced_participants_as_misses(cohort, tmp_path):
    from mriface.study import Pipeline

    cache = cohort / "cache"
    stages = Pipeline(device="cpu")  # one set of face models for the four studies below
    r = run_study(cohort / "mixed.csv", out=tmp_path / "defaced", probes=TransformProbes(erase_face),
                  views=VIEWS, size=SIZE, cache_dir=cache, progress=False, pipeline=stages)
    s = r.summary
    assert s["mode"] == "transform" and s["options"]["transform"] == "erase_face"
    gallery = {x.subject: x for x in r.scans if x.role == "gallery"}
    assert set(gallery) == {"vox", "mesh"}
    assert all(g.n_found >= 1 for g in gallery.values())  # the volume and the mesh file show a face
    probes = {x.subject: x for x in r.scans if x.role == "probe-transform"}
    assert probes["vox"].n_found == 0  # the transformed renders: no face
    # a Volume transform cannot take the mesh row: one recorded problem, and the study went on
    assert probes["mesh"].problem is not None and s["failures"]["transform_failed"] == 1
    assert "on='surface'" in probes["mesh"].problem.message
    table = r.participants.set_index("participant")
    assert table.loc["vox", "n_faces"] == 0
    assert table["true_rank"].isna().all()  # defaced (or failed): counted as misses
    assert s["rank1"]["count"] == 0 and s["rank1"]["n"] == 2

    # the control: the same hook with a transform that keeps the face finds the participants
    c = run_study(cohort / "mixed.csv", out=tmp_path / "control",
                  probes=TransformProbes(same_surface, on="surface"),
                  views=VIEWS, size=SIZE, cache_dir=cache, progress=False, pipeline=stages)
    ct = c.participants.set_index("participant")
    assert (ct.loc[["vox", "mesh"], "n_faces"] >= 1).all()
    assert ct.loc[["vox", "mesh"], "true_rank"].notna().all()  # the same face twice: rank 1 or 2
    assert c.summary["rank1"]["count"] >= 1
    assert c.cached == 2  # the gallery came from the first study's cache

    # a rerun of the defacing study is read from the cache, the transform included
    again = run_study(cohort / "mixed.csv", out=tmp_path / "defaced", probes=TransformProbes(erase_face),
                      views=VIEWS, size=SIZE, cache_dir=cache, progress=False, pipeline=stages)
    assert again.computed == 0 and again.cached == 3  # 2 gallery + 1 transformed; the failed row not counted
    # the mesh file's bytes are part of its cache key: a changed file is computed again
    ply = cohort / "vox_skin.ply"
    original = ply.read_bytes()
    try:
        ply.write_bytes(original + b"\n")
        changed = run_study(cohort / "mixed.csv", out=tmp_path / "changed",
                            probes=TransformProbes(same_surface, on="surface"), views=VIEWS, size=SIZE,
                            cache_dir=cache, progress=False, pipeline=stages)
    finally:
        ply.write_bytes(original)
    assert (changed.computed, changed.cached) == (2, 2)  # the mesh's gallery and probe entries; vox's cached


@pytest.mark.slow
def test_a_face_model_and_a_backend_registered_from_outside_run_a_study(cohort, tmp_path):
    from mriface.recognition import available_models
    from mriface.render import available_backends, register_backend, unregister_backend

    register_model("tiny-test", tiny_factory, replace=True)
    register_backend("counting-test", CountingBackend, replace=True)
    assert "tiny-test" in available_models() and "counting-test" in available_backends()
    try:
        r = run_study(cohort / "mixed.csv", out=tmp_path / "tiny", model="tiny-test", backend="counting-test",
                      views=VIEWS, size=SIZE, device="cpu", cache_dir=cohort / "cache", progress=False)
    finally:
        unregister_backend("counting-test")
    assert BUILT and sum(m.calls for m in BUILT) >= 2  # the study embedded with the toy model
    assert CountingBackend.calls >= 4  # and rendered every scan with the toy backend
    assert r.summary["options"]["model"] == "tiny-test" and r.summary["options"]["backend"] == "counting-test"
    gallery = [x for x in r.scans if x.role == "gallery"]
    assert all(x.embeddings.shape == (VIEWS, 48) for x in gallery)
    assert list(r.participants["participant"]) == ["vox", "mesh"]
    assert r.participants["true_rank"].between(1, 2).all()
    # the model's identity is in the cache key: the same study with FaceNet's id would not reuse these
    assert r.computed == 4  # FaceNet's embree entries of the same scans are not reused: model, backend in the key
    assert all(x.n_found >= 1 for x in r.scans)  # MTCNN found faces; the toy model embedded them
