"""A study with several face models: each model's ranks and the models combined.

Every model embedded the same detections (:class:`~mriface.study.stages.Pipeline`
aligns once with every model's crop); here each model's embeddings are
matched on their own (:func:`mriface.match.run_matching`, same options as the
primary) and combined by :func:`mriface.fusion.combine` (best of models, score
fusion). With one model there is nothing to combine and the study's outputs
are exactly those of a single-model study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ModelsResult", "match_models"]


@dataclass(frozen=True)
class ModelsResult:
    """Per-model matching and the combined attackers of one study.

    Attributes
    ----------
    matches : dict
        Model name -> :class:`~mriface.match.MatchResult` (the primary's is the study's ``match``).
    ensemble : EnsembleResult
        :func:`mriface.fusion.combine` of ``matches``.
    info : list of dict
        :meth:`~mriface.study.stages.Pipeline.model_info` (name, weights' SHA-256, licence).
    headline : str
        The combiner the study reports as its headline.
    """

    matches: dict
    ensemble: Any
    info: list
    headline: str

    def summary(self) -> dict:
        """The ``summary.json`` section: each model (SHA-256, licence, rates) and the combiners."""
        ens = self.ensemble.summary
        models = []
        for inf in self.info:
            m = inf["name"]
            models.append({**inf, "rank1": ens["models"][m]["rank1"], "top5": ens["models"][m]["top5"],
                           "roc_auc": self.matches[m].roc_auc})
        return {"models": models, "ensemble": {k: v for k, v in ens.items() if k != "models"}}


def _probe_map(results: list, keys: Mapping[str, list], model: str) -> "dict[str, list]":
    """Participant -> probe embeddings of ``model``, built like the probe source built ``keys`` (the primary's)."""
    out: dict[str, list] = {}
    for res in results:
        pid = getattr(res, "participant", None) or getattr(res, "subject", None)
        if pid is None or not hasattr(res, "probe_embeddings"):
            continue
        out.setdefault(pid, []).extend(res.probe_embeddings(model))
    # the same participants and probe counts as the primary's map; anything else keeps the primary's Nones
    return {pid: out[pid] if pid in out and len(out[pid]) == len(plist) else [None] * len(plist)
            for pid, plist in keys.items()}


def match_models(pipeline: Any, gallery_results: list, probe_results: list, probe_map: Mapping[str, list],
                 primary: Any, *, headline: "str | None" = None, **match_kw: Any) -> "ModelsResult | None":
    """Match every face model of ``pipeline`` and combine them; None with a single model.

    Parameters
    ----------
    pipeline : Pipeline
        The stages (its ``models``).
    gallery_results, probe_results : list
        ScanResults / PhotoResults with ``model_embeddings``.
    probe_map : mapping
        The primary model's participant -> probe embeddings (its keys and order are kept).
    primary : MatchResult
        The primary model's matching, already computed.
    headline : str, optional
        ``"fusion"`` or ``"best-of"`` (default :data:`mriface.fusion.DEFAULT_HEADLINE`).
    **match_kw
        :func:`mriface.match.run_matching`'s options (k, photo_agg, render_agg).
    """
    from ..fusion import DEFAULT_HEADLINE, combine
    from ..match import run_matching

    models = list(getattr(pipeline, "models", ()) or ())
    if len(models) < 2:
        return None
    matches = {models[0]: primary}
    for m in models[1:]:
        gallery = {r.subject: r.gallery_embeddings(m) for r in gallery_results}
        matches[m] = run_matching(gallery, _probe_map(probe_results, probe_map, m), **match_kw)
    headline = headline or DEFAULT_HEADLINE
    return ModelsResult(matches, combine(matches, headline=headline), pipeline.model_info(), headline)
