"""A study's outputs: the CSV tables, ``summary.json`` and the report's data.

Every file is written atomically. ``participants.csv`` and ``probes.csv`` are
:mod:`mriface.match`'s tables as they are; ``renders.csv`` lists every render
with its parameters and detection; ``problems.csv`` every problem.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import PathPolicy, jsonable, write_csv_atomic, write_text_atomic

__all__ = ["StudyResult", "write_outputs"]

log = logging.getLogger("mriface.study")


@dataclass
class StudyResult:
    """What :func:`~mriface.study.run_study` produced.

    Attributes
    ----------
    out : Path
        The output folder.
    summary : dict
        The content of ``summary.json``.
    participants : pandas.DataFrame
        Per participant: true rank, score, top-5 candidates (``participants.csv``).
    probes : pandas.DataFrame
        Per probe (photograph or probe render): its top-k list (``probes.csv``).
    problems : list of Problem
        Every input problem and failure, one line each.
    scans : list of ScanResult
        Every gallery and probe scan processed.
    files : dict
        Name -> path of each output written.
    match : object
        The :class:`mriface.match.MatchResult`.
    computed, cached : int
        Cache entries (scans and photo sets) computed in this run / read from the cache.
    """

    out: Path
    summary: dict
    participants: Any
    probes: Any
    problems: list
    scans: list
    files: dict
    match: Any = None
    computed: int = 0
    cached: int = 0

    def table(self):
        """The per-participant table (a copy), for printing."""
        return self.participants.copy()


def write_csv(df, path: Path) -> Path:
    """A DataFrame as CSV (no index), written atomically, every text cell neutralised against
    spreadsheet formulas (:func:`mriface._io.csv_cell`)."""
    return write_csv_atomic(df, path)


def true_ranks(df) -> list["int | None"]:
    """Per participant, the true subject's rank (None when not ranked)."""
    for col in ("true_rank", "rank"):
        if col in df.columns:
            return [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                    for v in df[col].tolist()]
    raise KeyError(f"per-participant table has no true_rank column: {list(df.columns)}")


def write_outputs(out: Path, *, match: Any, source: Any, inputs_source: Any, ctx: Any, gallery: list,
                  probe_results: list, config: dict, title: "str | None", t_start: float,
                  random_weights: bool, models: Any = None) -> StudyResult:
    """Write every table, ``summary.json`` and the report; return the :class:`StudyResult`.

    Parameters
    ----------
    out : Path
        Output folder.
    match : MatchResult
        The ranks (:func:`mriface.match.run_matching`).
    source : ProbeSource
        What the probes were (its mode and description).
    inputs_source : Path or None
        The manifest or BIDS folder read.
    ctx : RunContext
        The run's problems, counts, pipeline and image folder.
    gallery, probe_results : list
        The gallery's ScanResults; the probes' ScanResults or PhotoResults.
    config : dict
        The options, as recorded in the summary and the report.
    title : str
        Report heading.
    t_start : float
        ``time.perf_counter()`` at the start of the run.
    random_weights : bool
        The face model was untrained (said in the report).
    models : ModelsResult, optional
        Several face models (:func:`mriface.study.ensemble.match_models`):
        ``participants.csv`` is then the headline combiner's table,
        ``participants_by_model.csv`` every model's and combiner's rank per
        participant, ``probes.csv`` every model's lists (a ``model`` column).
    """
    import pandas as pd

    from .. import __version__
    from ..report import Rate, ReportData, write_report

    participants_df, probes_df = match.per_participant, match.per_probe
    if models is not None:  # several face models: the headline is the combined attacker
        participants_df = models.ensemble.table(models.headline)
        probes_df = pd.concat([df.assign(model=m)[["model", *df.columns]]
                               for m, df in ((m, r.per_probe) for m, r in models.matches.items())],
                              ignore_index=True)
    scans = [*gallery, *[p for p in probe_results if hasattr(p, "renders")]]
    problems = ctx.problems
    files: dict[str, Path] = {}
    files["participants"] = write_csv(participants_df, out / "participants.csv")
    files["probes"] = write_csv(probes_df, out / "probes.csv")
    if models is not None:
        files["participants_by_model"] = write_csv(models.ensemble.per_participant,
                                                   out / "participants_by_model.csv")
    render_rows = [{"subject": r.subject, "role": r.role, **rec} for r in scans for rec in r.renders]
    files["renders"] = write_csv(pd.DataFrame(render_rows), out / "renders.csv")
    files["problems"] = write_csv(pd.DataFrame(
        [{"kind": p.kind, "where": p.where, "subject": p.subject, "message": p.message} for p in problems],
        columns=["kind", "where", "subject", "message"]), out / "problems.csv")

    ms = match.summary
    evaluated = participants_df[participants_df["in_gallery"]] if "in_gallery" in participants_df else participants_df
    ranks = true_ranks(evaluated)
    n = int(ms.get("n_evaluated", len(ranks)))
    head = ms if models is None else models.ensemble.summary[models.headline]
    rank1, top5 = (Rate(int(head[k]["count"]), int(head[k]["n"]), float(head[k]["ci95_low"]),
                        float(head[k]["ci95_high"])) for k in ("rank1", "top5"))
    # Shareable outputs (summary, report) show paths by the one policy: relative to the input
    # folders, or without their folders (docs/privacy.md); problems.csv and study.log keep them.
    paths = getattr(ctx, "paths", None) or PathPolicy()
    shared_problems = [paths.text(str(p)) for p in problems]
    shared_config = {k: (paths.path(v) if k == "cache_dir" and v else v) for k, v in config.items()}
    ms_failures = dict(ms.get("failures") or {})
    if getattr(source, "renders_scans", False) and "no_face_photos" in ms_failures:
        ms_failures["no_face_probe_renders"] = ms_failures.pop("no_face_photos")  # no photographs here
    ms = {**ms, "failures": ms_failures}
    failures = Counter(p.kind for p in problems)
    for kind, count in ms_failures.items():
        count = len(count) if isinstance(count, (list, tuple)) else int(count)
        if count:
            failures[kind] += count
    stage_totals: Counter = Counter()
    for r in gallery:
        for s, v in r.timings.items():
            stage_totals[s] += v
    summary = {
        "mriface": __version__,
        "source": paths.path(inputs_source),
        "mode": source.mode,
        "n": n,
        "n_gallery": len(gallery),
        "rank1": head["rank1"],
        "top5": head["top5"],
        "failures": dict(sorted(failures.items())),
        "problems": shared_problems,
        "match": ms,
        "roc_auc": match.roc_auc,
        **_models_summary(ctx.pipeline, match, models),
        "options": shared_config,
        "cache": {"computed": ctx.computed, "cached": ctx.cached},
        "seconds": {"total": time.perf_counter() - t_start,
                    "gallery_stages": {k: round(v, 3) for k, v in stage_totals.items()}},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    images = []
    if ctx.images_root is not None and ctx.images_root.is_dir():
        images = sorted(str(p.relative_to(out)) for p in ctx.images_root.rglob("*.png"))
    extra = {"random weights (ranks meaningless)": "yes"} if random_weights else {}
    extra.update(_models_report(summary))
    data = ReportData(
        title=title or f"mriface study: {source.description}", ranks=ranks, n_gallery=len(gallery),
        cmc=np.asarray(match.cmc if models is None else models.ensemble.cmc[models.headline], float),
        rank1=rank1, top5=top5, participants=participants_df,
        failures=dict(sorted(failures.items())), problems=shared_problems,
        config=shared_config, mode=source.description, images=images, extra=extra)
    files.update(write_report(data, out))
    summary["seconds"]["total"] = time.perf_counter() - t_start
    files["summary"] = write_text_atomic(out / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
    files["log"] = out / "study.log"
    log.info("study done: rank 1 %s; top 5 %s; %d computed, %d cached, %.1f s",
             rank1.text(), top5.text(), ctx.computed, ctx.cached, summary["seconds"]["total"])
    return StudyResult(out, jsonable(summary), participants_df, probes_df, problems, scans, files, match,
                       ctx.computed, ctx.cached)


def _models_summary(pipeline: Any, match: Any, models: Any) -> dict:
    """``summary.json``'s ``models`` (each with its weights' SHA-256 and licence) and, with several, ``ensemble``."""
    if models is not None:
        return models.summary()
    info = pipeline.model_info() if hasattr(pipeline, "model_info") else []
    ms = match.summary
    return {"models": [{**inf, "rank1": ms["rank1"], "top5": ms["top5"], "roc_auc": match.roc_auc}
                       for inf in info]}


def _rate_text(r: dict) -> str:
    return f"{r['count']}/{r['n']}"


def _models_report(summary: dict) -> dict:
    """Report header lines: each face model (rates, weights' SHA-256, licence) and the combined attackers."""
    lines = {}
    models = summary.get("models", [])
    for m in models:
        sha = (m.get("weights_sha256") or "n/a")[:16]
        lines[f"face model {m['name']}"] = (f"rank 1 {_rate_text(m['rank1'])}, top 5 {_rate_text(m['top5'])}; "
                                            f"weights SHA-256 {sha}…; licence: {m.get('licence', 'unknown')}")
    ens = summary.get("ensemble")
    if ens:
        for c in ("best-of", "fusion"):
            mark = " (headline)" if ens.get("headline") == c else ""
            lines[f"models combined: {c}{mark}"] = (f"rank 1 {_rate_text(ens[c]['rank1'])}, "
                                                   f"top 5 {_rate_text(ens[c]['top5'])}")
    return lines
