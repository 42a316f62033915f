"""Several face models as one attacker: per-model ranks, best-of-models and score fusion.

A study run with several face models (``--model facenet,arcface-mbf,sface``)
matches the probes against the gallery once per model
(:func:`mriface.match.run_matching`, each on the same detections) and then
combines the models two ways:

* **best of models** (``"best-of"``): per participant, the best rank any
  model gave the true subject. It is the worst case for the participant --
  the risk if an attacker ran every model and any one of them is enough --
  and an upper bound for a real attacker, who does not know which model is
  right for whom (with weak models it also gains from chance: with M random
  models the best-of rank 1 rate is about M times chance).
* **score fusion** (``"fusion"``): per participant, each model's candidate
  scores (the study's summed confidences, or whatever ``photo_agg`` made
  them) are z-normalised over the gallery subjects -- so that models with
  other score ranges count alike -- and averaged over the models; the true
  subject is ranked on the mean. This is an attacker one can run without
  knowing the answer.

:data:`DEFAULT_HEADLINE` names the one a multi-model study reports as its
headline (``docs/recognition.md`` has the measurements behind the choice);
both are always in ``summary.json``. The ranks use :func:`mriface.match.rank_of`
(pessimistic under ties), so a fused tie is never a success either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import MRIFaceError
from .match import MatchResult, _rate, cmc_curve, rank_of, top_k

__all__ = ["COMBINERS", "DEFAULT_HEADLINE", "EnsembleResult", "zscore", "fuse_scores", "best_of_models",
           "combine"]

#: the combined attackers, in the order reported
COMBINERS = ("best-of", "fusion")
#: the combined attacker a multi-model study reports as its headline (measured: docs/recognition.md)
DEFAULT_HEADLINE = "best-of"


def zscore(scores: "np.ndarray | Sequence[float]") -> np.ndarray:
    """Scores standardised over their finite entries: ``(s - mean) / sd``.

    Parameters
    ----------
    scores : array-like
        (S,) one participant's score per gallery subject; -inf or NaN =
        the subject cannot be matched.

    Returns
    -------
    numpy.ndarray
        (S,) float64; non-finite entries stay ``-inf``; all finite scores
        equal (sd 0) give 0.
    """
    s = np.asarray(scores, dtype=np.float64)
    out = np.full(s.shape, -np.inf)
    ok = np.isfinite(s)
    if ok.any():
        sd = s[ok].std()
        out[ok] = (s[ok] - s[ok].mean()) / sd if sd > 0 else 0.0
    return out


def fuse_scores(per_model: "Sequence[np.ndarray]") -> np.ndarray:
    """Mean of the models' z-normalised scores (:func:`zscore`), per gallery subject.

    Parameters
    ----------
    per_model : sequence of array-like
        M arrays (S,): one participant's scores from each model.

    Returns
    -------
    numpy.ndarray
        (S,) the fused score; a subject no model can match is ``-inf``; one
        that only some models can match gets the mean of those models.
    """
    if not per_model:
        raise MRIFaceError("fuse_scores: no model scores to fuse")
    z = np.stack([zscore(s) for s in per_model])
    finite = np.isfinite(z)
    n = finite.sum(axis=0)
    total = np.where(finite, z, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), -np.inf)


def best_of_models(ranks: "Mapping[str, Sequence[float]]") -> "tuple[np.ndarray, list[str]]":
    """Per participant, the best (lowest) rank over the models, and which model(s) gave it.

    Parameters
    ----------
    ranks : mapping
        Model name -> (P,) true ranks of the same participants in the same
        order; NaN = not rankable by that model.

    Returns
    -------
    best : numpy.ndarray
        (P,) the lowest finite rank, NaN where no model could rank the participant.
    which : list of str
        Per participant the models that reached ``best``, ``;``-separated in
        the mapping's order ("" where none).
    """
    names = list(ranks)
    if not names:
        raise MRIFaceError("best_of_models: no models")
    r = np.stack([np.asarray(ranks[m], dtype=np.float64) for m in names])
    filled = np.where(np.isfinite(r), r, np.inf)
    low = filled.min(axis=0)
    best = np.where(np.isfinite(low), low, np.nan)
    which = [";".join(m for m, v in zip(names, filled[:, j]) if np.isfinite(low[j]) and v == low[j])
             for j in range(r.shape[1])]
    return best, which


@dataclass(frozen=True)
class EnsembleResult:
    """The models combined (:func:`combine`).

    Attributes
    ----------
    per_participant : pandas.DataFrame
        Per participant: ``participant``, ``true_subject``, ``in_gallery``,
        ``rank_<model>`` for each model, ``rank_best_of``, ``best_model``,
        ``rank_fusion``, ``fusion_top5_subjects``.
    fused : pandas.DataFrame
        The fusion attacker's table, with the columns of
        :attr:`mriface.match.MatchResult.per_participant` (``true_score`` is
        the fused z-score).
    best : pandas.DataFrame
        The best-of-models table, same columns: per participant the row of
        the (first) model that ranked the true subject best.
    summary : dict
        Per model and per combiner: ``rank1``, ``top5`` (count, n, rate,
        95% CI); ``headline``; ``fusion`` (how scores were fused).
    cmc : dict
        Combiner name -> (n_gallery,) CMC curve.
    """

    per_participant: pd.DataFrame
    fused: pd.DataFrame
    best: pd.DataFrame
    summary: dict
    cmc: dict

    def table(self, combiner: str) -> pd.DataFrame:
        """The per-participant table of ``combiner`` (``"best-of"`` or ``"fusion"``)."""
        if combiner not in COMBINERS:
            raise MRIFaceError(f"combiner={combiner!r}: choose one of {', '.join(COMBINERS)}")
        return self.best if combiner == "best-of" else self.fused


def _ranks(result: MatchResult) -> np.ndarray:
    return result.per_participant["true_rank"].to_numpy(dtype=np.float64)


def combine(results: "Mapping[str, MatchResult]", *, headline: str = DEFAULT_HEADLINE) -> EnsembleResult:
    """Best-of-models and score fusion over several models' matching of the same probes.

    Parameters
    ----------
    results : mapping
        Model name -> :class:`~mriface.match.MatchResult` of the same
        gallery subjects and participants (same order), with their score
        matrices (``participant_scores``).
    headline : {"best-of", "fusion"}
        The combiner named as headline in the summary.

    Returns
    -------
    EnsembleResult
    """
    if headline not in COMBINERS:
        raise MRIFaceError(f"headline={headline!r}: choose one of {', '.join(COMBINERS)}")
    names = list(results)
    if not names:
        raise MRIFaceError("combine: no model results")
    first = results[names[0]]
    subjects = list(first.subjects)
    base = first.per_participant
    for m in names[1:]:
        r = results[m]
        if list(r.subjects) != subjects or r.per_participant["participant"].tolist() != base["participant"].tolist():
            raise MRIFaceError(f"model {m!r} matched other subjects or participants than {names[0]!r}")
    col = {s: i for i, s in enumerate(subjects)}
    table = base[["participant", "true_subject", "in_gallery"]].copy()
    ranks = {m: _ranks(results[m]) for m in names}
    for m in names:
        table[f"rank_{m}"] = ranks[m]
    best, which = best_of_models(ranks)
    table["rank_best_of"] = best
    table["best_model"] = which
    best_rows = [results[(w.split(";")[0] if w else names[0])].per_participant.iloc[j]
                 for j, w in enumerate(which)]
    best_table = pd.DataFrame(best_rows, columns=list(base.columns)).reset_index(drop=True)

    fused_rows = []
    fused_ranks = []
    for j, row in enumerate(base.itertuples(index=False)):
        pid = row.participant
        vectors = [results[m].participant_scores.get(pid) for m in names]
        if any(v is None for v in vectors) or not np.isfinite(np.stack(vectors)).any():
            total = np.full(len(subjects), -np.inf)
        else:
            total = fuse_scores(vectors)
        true = row.true_subject
        rankable = bool(row.in_gallery) and true in col and any(np.isfinite(ranks[m][j]) for m in names)
        t_rank = rank_of(total, col[true]) if rankable else float("nan")
        fused_ranks.append(t_rank)
        shown = top_k(total, subjects, 5) if np.isfinite(total).any() else []
        d = row._asdict()
        d.update({"true_rank": t_rank,
                  "true_score": float(total[col[true]]) if rankable and np.isfinite(total[col[true]]) else np.nan,
                  "rank1": bool(t_rank == 1), "top5": bool(t_rank <= 5),
                  "top5_subjects": ";".join(subjects[i] for i in shown),
                  "top5_scores": ";".join(f"{total[i]:.6g}" for i in shown)})
        fused_rows.append(d)
    fused = pd.DataFrame(fused_rows, columns=list(base.columns))
    table["rank_fusion"] = np.asarray(fused_ranks, dtype=np.float64)
    table["fusion_top5_subjects"] = fused["top5_subjects"].to_numpy()

    evaluated = table["in_gallery"].to_numpy(dtype=bool)
    n_eval = int(evaluated.sum())

    def rates(r: np.ndarray) -> dict:
        r = np.asarray(r, dtype=np.float64)[evaluated]
        return {"rank1": _rate(int((r == 1).sum()), n_eval), "top5": _rate(int((r <= 5).sum()), n_eval)}

    summary = {
        "models": {m: rates(ranks[m]) for m in names},
        "best-of": rates(best),
        "fusion": rates(table["rank_fusion"].to_numpy()),
        "headline": headline,
        "fusion_method": "per participant, each model's candidate scores z-normalised over the gallery "
                         "subjects it can match, then averaged over the models",
        "best_of_method": "per participant, the lowest true rank over the models (the worst case)",
    }
    cmc = {"best-of": cmc_curve(best[evaluated], len(subjects)),
           "fusion": cmc_curve(table["rank_fusion"].to_numpy()[evaluated], len(subjects))}
    return EnsembleResult(table, fused, best_table, summary, cmc)
