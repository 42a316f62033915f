"""The ``adversarial`` defacing method on the analytic phantom with a tiny toy face model (fast, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mriface.deface import available_methods, prepare, run_method
from mriface.deface.adversarial import warp_volume_near_skin
from mriface.recognition import ARCFACE_CROP, register_model
from mriface.volume import Volume
from tests.phantoms import head_phantom, voxel_of


class ToyFaceModel(torch.nn.Module):
    """A fixed random conv net: enough structure for the gradients to have somewhere to go."""

    name = "toy-adversarial"
    dim = 16
    crop = ARCFACE_CROP
    licence = "MIT"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)
        self.fc = torch.nn.Linear(8 * 27 * 27, self.dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.device = torch.device("cpu")
        self.requires_grad_(False)

    def model_id(self) -> dict:
        return {"name": self.name, "weights": "random", "seed": 0}

    def embed_differentiable(self, crops: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(crops))
        return torch.nn.functional.normalize(self.fc(x.flatten(1)), dim=1)

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        return self.embed_differentiable(crops)


register_model("toy-adversarial", lambda **kw: ToyFaceModel(), replace=True)

FAST = dict(model="toy-adversarial", steps=4, views=2, batch_views=2, image_size=96, device="cpu", lr=0.5,
            target_faces=20000, rounds=1, check_views=2, check_size=96, impostor_views=2)


@pytest.fixture(scope="module")
def phantom():
    vol, _ = head_phantom((2.0, 2.0, 2.0), seed=0)
    return vol


@pytest.fixture(scope="module")
def context(phantom):
    return prepare(phantom)


@pytest.fixture(scope="module")
def result(phantom, context):
    return run_method("adversarial", phantom, context=context, max_displacement_mm=3.0, **FAST)


def test_adversarial_is_registered():
    assert "adversarial" in available_methods()


def test_face_changes_brain_is_byte_identical_and_bound_holds(phantom, context, result):
    before, after = phantom.data, result.volume.data
    assert np.array_equal(after[context.brain], before[context.brain])  # byte-identical brain
    assert result.changed_in_brain == 0 and result.blocked_in_brain == 0
    changed = after != before
    assert changed.sum() > 100
    assert not (changed & ~context.face).any()  # only the face region changes
    info = result.info
    assert 0 < info["max_displacement_mm"] <= 3.0 + 1e-6
    assert info["max_displacement_mm_bound"] == 3.0
    assert result.summary()["method_info"]["max_displacement_mm"] == info["max_displacement_mm"]


def test_optimisation_lowers_own_identity_similarity(result):
    info = result.info
    assert info["similarity_to_identity_end"] < info["similarity_to_identity_start"] - 0.02, info
    # the rank-aware objective had impostor references (the average heads), and the written-back volume was checked
    assert info["impostors"] and all(-1 <= r["similarity_to_original"] <= 1 for r in info["impostors"])
    assert info["checks"] and info["checks"][-1]["views"] == 2
    # the volume carries the edit: its re-extracted skin sits nearer the optimised skin than the original
    v = info["verify"]
    assert v["moved_vertices_reextracted_to_optimised_mm_median"] < v["moved_vertices_reextracted_to_original_mm_median"]


def test_warp_moves_an_iso_surface_by_the_displacement():
    # a bright half-space x < 0 on a 1 mm grid; pushing its boundary (normal +x) out by 2 mm moves the edge
    n = 40
    x = np.arange(n) - n / 2
    data = np.broadcast_to((x < 0).astype(np.float32)[:, None, None], (n, n, n)).copy()
    aff = np.eye(4)
    aff[:3, 3] = -n / 2
    vol = Volume(data, aff, "mr", None)
    g = np.stack(np.meshgrid(np.arange(-5, 6.0), np.arange(-5, 6.0), indexing="ij"), -1).reshape(-1, 2)
    verts = np.column_stack([np.full(len(g), -0.5), g])
    normals = np.tile([1.0, 0.0, 0.0], (len(g), 1))
    out = warp_volume_near_skin(vol, np.ones(data.shape, bool), verts, normals, np.full(len(g), 2.0), shell_mm=6.0)
    line_before, line_after = data[:, n // 2, n // 2], out[:, n // 2, n // 2]
    edge = lambda line: x[np.flatnonzero(line >= 0.5).max()]  # noqa: E731
    assert edge(line_after) == edge(line_before) + 2
    assert np.array_equal(out[:, 0, 0], data[:, 0, 0])  # far from the moved patch: unchanged
