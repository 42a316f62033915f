"""The ``adversarial`` defacing method on the analytic phantom with a tiny toy face model (fast, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mriface.deface import available_methods, prepare, run_method
from mriface.deface.adversarial import (DEFAULT_IMPOSTOR_SIMILARITY, check_similarities, stranger_target,
                                       warp_volume_near_skin)
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


def test_stranger_target_is_fixed_per_scan_and_spreads_like_a_stranger():
    t1, z1 = stranger_target(0, b"scan-a")
    assert stranger_target(0, b"scan-a") == (t1, z1)  # reproducible
    assert stranger_target(0, b"scan-b") != (t1, z1) and stranger_target(1, b"scan-a") != (t1, z1)
    draws = np.array([stranger_target(0, f"scan-{i}", offset=0.13, sd=0.07)[0] for i in range(4000)])
    assert abs(draws.mean() + 0.13) < 0.005  # centred on the strangers' level below the impostors
    assert 0.9 * 0.07 < draws.std() < 0.07  # the strangers' spread (a normal cut at +-2 sd is a little narrower)
    assert draws.min() >= -0.13 - 2 * 0.07 - 1e-9 and draws.max() <= -0.13 + 2 * 0.07 + 1e-9


def test_check_similarities_score_like_a_study_leave_one_out():
    # 3 views; the defaced render of view 0 equals the original's view 0 (a same-view match that a
    # gallery never offers) and sits at cosine 0.6 to the original's view 1
    u = torch.eye(4)
    orig = torch.stack([u[0], 0.6 * u[0] + 0.8 * u[1], u[2]])
    e = torch.stack([u[0], u[3], u[3]])
    imp = torch.stack([0.5 * u[0] + (0.75 ** 0.5) * u[2]])
    own, impostor = check_similarities(e, [True, False, False], orig, [True, True, True], imp)
    assert own == pytest.approx(0.6) and impostor == pytest.approx(0.5)
    # a view where the original had no face is not a gallery render
    own, _ = check_similarities(e, [True, False, False], orig, [True, False, True], imp)
    assert own == pytest.approx(0.0)
    assert np.isnan(check_similarities(e, [False] * 3, orig, [True] * 3, imp)[0])  # no face in the defaced renders
    assert check_similarities(e, [True, False, False], orig, [True] * 3, None)[1] == DEFAULT_IMPOSTOR_SIMILARITY


def test_result_records_the_target_it_aimed_at(phantom, context):
    res = run_method("adversarial", phantom, context=context, max_displacement_mm=3.0, target_gap=-0.25, **FAST)
    info = res.info
    assert info["target_gap"] == -0.25 and info["stranger_z"] is None
    assert info["checks"][0]["goal"] == -0.25  # the first round aims the pool's gap at the target itself
    gap = info["checks"][-1]["gap"]
    assert info["target_met"] == bool(abs(gap + 0.25) <= 0.03)  # NaN on the phantom (MTCNN finds no face): not met


def test_stranger_calibration_reads_the_offset_and_spread_off_a_study():
    from benchmarks.calibrate_stranger import constants, participant_scores

    # two defaced participants against a gallery of four; the study's rows: one per render and subject
    rows = []
    table = {"a": {"a": [0.50, 0.40], "b": [0.40, 0.40], "c": [0.30, 0.30], "d": [0.50, 0.50]},
             "b": {"a": [0.20, 0.20], "b": [0.35, 0.35], "c": [0.30, 0.30], "d": [0.40, 0.40]}}
    for p, subj in table.items():
        for s, sims in subj.items():
            rows += [{"model": "facenet", "face_found": "True", "participant": p, "subject": s, "similarity": v}
                     for v in sims]
    rows.append({"model": "facenet", "face_found": "False", "participant": "a", "subject": "a", "similarity": 0.99})
    rows.append({"model": "arcface-mbf", "face_found": "True", "participant": "a", "subject": "a", "similarity": 0.99})
    scores = participant_scores(rows, "facenet")
    assert scores["a"]["a"] == pytest.approx(0.45)  # mean over renders with a face, this model only
    out = constants(scores, {"a": -0.10, "b": -0.05})
    # own - strangers: a 0.45 - 0.4 = 0.05, b 0.35 - 0.3 = 0.05; gap - that: -0.15 and -0.10 -> offset 0.125
    assert out["participants"] == 2 and out["offset"] == pytest.approx(0.125)
    assert out["sd"] == pytest.approx(np.mean([np.std([0.4, 0.3, 0.5]), np.std([0.2, 0.3, 0.4])]), abs=1e-4)
    one_model = [{k: v for k, v in r.items() if k != "model"} for r in rows if r["model"] == "facenet"]
    assert participant_scores(one_model, "facenet") == scores  # a one-model study writes no model column
