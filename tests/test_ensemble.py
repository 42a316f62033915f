"""Several face models in one study: one detection for all, per-model ranks, best-of-models, fusion, cache.

Fast: the cheap stages of ``tests/test_study.py`` (scans are text files,
renders 4x4 tensors) with toy face models registered here through
:func:`mriface.recognition.register_model`, so the real multi-model paths of
:class:`~mriface.study.Pipeline` (one aligner call, each model's crops and
embeddings, per-model cache entries) run in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from mriface.errors import MRIFaceError
from mriface.fusion import best_of_models, combine, fuse_scores, zscore
from mriface.match import MatchResult, rank_of
from mriface.recognition import CropSpec, register_model
from mriface.study import Pipeline, run_study
from test_study import FakePipeline, _cohort, _identity, _mtimes

TOY_CROP_A = CropSpec(8, "box", "fixed_standardization")
TOY_CROP_B = CropSpec(8, "arcface", "arcface")
EMBEDDED: Counter = Counter()  # model name -> crops embedded
NOTICE = "toy weights: non-commercial research only"


class ToyModel:
    """A face model of the toy renders: identity vector (rotated per model) plus seeded per-view noise."""

    dim = 512

    def __init__(self, name: str, crop: CropSpec, noise: float, licence: str, notice: str = ""):
        self.name, self.crop, self.noise, self.licence, self.licence_notice = name, crop, noise, licence, notice
        self.device = torch.device("cpu")
        self._random = None
        self.rot = np.linalg.qr(np.random.default_rng(len(name)).normal(size=(512, 512)))[0]

    def model_id(self) -> dict:
        return {"name": self.name, "weights_sha256": hashlib.sha256(self.name.encode()).hexdigest()}

    def embed(self, crops):
        EMBEDDED[self.name] += len(crops)
        out = []
        for c in crops:
            ident = int(round(float(c[0, 0, 0]) * 1000))
            noise = np.random.default_rng([int(float(c[0, 0, 1]) * 1e6), len(self.name)]).normal(size=512)
            e = self.rot @ _identity(ident) + self.noise * noise
            out.append(e / np.linalg.norm(e))
        return torch.as_tensor(np.asarray(out, np.float32))


register_model("toy-a", lambda **kw: ToyModel("toy-a", TOY_CROP_A, 0.02, "MIT"), replace=True)
register_model("toy-b", lambda **kw: ToyModel("toy-b", TOY_CROP_B, 0.05, NOTICE, NOTICE), replace=True)


class ToyPipeline(FakePipeline):
    """FakePipeline's stages, with the real Pipeline's face models (the toys above)."""

    model_id = Pipeline.model_id
    embed = Pipeline.embed
    dim = Pipeline.dim

    def __init__(self, model="toy-a,toy-b"):
        Pipeline.__init__(self, device="cpu", backend="embree", model=model)
        self.calls = Counter()
        self.specs_asked: list = []

    def align(self, images):
        al = super().align(images)  # counts one call per batch

        def crop_for(spec):
            self.specs_asked.append(spec)
            return al.crops

        return SimpleNamespace(**vars(al), crop_for=crop_for)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    import mriface.study.cache as cache

    monkeypatch.setattr(cache, "code_digest", lambda *modules: "code:" + ",".join(modules))
    EMBEDDED.clear()


def _study(tmp_path, pipeline, out="out", cache="cache"):
    return run_study(_cohort(tmp_path), out=tmp_path / out, views=3, size=32, progress=False, pipeline=pipeline,
                     cache_dir=tmp_path / cache)


# --------------------------------------------------------------------------- fusion on hand-made scores
def _match(scores: dict, subjects=("A", "B", "C")) -> MatchResult:
    """A MatchResult from participant -> score per subject (participant X's true subject is X)."""
    rows = []
    for pid, s in scores.items():
        s = np.asarray(s, float)
        r = rank_of(s, subjects.index(pid))
        rows.append({"participant": pid, "true_subject": pid, "in_gallery": True, "true_subject_has_face": True,
                     "n_photos": 1, "n_faces": 1, "true_rank": r, "true_score": s[subjects.index(pid)],
                     "rank1": r == 1, "top5": r <= 5, "top5_subjects": "", "top5_scores": ""})
    return MatchResult(pd.DataFrame(), pd.DataFrame(rows), {}, np.zeros(3), float("nan"), tuple(subjects),
                       {p: np.asarray(s, float) for p, s in scores.items()})


def test_zscore_and_fusion_on_hand_made_scores():
    z = zscore([3.0, 2.0, 1.0])
    np.testing.assert_allclose(z, [np.sqrt(1.5), 0.0, -np.sqrt(1.5)])
    np.testing.assert_array_equal(zscore([1.0, 1.0, -np.inf]), [0.0, 0.0, -np.inf])
    fused = fuse_scores([np.array([3.0, 2, 1]), np.array([0.0, 10, 5])])
    np.testing.assert_allclose(fused, [0.0, np.sqrt(1.5) / 2, -np.sqrt(1.5) / 2])
    # a subject only one model can match gets that model's z; none: -inf
    np.testing.assert_allclose(fuse_scores([np.array([1.0, 1, 1]), np.array([-np.inf, 0, 1])]), [0, -0.5, 0.5])
    assert fuse_scores([np.array([-np.inf, 1.0]), np.array([np.nan, 2.0])])[0] == -np.inf
    best, which = best_of_models({"m1": [1, 3, np.nan], "m2": [2, 3, np.nan]})
    np.testing.assert_array_equal(best, [1, 3, np.nan])
    assert which == ["m1", "m1;m2", ""]


def test_best_of_models_and_fusion_ranks_and_rates():
    m1 = _match({"A": [3, 2, 1], "B": [3, 2, 1], "C": [1, 1, 1]})
    m2 = _match({"A": [0, 10, 5], "B": [0, 10, 5], "C": [-np.inf, 0, 1]})
    ens = combine({"m1": m1, "m2": m2})
    t = ens.per_participant.set_index("participant")
    assert t["rank_m1"].tolist() == [1, 2, 3] and t["rank_m2"].tolist() == [3, 1, 1]  # C ties 3-way in m1
    assert t["rank_best_of"].tolist() == [1, 1, 1] and t["best_model"].tolist() == ["m1", "m2", "m2"]
    assert t["rank_fusion"].tolist() == [2, 1, 1]  # A: fused B (0.61) beats A (0)
    s = ens.summary
    assert s["models"]["m1"]["rank1"]["count"] == 1 and s["models"]["m2"]["rank1"]["count"] == 2
    assert s["best-of"]["rank1"]["count"] == 3 and s["fusion"]["rank1"]["count"] == 2
    assert s["fusion"]["rank1"]["n"] == 3 and s["headline"] == "best-of"
    assert ens.table("fusion")["true_rank"].tolist() == [2, 1, 1]
    assert ens.table("best-of")["true_rank"].tolist() == [1, 1, 1]
    assert ens.fused.loc[0, "top5_subjects"] == "B;A;C"
    np.testing.assert_allclose(ens.cmc["fusion"], [2 / 3, 1, 1])
    with pytest.raises(MRIFaceError, match="other subjects"):
        combine({"m1": m1, "m3": _match({"A": [1, 2], "B": [1, 2]}, subjects=("A", "B"))})


# --------------------------------------------------------------------------- the study with several models
def test_models_parsed_and_checked():
    assert ToyPipeline(" toy-a , toy-b").models == ("toy-a", "toy-b")
    assert ToyPipeline(["toy-b"]).model == "toy-b"
    with pytest.raises(MRIFaceError, match="twice"):
        ToyPipeline("toy-a,toy-a")
    with pytest.raises(MRIFaceError, match="unknown face model 'nope'"):
        ToyPipeline("toy-a,nope")
    with pytest.raises(MRIFaceError, match="one model"):
        Pipeline(device="cpu", backend="embree", model="toy-a,toy-b", weights="w.onnx")


def test_several_models_embed_one_detection_each_gets_its_ranks_and_is_named(tmp_path):
    single = ToyPipeline("toy-a")
    r1 = _study(tmp_path, single, out="a")
    EMBEDDED.clear()
    p = ToyPipeline("toy-a,toy-b")
    r = _study(tmp_path, p, out="ab", cache="cache2")
    # one aligner call per batch (4 gallery + 4 probe scans), as with one model; each model embedded every face
    assert p.calls["align"] == single.calls["align"] == 8
    assert EMBEDDED["toy-a"] == EMBEDDED["toy-b"] == 8 * 3
    assert p.specs_asked and set(p.specs_asked) == {TOY_CROP_B}  # the second model cut its own crops
    by_model = pd.read_csv(tmp_path / "ab" / "participants_by_model.csv")
    assert {"rank_toy-a", "rank_toy-b", "rank_best_of", "best_model", "rank_fusion"} <= set(by_model.columns)
    # each model's ranks are those of a study with that model alone
    assert by_model["rank_toy-a"].tolist() == r1.participants["true_rank"].tolist()
    rb = _study(tmp_path, ToyPipeline("toy-b"), out="b", cache="cache3")
    assert by_model["rank_toy-b"].tolist() == rb.participants["true_rank"].tolist()
    probes = pd.read_csv(tmp_path / "ab" / "probes.csv")
    assert set(probes["model"]) == {"toy-a", "toy-b"}
    # headline: the best-of-models (worst case) table, same columns as a single-model study's
    assert list(r.participants.columns) == list(r1.participants.columns)
    assert r.summary["ensemble"]["headline"] == "best-of"
    assert r.summary["rank1"] == r.summary["ensemble"]["best-of"]["rank1"]
    assert r.summary["rank1"]["count"] == 4  # the toy models identify everyone
    _check_models_named(tmp_path / "ab", r, r1)


def _check_models_named(out, r, r1):
    """summary.json and the report name each model with its weights' SHA-256 and licence."""
    models = {m["name"]: m for m in json.loads((out / "summary.json").read_text())["models"]}
    assert set(models) == {"toy-a", "toy-b"}
    for name, m in models.items():
        assert m["weights_sha256"] == hashlib.sha256(name.encode()).hexdigest()
        assert m["rank1"]["n"] == 4 and "count" in m["top5"]
    assert models["toy-a"]["licence"] == "MIT"
    assert models["toy-b"]["licence"] == NOTICE and models["toy-b"]["licence_notice"] == NOTICE
    assert NOTICE in (out / "study.log").read_text()  # said on first use
    report = (out / "report.md").read_text()
    for name in ("toy-a", "toy-b"):
        assert f"face model {name}" in report and hashlib.sha256(name.encode()).hexdigest()[:16] in report
    assert "best-of (headline)" in report and "fusion" in report and NOTICE in report
    # a single-model study names its model too, and has nothing combined
    assert [m["name"] for m in r1.summary["models"]] == ["toy-a"] and "ensemble" not in r1.summary


def test_adding_a_model_reuses_the_other_models_embeddings(tmp_path):
    _study(tmp_path, ToyPipeline("toy-a"))
    assert EMBEDDED["toy-a"] == 24 and EMBEDDED["toy-b"] == 0
    EMBEDDED.clear()
    renders = _mtimes(tmp_path / "cache" / "renders")
    r = _study(tmp_path, ToyPipeline("toy-a,toy-b"))
    assert EMBEDDED["toy-a"] == 0 and EMBEDDED["toy-b"] == 24  # only the new model's embeddings computed
    assert _mtimes(tmp_path / "cache" / "renders") == renders  # the detections' entries are kept as they are
    assert r.computed == 8
    EMBEDDED.clear()
    p = ToyPipeline("toy-b,toy-a")  # another primary: the same per-model entries
    again = _study(tmp_path, p)
    assert sum(EMBEDDED.values()) == 0 and p.calls["render"] == 0 and again.cached == 8 and again.computed == 0
    assert again.summary["ensemble"]["fusion"]["rank1"]["count"] == 4
