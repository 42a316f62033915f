"""Per-scan latency work (issue 11): warm-up at load, FaceNet's folded channels-last network, threaded surface steps.

No timing asserts: what is checked is that the warm-up ran (a counter), and
that each faster path gives the results of the plain one (bit-identical, or
within the stated float32 tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mriface.recognition import FACENET_CROP, register_model
from mriface.study import Pipeline


class CountingModel:
    """A toy face model that counts its calls and the batch sizes it saw."""

    name = "counting-test"
    dim = 8
    crop = FACENET_CROP
    licence = "CC0-1.0"
    built: list = []

    def __init__(self):
        self.device = torch.device("cpu")
        self.batches: list[int] = []
        type(self).built.append(self)

    def model_id(self):
        return {"name": self.name}

    def embed(self, crops):
        self.batches.append(int(crops.shape[0]))
        e = crops.float().mean(dim=(2, 3)).repeat(1, 3)[:, :8] + 1.0
        return torch.nn.functional.normalize(e, dim=1)


def test_prepare_runs_the_aligner_and_each_face_model_once_on_a_dummy_batch():
    register_model("counting-test", lambda **kw: CountingModel(), replace=True)
    CountingModel.built.clear()
    pipe = Pipeline(device="cpu", backend="embree", model="counting-test")
    assert pipe.warmups == 0
    pipe.prepare(64)
    (model,) = CountingModel.built
    assert model.batches == [2]  # the warm-up batch: two black crops
    assert pipe.warmups == 2  # the aligner for 64-px renders, and the face model
    pipe.prepare(64)  # warmed once: nothing runs again
    assert model.batches == [2] and pipe.warmups == 2
    pipe.prepare(320)  # renders of another size (smallest face 40 px, not 20) get their own aligner, warmed in turn; the model is warm
    assert model.batches == [2] and pipe.warmups == 3
    # the first real call is the model's second call
    emb = pipe.embed(torch.zeros(3, 3, 160, 160))
    assert emb.shape == (3, 8) and model.batches == [2, 3]


@pytest.mark.slow
def test_facenet_runs_a_folded_channels_last_copy_with_the_plain_networks_embeddings():
    from mriface.recognition.facenet.embedder import FaceNetEmbedder

    emb = FaceNetEmbedder(device="cpu", random_weights=True, seed=0)
    crops = torch.randn(4, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    got = emb.embed(crops)
    net, layout = emb._runner()
    assert net is not emb.model and layout == torch.channels_last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # every batch norm folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in emb.model.modules())  # the model itself unchanged
    with torch.no_grad():
        ref = torch.nn.functional.normalize(emb.model(crops), dim=1)
    assert float((got - ref).abs().max()) < 1e-5
    assert emb._runner()[0] is net  # built once
    emb.model = FaceNetEmbedder.from_model(emb.model, device="cpu").model  # a replaced network: rebuilt
    assert emb._runner()[0] is not net


def test_threaded_surface_steps_give_the_bits_of_one_thread(monkeypatch):
    from mriface.surface import field

    a = np.random.default_rng(0).random((70, 66, 68), dtype=np.float32)
    w = field._gauss_kernel(1.3)
    results = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        res = [field._resample_axis_np(a, ax, 0.37, 0.83, 75) for ax in range(3)]
        for ax in range(3):
            out = np.empty_like(a)
            field._correlate1d(a, w, ax, out)
            res.append(out)
        results[threads] = res
    from scipy import ndimage as ndi

    for ax in range(3):  # one thread is scipy's own call
        assert np.array_equal(results["1"][3 + ax], ndi.correlate1d(a, w, axis=ax, mode="nearest"))
    for threads in ("2", "3"):
        for x, y in zip(results["1"], results[threads]):
            assert x.shape == y.shape and np.array_equal(x, y)
