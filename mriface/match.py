"""Matching photographs against a gallery of rendered scans, the way the study did.

The study (Schwarz et al., NEJM 2019): for each photograph the face
recognition service returned the 50 closest gallery faces with a confidence
score; the scores were summed over a participant's photographs to rank the
candidate scans; the result is the rank of the participant's own scan
(rank 1: 70/84, top 5: 80/84).

:func:`run_matching` reproduces that with FaceNet embeddings:

1. **Photo-to-subject similarity.** Cosine similarity between the photo's
   embedding and each gallery subject, whose several renders are aggregated
   by ``render_agg``: ``"max"`` (best render), ``"mean"`` (mean of the
   per-render similarities) or ``"centroid"`` (similarity to the normalised
   mean render embedding). Default :data:`DEFAULT_RENDER_AGG`; see
   ``docs/recognition.md`` for the measurement behind it.
2. **Per-photograph top-k list** (k = 50): subjects sorted by similarity,
   highest first, ties broken by subject id (ascending string order), with
   ``confidence = (1 + cosine) / 2`` in [0, 1] as the list's score.
3. **Participant ranking**, ``photo_agg``:

   * ``"sum"`` (the study): a candidate's score is the sum of its confidences
     over the participant's photographs, counting 0 for a photograph whose
     top-k list does not contain it. Because confidence >= 0, being listed
     never costs a candidate anything.
   * ``"mean"`` / ``"max"``: mean / max of the full (not truncated) cosine
     similarity over the photographs that have a face.

4. **Rank of the true subject** among all gallery subjects that have an
   embedding, *pessimistic under ties*: ``1 + #(higher) + #(equal, other)``,
   so a tie never counts as a success. Displayed lists break ties by id.

Failures are results, never dropped:

* a photograph with no face (``None`` or NaN embedding) adds nothing; a
  participant with no face in any photograph cannot be ranked (failure);
* a gallery subject with no embedding (a defaced scan: no render had a face)
  stays in the gallery, can never be matched, and its participant counts as
  a failure;
* a participant whose true subject is not in the gallery is reported and
  left out of the rates' denominator (there is nothing to find).

Rates ``rank1`` and ``top5`` (and ``topk``) are counts over the participants
whose true subject is in the gallery, with exact Clopper-Pearson 95%
intervals (the beta quantiles of ``scipy.stats.beta``, computed with
``scipy.special.betaincinv``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ._io import jsonable, write_csv_atomic, write_text_atomic
from .errors import MRIFaceError

__all__ = [
    "DEFAULT_K",
    "DEFAULT_RENDER_AGG",
    "PHOTO_AGGS",
    "RENDER_AGGS",
    "MatchResult",
    "cosine_similarity",
    "subject_similarity",
    "confidence",
    "top_k",
    "rank_of",
    "clopper_pearson",
    "cmc_curve",
    "roc_auc",
    "run_matching",
]

DEFAULT_K = 50
RENDER_AGGS = ("max", "mean", "centroid")
PHOTO_AGGS = ("sum", "mean", "max")
#: chosen by measurement, see docs/recognition.md
DEFAULT_RENDER_AGG = "max"
#: recorded in every summary
TIE_RULE = ("lists: score descending, then subject id ascending; "
            "true rank: pessimistic, 1 + #higher + #tied others")


# --------------------------------------------------------------------------- similarity
def _as_rows(x: object, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise MRIFaceError(f"{name}: embeddings must be (n, d) or (d,), got shape {a.shape}")
    return a


def cosine_similarity(a: object, b: object) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    Parameters
    ----------
    a, b : array-like
        (n, d) and (m, d) embeddings (need not be normalised).

    Returns
    -------
    numpy.ndarray
        (n, m) float64 in [-1, 1]; NaN for a row that is NaN or all zero.
    """
    a, b = _as_rows(a, "a"), _as_rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise MRIFaceError(f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}")
    with np.errstate(invalid="ignore", divide="ignore"):
        na = a / np.linalg.norm(a, axis=1, keepdims=True)
        nb = b / np.linalg.norm(b, axis=1, keepdims=True)
        return np.clip(na @ nb.T, -1.0, 1.0)


def confidence(similarity: "np.ndarray | float") -> "np.ndarray | float":
    """The list score: ``(1 + cosine) / 2``, in [0, 1], monotone in the cosine."""
    return (1.0 + np.asarray(similarity)) / 2.0


def _valid_renders(emb: object) -> tuple[np.ndarray, int]:
    """Rows of a subject's render embeddings that have a face, and how many had none."""
    if emb is None:
        return np.zeros((0, 0)), 0
    a = np.asarray(emb, dtype=np.float64)
    if a.size == 0:
        return np.zeros((0, a.shape[-1] if a.ndim == 2 else 0)), 0
    a = _as_rows(a, "gallery")
    ok = np.all(np.isfinite(a), axis=1) & (np.linalg.norm(np.nan_to_num(a), axis=1) > 0)
    return a[ok], int((~ok).sum())


def subject_similarity(probes: np.ndarray, renders: np.ndarray, render_agg: str = DEFAULT_RENDER_AGG) -> np.ndarray:
    """Similarity of each probe to one gallery subject from its renders.

    Parameters
    ----------
    probes : numpy.ndarray
        (p, d) probe embeddings.
    renders : numpy.ndarray
        (r, d) the subject's render embeddings with a face (r >= 1).
    render_agg : {"max", "mean", "centroid"}

    Returns
    -------
    numpy.ndarray
        (p,) cosine similarities.
    """
    if render_agg == "centroid":
        unit = renders / np.linalg.norm(renders, axis=1, keepdims=True)
        return cosine_similarity(probes, unit.mean(axis=0))[:, 0]
    sims = cosine_similarity(probes, renders)
    if render_agg == "max":
        return sims.max(axis=1)
    if render_agg == "mean":
        return sims.mean(axis=1)
    raise MRIFaceError(f"render_agg={render_agg!r}: choose one of {', '.join(RENDER_AGGS)}")


def _similarity_matrix(probes: np.ndarray, renders: "list[np.ndarray]", render_agg: str) -> np.ndarray:
    """(p, d) probes against S subjects' (r_s, d) renders (r_s >= 1) -> (p, S), as :func:`subject_similarity`."""
    if not renders:
        return np.zeros((len(probes), 0))
    unit = [r / np.linalg.norm(r, axis=1, keepdims=True) for r in renders]
    pu = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    if render_agg == "centroid":
        cent = np.stack([u.mean(axis=0) for u in unit])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
        return np.clip(pu @ cent.T, -1.0, 1.0)
    sims = np.clip(pu @ np.concatenate(unit).T, -1.0, 1.0)
    starts = np.cumsum([0] + [len(u) for u in unit[:-1]])
    if render_agg == "max":
        return np.maximum.reduceat(sims, starts, axis=1)
    return np.add.reduceat(sims, starts, axis=1) / np.asarray([len(u) for u in unit])


# --------------------------------------------------------------------------- ranking
def top_k(scores: np.ndarray, subjects: Sequence[str], k: int) -> list[int]:
    """Indices of the ``k`` best subjects: score descending, ties by subject id.

    NaN and -inf scores (subjects that cannot be matched) are never listed.
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = sorted((i for i in range(len(subjects)) if np.isfinite(scores[i])),
                   key=lambda i: (-scores[i], str(subjects[i])))
    return order[:k]


def rank_of(scores: np.ndarray, index: int) -> float:
    """Pessimistic rank (1 = best) of ``scores[index]`` among the finite scores.

    ``1 + #(scores > s) + #(scores == s, others)``; NaN if ``scores[index]``
    is not finite (that subject cannot be matched).
    """
    scores = np.asarray(scores, dtype=np.float64)
    s = scores[index]
    if not np.isfinite(s):
        return float("nan")
    finite = scores[np.isfinite(scores)]
    return float(1 + np.sum(finite > s) + np.sum(finite == s) - 1)


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial confidence interval for ``successes / n``.

    Returns (low, high); (nan, nan) when ``n == 0``.
    """
    from scipy.special import betaincinv  # the beta quantile, = scipy.stats.beta.ppf(q, a, b)

    if n <= 0:
        return float("nan"), float("nan")
    alpha = 1.0 - level
    x = int(successes)
    low = 0.0 if x == 0 else float(betaincinv(x, n - x + 1, alpha / 2))
    high = 1.0 if x == n else float(betaincinv(x + 1, n - x, 1 - alpha / 2))
    return low, high


def cmc_curve(true_ranks: Sequence[float], n_gallery: int) -> np.ndarray:
    """Cumulative match characteristic: ``cmc[r - 1]`` = share of participants with rank <= r.

    Unrankable participants (NaN rank) count in the denominator and never match.
    """
    ranks = np.asarray(true_ranks, dtype=np.float64)
    if ranks.size == 0 or n_gallery <= 0:
        return np.zeros(max(n_gallery, 0))
    r = np.arange(1, n_gallery + 1)
    ok = np.where(np.isfinite(ranks), ranks, np.inf)
    return (ok[None, :] <= r[:, None]).mean(axis=1)


def roc_auc(genuine: Sequence[float], impostor: Sequence[float]) -> float:
    """Area under the verification ROC (Mann-Whitney; ties count one half). NaN if a side is empty."""
    g = np.asarray(genuine, dtype=np.float64)
    i = np.asarray(impostor, dtype=np.float64)
    g, i = g[np.isfinite(g)], i[np.isfinite(i)]
    if g.size == 0 or i.size == 0:
        return float("nan")
    values, inverse, counts = np.unique(np.concatenate([g, i]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average rank of each tie group
    return float((ranks[: g.size].sum() - g.size * (g.size + 1) / 2) / (g.size * i.size))


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class MatchResult:
    """Everything :func:`run_matching` computes.

    Attributes
    ----------
    per_probe : pandas.DataFrame
        Long format, one row per (photograph, list entry): ``participant``,
        ``photo`` (index within the participant), ``face_found``, ``rank``
        (1..k), ``subject``, ``similarity`` (cosine), ``confidence``. A
        photograph without a face has one row with ``face_found=False`` and
        empty list fields.
    per_participant : pandas.DataFrame
        ``participant``, ``true_subject``, ``in_gallery``,
        ``true_subject_has_face``, ``n_photos``, ``n_faces``, ``true_rank``
        (NaN if not rankable), ``true_score``, ``rank1``, ``top5``,
        ``top5_subjects`` and ``top5_scores`` (``;``-separated).
    summary : dict
        Counts, rates with 95% CIs, failures by kind, settings (JSON-able).
    cmc : numpy.ndarray
        (n_gallery,) CMC curve over the evaluated participants.
    roc_auc : float
        Verification AUC over all (photograph with a face, gallery subject
        with an embedding) pairs, genuine = same identity.
    subjects : tuple of str
        The gallery subjects, in the order of :attr:`participant_scores`.
    participant_scores : dict
        Participant id (str) -> (n_gallery,) float64 score of every subject
        (``photo_agg``'s score; -inf = cannot be matched): what
        :mod:`mriface.fusion` combines over several models.
    """

    per_probe: pd.DataFrame
    per_participant: pd.DataFrame
    summary: dict
    cmc: np.ndarray
    roc_auc: float
    subjects: tuple = ()
    participant_scores: Mapping[str, np.ndarray] = field(default_factory=dict)

    def to_csv(self, folder: "str | os.PathLike[str]") -> dict[str, Path]:
        """Write ``per_probe.csv``, ``per_participant.csv``, ``cmc.csv`` and ``summary.json`` atomically."""
        folder = Path(folder)
        out = {}
        for name, df in (("per_probe", self.per_probe), ("per_participant", self.per_participant),
                         ("cmc", pd.DataFrame({"rank": np.arange(1, len(self.cmc) + 1), "rate": self.cmc}))):
            path = folder / f"{name}.csv"
            write_csv_atomic(df, path)  # cells neutralised against spreadsheet formulas
            out[name] = path
        text = json.dumps(jsonable(self.summary), indent=2, allow_nan=False)
        out["summary"] = write_text_atomic(folder / "summary.json", text + "\n")
        return out


def _rate(count: int, n: int) -> dict:
    low, high = clopper_pearson(count, n)
    return {"count": int(count), "n": int(n), "rate": (count / n) if n else float("nan"),
            "ci95_low": low, "ci95_high": high}


def _probe_rows(probe_list: Sequence[object], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_photos, d) array (NaN rows for no face) and (n_photos,) bool face mask."""
    rows, mask = [], []
    dim = None
    for j, e in enumerate(probe_list):
        if e is None:
            rows.append(None)
            mask.append(False)
            continue
        a = np.asarray(e, dtype=np.float64).reshape(-1)
        ok = bool(a.size and np.all(np.isfinite(a)) and np.linalg.norm(a) > 0)
        rows.append(a)
        mask.append(ok)
        if dim is None:
            dim = a.size
        elif a.size != dim:
            raise MRIFaceError(f"participant {name!r}, photo {j}: embedding size {a.size}, others {dim}")
    d = dim or 1
    arr = np.full((len(rows), d), np.nan)
    for j, a in enumerate(rows):
        if a is not None and mask[j]:
            arr[j] = a
    return arr, np.asarray(mask, dtype=bool)


def run_matching(
    gallery: Mapping[str, "np.ndarray | None"],
    probes: Mapping[str, Sequence["np.ndarray | None"]],
    *,
    truth: "Mapping[str, str] | None" = None,
    k: int = DEFAULT_K,
    photo_agg: str = "sum",
    render_agg: str = DEFAULT_RENDER_AGG,
) -> MatchResult:
    """Rank gallery subjects for every participant; the study's procedure by default.

    Parameters
    ----------
    gallery : mapping
        Subject id -> (n_renders, 512) render embeddings; ``None``, an empty
        array or all-NaN rows = no render had a face (still in the gallery,
        never matchable). NaN rows (renders without a face) are skipped and
        counted.
    probes : mapping
        Participant id -> sequence of photograph embeddings (512,), ``None``
        or NaN for a photograph without a face.
    truth : mapping, optional
        Participant id -> true subject id. Default: the participant id is
        the subject id. A participant missing from ``truth`` has no known
        subject (reported as not in the gallery).
    k : int
        Length of each photograph's candidate list (the study: 50).
    photo_agg : {"sum", "mean", "max"}
        Aggregation over a participant's photographs (module docstring).
    render_agg : {"max", "mean", "centroid"}
        Aggregation over a subject's renders.

    Returns
    -------
    MatchResult
    """
    if photo_agg not in PHOTO_AGGS:
        raise MRIFaceError(f"photo_agg={photo_agg!r}: choose one of {', '.join(PHOTO_AGGS)}")
    if render_agg not in RENDER_AGGS:
        raise MRIFaceError(f"render_agg={render_agg!r}: choose one of {', '.join(RENDER_AGGS)}")
    if int(k) < 1:
        raise MRIFaceError(f"k={k} must be >= 1")
    k = int(k)
    subjects = [str(s) for s in gallery]
    if len(set(subjects)) != len(subjects):
        raise MRIFaceError("gallery subject ids collide after conversion to str")
    valid, renders_no_face = {}, 0
    for s, emb in zip(subjects, gallery.values()):
        rows, bad = _valid_renders(emb)
        renders_no_face += bad
        valid[s] = rows
    matchable = [s for s in subjects if valid[s].shape[0] > 0]
    col = {s: i for i, s in enumerate(subjects)}

    # every photograph against every matchable subject in one product
    parsed = {}
    for pid_raw, plist in probes.items():
        parsed[pid_raw] = _probe_rows(list(plist), str(pid_raw))
    dims = {a.shape[1] for a, m in parsed.values() if m.any()} | {valid[s].shape[1] for s in matchable}
    if len(dims) > 1:
        raise MRIFaceError(f"photograph and gallery embeddings have different sizes: {sorted(dims)}")
    all_faces = [a[m] for a, m in parsed.values() if m.any()]
    stacked = np.concatenate(all_faces) if all_faces else np.zeros((0, 1))
    sim_all = _similarity_matrix(stacked, [valid[s] for s in matchable], render_agg) if len(stacked) else None
    offset = 0
    per_probe_rows: list[dict] = []
    part_rows: list[dict] = []
    scores: dict[str, np.ndarray] = {}
    genuine: list[float] = []
    impostor: list[float] = []
    n_photos_total = n_no_face = 0
    for pid_raw, plist in probes.items():
        pid = str(pid_raw)
        true = (pid if truth is None else truth.get(pid_raw, truth.get(pid)))
        true = None if true is None else str(true)
        in_gallery = true is not None and true in col
        emb, face = parsed[pid_raw]
        n_photos_total += len(face)
        n_no_face += int((~face).sum())
        # (n_photos, n_subjects) cosine similarity; NaN for subjects without embedding
        sim = np.full((len(face), len(subjects)), np.nan)
        if face.any() and matchable:
            n_face = int(face.sum())
            sim[np.ix_(face, [col[s] for s in matchable])] = sim_all[offset:offset + n_face]
            offset += n_face
        lists = []
        for j in range(len(face)):
            if not face[j]:
                per_probe_rows.append({"participant": pid, "photo": j, "face_found": False, "rank": np.nan,
                                       "subject": None, "similarity": np.nan, "confidence": np.nan})
                lists.append([])
                continue
            idx = top_k(sim[j], subjects, k)
            lists.append(idx)
            for r, i in enumerate(idx, start=1):
                per_probe_rows.append({"participant": pid, "photo": j, "face_found": True, "rank": r,
                                       "subject": subjects[i], "similarity": sim[j, i],
                                       "confidence": float(confidence(sim[j, i]))})
            for s in matchable:
                (genuine if in_gallery and s == true else impostor).append(sim[j, col[s]])
        # participant-level score per subject; -inf = cannot be matched
        total = np.full(len(subjects), -np.inf)
        if face.any():
            ok = np.asarray([valid[s].shape[0] > 0 for s in subjects])
            if photo_agg == "sum":
                total[ok] = 0.0
                for j, idx in enumerate(lists):  # photograph order fixed: equal inputs give equal sums
                    for i in idx:
                        total[i] += confidence(sim[j, i])
            elif photo_agg == "mean":
                total[ok] = sim[face][:, ok].mean(axis=0)
            else:
                total[ok] = sim[face][:, ok].max(axis=0)
        scores[pid] = total
        true_has_face = in_gallery and valid[true].shape[0] > 0
        t_rank = rank_of(total, col[true]) if (in_gallery and face.any() and true_has_face) else float("nan")
        best = top_k(total, subjects, 5) if face.any() else []
        part_rows.append({
            "participant": pid, "true_subject": true, "in_gallery": in_gallery,
            "true_subject_has_face": bool(true_has_face), "n_photos": int(len(face)),
            "n_faces": int(face.sum()), "true_rank": t_rank,
            "true_score": float(total[col[true]]) if in_gallery and np.isfinite(total[col[true]]) else np.nan,
            "rank1": bool(t_rank == 1), "top5": bool(t_rank <= 5),
            "top5_subjects": ";".join(subjects[i] for i in best),
            "top5_scores": ";".join(f"{total[i]:.6g}" for i in best),
        })

    per_probe = pd.DataFrame(per_probe_rows, columns=["participant", "photo", "face_found", "rank", "subject",
                                                      "similarity", "confidence"])
    per_participant = pd.DataFrame(part_rows, columns=[
        "participant", "true_subject", "in_gallery", "true_subject_has_face", "n_photos", "n_faces",
        "true_rank", "true_score", "rank1", "top5", "top5_subjects", "top5_scores"])
    evaluated = per_participant[per_participant["in_gallery"]]
    n_eval = int(len(evaluated))
    ranks = evaluated["true_rank"].to_numpy(dtype=np.float64)
    cmc = cmc_curve(ranks, len(subjects))
    summary = {
        "n_participants": int(len(per_participant)),
        "n_evaluated": n_eval,
        "n_rankable": int(np.isfinite(ranks).sum()),
        "n_gallery": len(subjects),
        "n_photos": int(n_photos_total),
        "rank1": _rate(int((ranks == 1).sum()), n_eval),
        "top5": _rate(int((ranks <= 5).sum()), n_eval),
        f"top{k}": _rate(int((ranks <= k).sum()), n_eval),
        "failures": {
            "no_face_photos": int(n_no_face),
            "participants_without_faces": sorted(per_participant.loc[per_participant["n_faces"] == 0,
                                                                     "participant"].tolist()),
            "not_in_gallery": sorted(per_participant.loc[~per_participant["in_gallery"], "participant"].tolist()),
            "true_subject_without_face": sorted(evaluated.loc[~evaluated["true_subject_has_face"],
                                                              "participant"].tolist()),
            "gallery_subjects_without_face": sorted(s for s in subjects if valid[s].shape[0] == 0),
            "gallery_renders_without_face": int(renders_no_face),
        },
        "roc_auc": roc_auc(genuine, impostor),
        "settings": {"k": k, "photo_agg": photo_agg, "render_agg": render_agg,
                     "score": "confidence = (1 + cosine) / 2", "tie_rule": TIE_RULE,
                     "ci": "Clopper-Pearson exact, 95%"},
    }
    return MatchResult(per_probe=per_probe, per_participant=per_participant, summary=summary,
                       cmc=cmc, roc_auc=summary["roc_auc"], subjects=tuple(subjects), participant_scores=scores)
