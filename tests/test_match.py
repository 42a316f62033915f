"""Matching arithmetic on hand-built embeddings: the study's procedure, ties, failures, statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from mriface import match
from mriface.errors import MRIFaceError

D = 8


def basis(i: int) -> np.ndarray:
    v = np.zeros(D)
    v[i] = 1.0
    return v


def mix(**weights: float) -> np.ndarray:
    """A unit probe whose cosine with subject ``sX`` (basis vector X) is weights[X] (rest on axis 7)."""
    v = np.zeros(D)
    for name, w in weights.items():
        v[int(name[1:])] = w
    rest = 1.0 - np.sum(v ** 2)
    assert rest >= -1e-12
    v[7] = np.sqrt(max(rest, 0.0))
    return v


def conf(c: float) -> float:
    return (1.0 + c) / 2.0


GALLERY = {f"s{i}": basis(i)[None] for i in range(4)}


def test_cosine_similarity_and_nan_rows():
    a = np.array([[3.0, 0, 0], [1, 1, 0], [np.nan, 0, 0]])
    b = np.array([[2.0, 0, 0], [0, 5, 0]])
    s = match.cosine_similarity(a, b)
    np.testing.assert_allclose(s[:2], [[1, 0], [2 ** -0.5, 2 ** -0.5]])
    assert np.isnan(s[2]).all()


def test_render_aggregation():
    renders = np.stack([basis(0), basis(1)])
    probe = mix(s0=0.8, s1=0.2)[None]
    np.testing.assert_allclose(match.subject_similarity(probe, renders, "max"), [0.8])
    np.testing.assert_allclose(match.subject_similarity(probe, renders, "mean"), [0.5])
    np.testing.assert_allclose(match.subject_similarity(probe, renders, "centroid"), [(0.8 + 0.2) / np.sqrt(2)])
    rng = np.random.default_rng(3)  # the vectorised gallery path agrees with the per-subject definition
    gallery = [rng.normal(size=(n, D)) for n in (1, 4, 2)]
    probes = rng.normal(size=(5, D))
    for agg in match.RENDER_AGGS:
        expect = np.stack([match.subject_similarity(probes, g, agg) for g in gallery], 1)
        np.testing.assert_allclose(match._similarity_matrix(probes, gallery, agg), expect, atol=1e-12)
    with pytest.raises(MRIFaceError, match="render_agg"):
        match.run_matching(GALLERY, {"s0": [basis(0)]}, render_agg="median")


def test_study_procedure_per_photo_top_k_then_sum():
    # photo 1 lists s0 > s1 > s2 > s3, photo 2 lists s2 > s1 > s3 > s0
    photos = [mix(s0=0.9, s1=0.3, s2=0.2, s3=0.1), mix(s0=0.0, s1=0.45, s2=0.8, s3=0.1)]
    sims = [{"s0": 0.9, "s1": 0.3, "s2": 0.2, "s3": 0.1}, {"s0": 0.0, "s1": 0.45, "s2": 0.8, "s3": 0.1}]
    for k in (1, 2, 3, 4):
        res = match.run_matching(GALLERY, {"s1": photos}, k=k)
        totals = {s: 0.0 for s in GALLERY}
        for sim in sims:  # the study: only a photo's top-k candidates get its score
            for s in sorted(sim, key=lambda s: -sim[s])[:k]:
                totals[s] += conf(sim[s])
        order = sorted(totals, key=lambda s: (-totals[s], s))
        row = res.per_participant.iloc[0]
        expect_rank = 1 + sum(totals[s] > totals["s1"] for s in totals) + \
            sum(totals[s] == totals["s1"] for s in totals if s != "s1")
        assert row.true_rank == expect_rank, (k, totals)
        assert row.top5_subjects.split(";") == order
        assert row.true_score == pytest.approx(totals["s1"])
        lists = res.per_probe
        assert len(lists) == 2 * k and lists.groupby("photo")["rank"].max().tolist() == [k, k]
        assert lists.loc[lists.photo == 0, "subject"].tolist() == ["s0", "s1", "s2", "s3"][:k]
        np.testing.assert_allclose(lists.confidence, conf(lists.similarity))
    # k = 1: s1 is in no list, so it ties at 0 with s3 (pessimistic rank 4); k = 2: s1 wins
    assert match.run_matching(GALLERY, {"s1": photos}, k=1).per_participant.true_rank[0] == 4
    assert match.run_matching(GALLERY, {"s1": photos}, k=2).per_participant.true_rank[0] == 1


def test_sum_over_everything_ranks_like_mean():
    rng = np.random.default_rng(1)
    gallery = {f"g{i}": rng.normal(size=(3, D)) for i in range(6)}
    probes = {f"g{i}": list(rng.normal(size=(4, D))) for i in range(6)}
    a = match.run_matching(gallery, probes, k=6, photo_agg="sum")
    b = match.run_matching(gallery, probes, k=6, photo_agg="mean")
    assert a.per_participant.true_rank.tolist() == b.per_participant.true_rank.tolist()
    assert a.per_participant.top5_subjects.tolist() == b.per_participant.top5_subjects.tolist()
    m = match.run_matching(gallery, probes, photo_agg="max", render_agg="max")
    for pid, plist in probes.items():  # max over photos of max over renders
        scores = {s: match.cosine_similarity(np.stack(plist), g).max() for s, g in gallery.items()}
        assert m.per_participant.set_index("participant").true_score[pid] == pytest.approx(scores[pid])


def test_ties_are_broken_by_id_in_lists_and_pessimistically_in_ranks():
    twin = basis(0)[None]
    gallery = {"b": twin, "a": twin.copy(), "c": basis(1)[None]}
    res = match.run_matching(gallery, {"a": [basis(0)], "b": [basis(0)]})
    assert res.per_probe.loc[res.per_probe.participant == "b", "subject"].tolist() == ["a", "b", "c"]
    assert res.per_participant.true_rank.tolist() == [2, 2]  # a tie is never a success
    assert res.summary["rank1"]["count"] == 0 and res.summary["top5"]["count"] == 2
    assert match.rank_of(np.array([0.5, 0.5, 0.5, 0.9]), 0) == 4
    assert match.top_k(np.array([0.5, 0.5, np.nan, 0.9]), ["z", "y", "x", "w"], 3) == [3, 1, 0]


def test_missing_faces_unknown_participants_and_defaced_subjects():
    gallery = {"s0": GALLERY["s0"], "s1": GALLERY["s1"], "s2": None, "s3": np.stack([basis(3), np.full(D, np.nan)])}
    probes = {
        "s0": [basis(0), None, np.full(D, np.nan)],  # 2 of 3 photos without a face
        "s1": [None, None],                          # no face at all: unrankable, still counted
        "s2": [basis(2)],                            # defaced scan: can never be matched
        "s3": [mix(s3=0.9, s0=0.1)],
        "x9": [basis(1)],                            # nobody in the gallery
    }
    res = match.run_matching(gallery, probes)
    pp = res.per_participant.set_index("participant")
    assert pp.loc["s0", "true_rank"] == 1 and pp.loc["s0", "n_faces"] == 1 and pp.loc["s0", "n_photos"] == 3
    assert np.isnan(pp.loc["s1", "true_rank"]) and pp.loc["s1", "top5_subjects"] == ""
    assert np.isnan(pp.loc["s2", "true_rank"]) and not pp.loc["s2", "true_subject_has_face"]
    assert "s2" not in pp.loc["s2", "top5_subjects"].split(";")
    assert not pp.loc["x9", "in_gallery"]
    s = res.summary
    assert s["n_participants"] == 5 and s["n_evaluated"] == 4 and s["n_rankable"] == 2
    assert s["rank1"]["count"] == 2 and s["rank1"]["n"] == 4
    f = s["failures"]
    assert f["no_face_photos"] == 4
    assert f["participants_without_faces"] == ["s1"]
    assert f["not_in_gallery"] == ["x9"]
    assert f["true_subject_without_face"] == ["s2"]
    assert f["gallery_subjects_without_face"] == ["s2"]
    assert f["gallery_renders_without_face"] == 1
    # a photograph without a face keeps its row
    nf = res.per_probe[~res.per_probe.face_found]
    assert sorted(zip(nf.participant, nf.photo)) == [("s0", 1), ("s0", 2), ("s1", 0), ("s1", 1)]
    # CMC counts the unrankable in the denominator
    np.testing.assert_allclose(res.cmc, [0.5, 0.5, 0.5, 0.5])


def test_truth_mapping():
    res = match.run_matching(GALLERY, {"p1": [basis(2)], "p2": [basis(0)]}, truth={"p1": "s2"})
    pp = res.per_participant.set_index("participant")
    assert pp.loc["p1", "true_rank"] == 1 and pp.loc["p1", "true_subject"] == "s2"
    assert not pp.loc["p2", "in_gallery"]  # not in the truth map: no known subject


def test_clopper_pearson_matches_scipy_exact_interval():
    for x, n in [(70, 84), (80, 84), (0, 10), (10, 10), (1, 1), (3, 157)]:
        ci = binomtest(x, n).proportion_ci(confidence_level=0.95, method="exact")
        np.testing.assert_allclose(match.clopper_pearson(x, n), (ci.low, ci.high), rtol=1e-9, atol=1e-12)
    assert all(np.isnan(match.clopper_pearson(0, 0)))


def test_roc_auc_and_cmc():
    assert match.roc_auc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
    assert match.roc_auc([0.1], [0.5, 0.6]) == 0.0
    assert match.roc_auc([0.5], [0.5]) == 0.5
    assert match.roc_auc([0.7, 0.2], [0.5]) == 0.5
    assert np.isnan(match.roc_auc([], [0.1]))
    np.testing.assert_allclose(match.cmc_curve([1, 3, np.nan, 2], 4), [0.25, 0.5, 0.75, 0.75])


def test_results_write_csv_and_strict_json(tmp_path):
    res = match.run_matching(GALLERY, {"s0": [basis(0), None], "zz": [basis(1)]})
    paths = res.to_csv(tmp_path / "out")
    assert set(paths) == {"per_probe", "per_participant", "cmc", "summary"}
    summary = json.loads(paths["summary"].read_text())
    assert summary["rank1"]["count"] == 1 and summary["failures"]["not_in_gallery"] == ["zz"]
    import pandas as pd
    back = pd.read_csv(paths["per_participant"])
    assert back.participant.tolist() == ["s0", "zz"]
    # genuine s0-s0 = 1 ties the impostor zz-s1 = 1 (half), beats the 6 others at 0
    assert res.summary["roc_auc"] == pytest.approx(6.5 / 7)
