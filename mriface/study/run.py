"""``run_study``: the protocol of a re-identification study, step by step."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import MRIFaceError
from ..inputs import Problem, StudyInputs, load_inputs
from .outputs import StudyResult, write_outputs
from .probes import ProbeSource, resolve_probes
from .._io import PathPolicy
from .guard import stop_on_environment_failure
from .progress import LogFile, OutputLock, RunContext, input_roots
from .stages import Pipeline

__all__ = ["run_study"]

log = logging.getLogger("mriface.study")


def run_study(source: "str | os.PathLike[str] | StudyInputs", *, out: "str | os.PathLike[str]",
              photos: "str | os.PathLike[str] | None" = None,
              probe_manifest: "str | os.PathLike[str] | None" = None,
              probes: "str | ProbeSource | Any" = "auto",
              protocol: Any = None, probe_protocol: Any = None,
              views: "int | None" = None, size: "int | None" = None, seed: "int | None" = None,
              probe_seed: "int | None" = None, probe_views: "int | None" = None,
              backend: str = "auto", device: str = "auto", model: "str | Sequence[str]" = "facenet", k: int = 50,
              photo_agg: str = "sum", render_agg: "str | None" = None,
              weights: "str | os.PathLike[str] | None" = None, random_weights: bool = False,
              include_images: bool = False, cache_dir: "str | os.PathLike[str] | None" = None,
              progress: bool = True, title: "str | None" = None,
              bids_suffixes: Sequence[str] = ("T1w", "FLAIR"),
              pipeline: "Pipeline | None" = None, workers: "int | None" = None,
              executor: "str | Any" = "auto", ray_address: "str | None" = None,
              batch_scans: "int | None" = None) -> StudyResult:
    """Run a re-identification study and write its results to ``out``.

    Parameters
    ----------
    source : str, Path or StudyInputs
        A manifest CSV (``subject,scan[,probe_scan]``; a scan may be a volume
        or a mesh file), a BIDS dataset folder, or inputs already read with
        :func:`mriface.inputs.load_inputs`.
    out : str or Path
        Output folder: ``participants.csv``, ``probes.csv``, ``renders.csv``,
        ``problems.csv``, ``summary.json``, ``report.html``/``report.md`` with
        ``cmc.png`` and ``rank_histogram.png``, ``study.log``, and ``cache/``.
    photos : str or Path, optional
        Photographs: a folder of participant folders, or a CSV (participant, photo).
    probe_manifest : str or Path, optional
        A manifest of probe scans (e.g. the same scans after defacing).
    probes : str, ProbeSource or callable
        What the probes are (:mod:`mriface.study.probes`): ``"photos"``,
        ``"scans"`` (renders of the probe scans: another BIDS session, the
        manifest's ``probe_scan`` column or ``probe_manifest``), ``"protocol"``
        (renders of the gallery scans themselves under ``probe_protocol``),
        ``"auto"`` (photos if given, else probe scans if any, else protocol);
        or a probe source, e.g. ``TransformProbes(deface)``; a plain function
        of a Volume is taken as ``TransformProbes(fn)``.
    protocol : RenderProtocol, optional
        Gallery render protocol (default ``RenderProtocol()``); ``views``,
        ``size`` and ``seed`` override its fields.
    probe_protocol : RenderProtocol, optional
        Protocol for probe renders (scan-to-scan modes). Default: the gallery
        protocol with ``seed = probe_seed`` (default gallery seed + 1) and
        ``views = probe_views`` when given, so that no probe view repeats a
        gallery view.
    backend, device : str
        Renderer backend and compute device (``"auto"``: CUDA when present).
    model : str or sequence of str
        Face model (:func:`mriface.recognition.available_models`), or several
        (``"facenet,arcface-mbf,sface"`` or a list): each embeds the same
        detections and is ranked on its own, and the models are combined
        (best of models, score fusion: :mod:`mriface.fusion`); the headline
        is then the combined attacker (``summary.json``: ``models``, ``ensemble``).
    k : int
        Length of each probe's ranked list (the study used 50).
    photo_agg, render_agg : str
        How scores combine over a participant's probes (``"sum"`` as in the
        study) and over a subject's renders (``None``: :mod:`mriface.match`'s default).
    weights : str or Path, optional
        The face model's weights file; default: the model's own.
    random_weights : bool
        An untrained network (timing without weights; ranks are meaningless).
    include_images : bool
        Also write the gallery and probe renders as PNG under ``out/images``.
        Off by default: renders show faces.
    cache_dir : str or Path, optional
        Cache folder (default ``out/cache``); share it between studies of the
        same scans to reuse surfaces and renders.
    progress : bool
        Show a tqdm bar per stage on stderr.
    title : str, optional
        Report heading.
    bids_suffixes : sequence of str
        For a BIDS source: the scan suffixes taken, in order of preference.
    pipeline : Pipeline, optional
        The stages (tests pass cheaper ones); built from the options by default.
    workers : int, optional
        Worker processes that load and reconstruct scans ahead of the device
        stages (``executor="auto"`` streams when this is > 1; the command
        line's ``--workers`` defaults to the machine's cores). Results are
        identical to one scan at a time (docs/scale.md).
    executor : str or Executor
        ``"auto"``, ``"sequential"``, ``"streaming"`` or ``"ray"``
        (:mod:`mriface.study.executor`).
    ray_address : str, optional
        With ``executor="ray"``: the Ray cluster to join (``"auto"``,
        ``"HOST:6379"``); None starts Ray on this machine.
    batch_scans : int, optional
        Streaming and Ray executors: scans whose render, align and embed
        stages run together on the device (default 1 on the CPU, 8 on CUDA;
        docs/scale.md).

    Returns
    -------
    StudyResult

    Raises
    ------
    MRIFaceError
        Only when nothing can run (unreadable manifest, no usable scan,
        no probes at all, bad option). Single bad rows, files and scans
        are counted in the results instead: each item's work runs in one
        guarded unit (:mod:`mriface.study.guard`) that turns any exception
        into a recorded problem.
    StudyEnvironmentError
        (an MRIFaceError) The machine cannot go on: no space left, a quota,
        a read-only file system, permission denied on ``out`` or the cache.
        What was finished stays in the cache; rerun to resume.
    StudyLockedError
        (an MRIFaceError) Another study is writing into ``out`` right now.
    """
    from ..match import PHOTO_AGGS, RENDER_AGGS, run_matching
    from ..render import RenderProtocol
    from .ensemble import match_models
    from .executor import open_executor

    t_start = time.perf_counter()
    out = Path(out).expanduser().resolve()
    cache_root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else out / "cache"
    # Outermost: disk full / output not writable anywhere below stops the study with one clear line;
    # then the lock (a second study into this folder is refused) before the log is opened.
    with stop_on_environment_failure(out, cache_root), OutputLock(out, cache_root) as lock, \
            LogFile(out / "study.log"), open_executor(executor, workers, ray_address=ray_address,
                                                                       batch_scans=batch_scans) as ex:
        if lock.removed:
            log.info("removed %d temporary .part files left by an interrupted run", lock.removed)
        # ---- inputs and options
        inputs = source if isinstance(source, StudyInputs) else load_inputs(
            source, photos=photos, probe_manifest=probe_manifest, bids_suffixes=bids_suffixes)
        probe_source = resolve_probes(probes, inputs)
        if photo_agg not in PHOTO_AGGS or (render_agg is not None and render_agg not in RENDER_AGGS):
            raise MRIFaceError(f"photo_agg={photo_agg!r} / render_agg={render_agg!r}: use one of "
                               f"{', '.join(PHOTO_AGGS)} / {', '.join(RENDER_AGGS)}")
        if int(k) < 1:
            raise MRIFaceError(f"k={k}: give a list length of at least 1")
        log.info("study started: %d gallery scans from %s, probes: %s, out %s", len(inputs.gallery),
                 inputs.source, probe_source.mode, out)
        ctx = RunContext(pipeline=None, cache_root=cache_root, progress=progress,
                         images_root=out / "images" if include_images else None, executor=ex,
                         paths=PathPolicy(input_roots(inputs, photos), {out: "<out>"}))
        for p in inputs.problems:
            ctx.problem(p)
        protocol = (protocol if protocol is not None else RenderProtocol()).with_overrides(
            views=views, image_size=size, seed=seed)
        if probe_protocol is None:
            probe_protocol = protocol.with_overrides(
                seed=probe_seed if probe_seed is not None else int(protocol.seed) + 1, views=probe_views)
        probe_source.check(inputs, protocol, probe_protocol)
        ctx.pipeline = pipeline or Pipeline(device=device, backend=backend, model=model, weights=weights,
                                            random_weights=random_weights)

        if probe_source.mode == "photos":  # a streaming executor aligns them while it waits for surfaces
            ex.expect_photos(ctx, [(s, inputs.photos[s]) for s in inputs.subjects if s in inputs.photos])

        # ---- the gallery: every scan rendered under the protocol, renders embedded
        def no_face(res) -> "Problem | None":
            if res.n_found:
                return None
            return Problem("no_face_in_renders", str(res.path),
                           f"no face found in any of the {res.found.size} renders of subject {res.subject!r} "
                           "(defaced, or a surface without a face); it stays in the gallery as unmatched",
                           res.subject)

        gallery_results = ctx.scans(inputs.gallery, "gallery", protocol, "gallery scans", check=no_face)
        gallery = {r.subject: r.gallery_embeddings() for r in gallery_results}

        # ---- the probes: photographs, other scans, other renders or transformed scans
        probe_results, probe_map = probe_source.collect(inputs, probe_protocol, ctx)
        if not probe_map:
            raise MRIFaceError("no probes to match: every probe input failed (see study.log)")

        # ---- match: every probe ranked against the gallery
        kwargs: dict[str, Any] = {"k": int(k), "photo_agg": photo_agg}
        if render_agg is not None:
            kwargs["render_agg"] = render_agg
        match = run_matching(gallery, probe_map, **kwargs)
        # several face models: each one's ranks, and the models combined (None with one model)
        models_result = match_models(ctx.pipeline, gallery_results, probe_results, probe_map, match, **kwargs)

        # ---- outputs: tables, summary, report
        scan_probes = probe_source.renders_scans
        config = {
            "probes": probe_source.mode, "views": protocol.views, "image_size": protocol.image_size,
            "seed": protocol.seed, "probe_seed": probe_protocol.seed if scan_probes else None,
            "probe_views": probe_protocol.views if scan_probes else None, **probe_source.options(),
            "backend": ctx.pipeline.backend, "device": str(ctx.pipeline.device),
            "model": getattr(ctx.pipeline, "model", model), "k": int(k),
            "photo_agg": photo_agg, "render_agg": render_agg, "random_weights": bool(random_weights),
            "include_images": bool(include_images), "cache_dir": str(cache_root),
        }
        return write_outputs(out, match=match, source=probe_source, inputs_source=inputs.source, ctx=ctx,
                             gallery=gallery_results, probe_results=probe_results, config=config,
                             title=title, t_start=t_start, random_weights=random_weights,
                             models=models_result)
