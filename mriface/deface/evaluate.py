"""Evaluate defacing methods: the follow-up study's table (Schwarz et al. 2021) for any set of methods.

:func:`evaluate_methods` (``mriface deface-eval``) takes a cohort of
original scans and, for every method:

1. defaces each scan (the registration is done once per scan and shared by
   every built-in method; outside tools come in as a manifest of files they
   wrote, ``defaced={"pydeface-fsl": "manifest.csv"}``);
2. measures what the method did to each scan: voxels changed inside the
   brain-protection mask (the context's mask: the registered population brain
   grown by 4 mm), the share of the face region changed, the runtime;
3. runs the scan-to-scan study (:func:`mriface.study.run_study`): the
   original scans are the gallery, the defaced scans rendered under the probe
   protocol are the probes (:class:`mriface.study.TransformProbes`); and,
   with photographs, the photograph study against the defaced gallery (the
   participants' photographs ranked against the renders of the defaced
   scans).

One row per method goes into ``deface_eval.csv``, ``deface_eval.json`` and
the report (``report.html`` / ``report.md`` with ``cmc.png``). Row
``original`` is the same study without defacing (probes: the original scans
under the probe protocol; photographs: against the original gallery).

A scan that cannot be defaced (registration failed, already defaced, CT,
unreadable) is a recorded problem: it stays in the gallery, is not a probe
of that method, and is counted in the row's failures; the rest goes on. Its
participant is not counted in the method's rates (nothing was released).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._io import PathPolicy, child_path, jsonable, safe_component, write_csv_atomic, write_text_atomic
from ..errors import MRIFaceError
from .core import AlreadyDefacedError, DefaceError, RegistrationError, UnsupportedScanError

__all__ = ["evaluate_methods", "DefaceEvalResult", "BASELINE", "INTACT_SHARE", "PUBLISHED_DEFACING"]

log = logging.getLogger("mriface.deface")

#: the row of the undefaced scans
BASELINE = "original"
#: a defaced scan whose face region changed in fewer than this share of voxels counts as "face left intact"
INTACT_SHARE = 0.01
#: the published figures shown beside the table
PUBLISHED_DEFACING = [
    {"study": "Schwarz et al., NeuroImage 2021;231:117845", "n": 157,
     "before": "97% matched", "after": "28-38% after mri_deface, pydeface or fsl_deface; "
                                       "mri_reface about as fsl_deface (28-30%)"},
    {"study": "Schwarz et al. 2022 (PET, CT and MRI)", "n": 182,
     "before": "MRI 97-98%", "after": "8% after mri_reface"},
]


@dataclass
class DefaceEvalResult:
    """What :func:`evaluate_methods` produced.

    Attributes
    ----------
    out : Path
        The output folder.
    table : pandas.DataFrame
        One row per method (``deface_eval.csv``).
    summary : dict
        The content of ``deface_eval.json`` (rows, per-scan facts, problems, options, timings).
    problems : list of Problem
        Every scan that could not be defaced or measured, one line each.
    studies : dict
        Row name -> the scan-to-scan :class:`~mriface.study.StudyResult`.
    files : dict
        Name -> path of each output written.
    """

    out: Path
    table: Any
    summary: dict
    problems: list
    studies: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


@dataclass
class _Facts:
    """What defacing did to one scan (NaN where it could not be measured)."""

    ok: bool
    kind: str = ""
    brain_changed: float = math.nan
    brain_voxels: float = math.nan
    face_changed: float = math.nan
    face_voxels: float = math.nan
    seconds: float = math.nan
    info: dict = field(default_factory=dict)


def _kind(exc: BaseException) -> str:
    for cls, name in ((RegistrationError, "registration_failed"), (AlreadyDefacedError, "already_defaced"),
                      (UnsupportedScanError, "unsupported_scan"), (DefaceError, "deface_failed"),
                      (MRIFaceError, "scan_failed")):
        if isinstance(exc, cls):
            return name
    return "deface_failed"  # a plug-in method that raised something else: a result, not a crash


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _measure(orig, new, ctx, seconds: float, info: "dict | None" = None) -> "tuple[_Facts, str | None]":
    """Voxel counts of ``new`` against ``orig`` inside the context's brain mask and face region."""
    facts = _Facts(True, seconds=seconds, info=dict(info or {}))
    if ctx is None or orig is None:
        return facts, "no registration of the average head to the original scan: brain and face counts not measured"
    if new.shape != orig.shape or not np.allclose(new.affine, orig.affine, atol=1e-3):
        return facts, (f"defaced scan's grid {new.shape} differs from the original's {orig.shape} (resampled?): "
                       "brain and face counts not measured")
    changed = new.data != orig.data
    facts.brain_changed, facts.brain_voxels = int(changed[ctx.brain].sum()), int(ctx.brain.sum())
    facts.face_changed, facts.face_voxels = int(changed[ctx.face].sum()), int(ctx.face.sum())
    return facts, None


def _defaced_probes(name: str, volumes: "dict[str, Any]", pipe, subjects: "set[str]"):
    """A TransformProbes that hands the study each scan's defaced volume's surface.

    ``volumes``: scan path -> the defaced Volume (already computed). The transform works on the
    surface (``on="surface"``): the study takes the original's surface from its cache and this
    returns the defaced volume's (``pipe.surface``, the study's own reconstruction), so the study
    does not read the original scan from disk again only to have it replaced. It is called only
    for probes whose renders are not cached yet.
    """
    from ..study import TransformProbes

    digest = hashlib.sha256(name.encode())
    for path in sorted(volumes):
        digest.update(path.encode())
        digest.update(np.ascontiguousarray(volumes[path].data).tobytes())

    class _Defaced(TransformProbes):
        def scans(self, inputs):  # only the scans the method defaced: a failure is not a probe
            return [s for s in inputs.gallery if s.subject in subjects]

    def defaced_surface(_original_surface, scan):
        return pipe.surface(volumes[str(scan.path)])

    probes = _Defaced(lambda surface: surface, name=name, key=digest.hexdigest(), on="surface")
    # the key is the defaced voxels' digest: a rerun reuses the renders of unchanged results
    probes.apply = lambda obj, scan: defaced_surface(obj, scan)  # errors: MRIFaceError, recorded by the study
    return probes


def _rate_cols(prefix: str, summary: "Mapping | None") -> dict:
    cols = {}
    for k in ("rank1", "top5"):
        r = (summary or {}).get(k) or {}
        n = int(r.get("n", 0) or 0)
        cols[f"{prefix}{k}"] = int(r["count"]) if n else math.nan
        cols[f"{prefix}{k}_n"] = n
        cols[f"{prefix}{k}_ci95_low"] = float(r["ci95_low"]) if n else math.nan
        cols[f"{prefix}{k}_ci95_high"] = float(r["ci95_high"]) if n else math.nan
    return cols


def _sum(vals) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return float(sum(vals)) if vals else math.nan


def _row(name: str, source: str, n_scans: int, facts: "dict[str, _Facts]", study, photo: "Mapping | None",
         photo_models: "Mapping | None") -> dict:
    done = [f for f in facts.values() if f.ok]
    row = {"method": name, "source": source, "scans": n_scans, "defaced": len(done)}
    summ = study.summary if study is not None else None
    row.update(_rate_cols("", summ))
    row.update(_rate_cols("photo_", photo))
    renders = found = p95 = 0
    for sr in (study.scans if study is not None else []):
        if sr.role != "gallery":
            renders += int(sr.found.size)
            found += int(sr.n_found)
            p95 += int(np.sum(np.nan_to_num(sr.prob, nan=0.0) >= 0.95))
    row.update({"renders": renders, "renders_with_face": found,
                "face_detected_pct": 100.0 * found / renders if renders else math.nan,
                "face_p95_pct": 100.0 * p95 / renders if renders else math.nan})
    bc, bv = _sum(f.brain_changed for f in done), _sum(f.brain_voxels for f in done)
    fc, fv = _sum(f.face_changed for f in done), _sum(f.face_voxels for f in done)
    shares = [f.face_changed / f.face_voxels for f in done if f.face_voxels and not math.isnan(f.face_changed)]
    secs = [f.seconds for f in done if not math.isnan(f.seconds)]
    row.update({"brain_voxels_changed": bc, "brain_mask_voxels": bv,
                "brain_changed_pct": 100.0 * bc / bv if bv and not math.isnan(bc) else math.nan,
                "face_region_changed_pct": 100.0 * fc / fv if fv and not math.isnan(fc) else math.nan,
                "seconds_per_scan": float(np.mean(secs)) if secs else math.nan,
                "registration_failed": sum(f.kind == "registration_failed" for f in facts.values()),
                "face_left_intact": sum(s < INTACT_SHARE for s in shares) if name != BASELINE else 0,
                "failed": sum(not f.ok for f in facts.values())})
    kinds: dict[str, int] = {}
    for f in facts.values():
        if not f.ok:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
    row["failures"] = "; ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
    disp = [f.info.get("max_displacement_mm") for f in done if f.info.get("max_displacement_mm") is not None]
    row["max_displacement_mm"] = float(max(disp)) if disp else math.nan
    for m in (summ or {}).get("models", []) if len((summ or {}).get("models", [])) > 1 else []:
        row[f"rank1_{m['name']}"] = f"{m['rank1']['count']}/{m['rank1']['n']}"
        row[f"top5_{m['name']}"] = f"{m['top5']['count']}/{m['top5']['n']}"
    for m, s in (photo_models or {}).items():
        row[f"photo_rank1_{m}"] = f"{s['rank1']['count']}/{s['rank1']['n']}"
    return row


def _photo_match(pipe, gallery_results: list, photo_results: dict, kw: dict) -> "tuple[dict, np.ndarray, dict]":
    """Photographs against a gallery of (defaced) renders: (headline summary, cmc, per-model summaries)."""
    from ..match import run_matching
    from ..study.ensemble import match_models

    gallery = {r.subject: r.gallery_embeddings() for r in gallery_results}
    probe_map = {p: pr.probe_embeddings() for p, pr in photo_results.items()}
    match = run_matching(gallery, probe_map, **kw)
    models = match_models(pipe, gallery_results, list(photo_results.values()), probe_map, match, **kw)
    if models is None:
        return match.summary, np.asarray(match.cmc, float), {}
    head = models.ensemble.summary[models.headline]
    per = {m: r.summary for m, r in models.matches.items()}
    return head, np.asarray(models.ensemble.cmc[models.headline], float), per


def evaluate_methods(source: "str | os.PathLike[str] | Any", *, out: "str | os.PathLike[str]",
                     methods: "Sequence[str] | None" = None,
                     defaced: "Mapping[str, str | os.PathLike[str]] | None" = None,
                     photos: "str | os.PathLike[str] | None" = None, model: "str | Sequence[str]" = "facenet",
                     views: "int | None" = None, size: "int | None" = None, seed: "int | None" = None,
                     device: str = "auto", backend: str = "auto",
                     method_options: "Mapping[str, Mapping[str, Any]] | None" = None,
                     include_images: bool = False, baseline: bool = True, margin_mm: float = 4.0,
                     template: str = "pydeface", weights: "str | os.PathLike[str] | None" = None,
                     random_weights: bool = False, cache_dir: "str | os.PathLike[str] | None" = None,
                     progress: bool = True, pipeline: Any = None, k: int = 50) -> DefaceEvalResult:
    """Deface a cohort with each method and measure identification, detection and brain protection.

    Parameters
    ----------
    source : str, Path or StudyInputs
        The original scans: a manifest CSV (``subject,scan``) or a BIDS folder.
    out : str or Path
        Output folder: ``deface_eval.csv``, ``deface_eval.json``, ``problems.csv``,
        ``report.html``/``report.md``, ``cmc.png`` (and ``cmc_photos.png``),
        ``studies/<method>/`` (each study's own outputs), ``cache/``, and with
        ``include_images`` ``images/<method>/<subject>.png`` (before | after).
    methods : sequence of str, optional
        Registered defacing methods (:func:`mriface.deface.available_methods`,
        the default: every one registered, a notebook's own included).
    defaced : mapping, optional
        Outside tools: row name -> a manifest CSV (``subject,scan``) of the
        scans that tool defaced (same subject ids as ``source``).
    photos : str or Path, optional
        Participants' photographs (a folder per participant, or a CSV): adds
        the photograph study, before defacing and against each defaced gallery.
    model : str or sequence of str
        Face model(s) (``"facenet,arcface-mbf,sface"``): with several, every
        model is ranked and combined, each row gets a column per model.
    views, size, seed : int, optional
        Render protocol overrides (default 10 views of 512 px, seed 0); probes use seed + 1.
    device, backend : str
        As for :func:`mriface.study.run_study`; also passed to methods that take ``device``.
    method_options : mapping, optional
        Method name -> options for it (``{"adversarial": {"steps": 10}}``).
    include_images : bool
        Write one before-and-after render per method and scan (they show faces: off by default).
    baseline : bool
        Add the ``original`` row (the study without defacing).
    margin_mm, template
        For the registration (:func:`mriface.deface.prepare`).
    weights, random_weights, pipeline, cache_dir, progress, k
        As for :func:`mriface.study.run_study` (one pipeline serves every study:
        the face models load once, the gallery is rendered once).

    Returns
    -------
    DefaceEvalResult

    Raises
    ------
    MRIFaceError
        Only for what stops everything: an unknown method, an unreadable
        cohort, a bad option. A scan that fails is a recorded problem.
    """
    import pandas as pd

    from .. import __version__
    from ..inputs import Problem, StudyInputs, load_inputs, read_manifest
    from ..study import Pipeline, run_study
    from ..study.stages import process_photos
    from ..volume import load_volume
    from .core import get_method, prepare, run_method
    from .templates import load_template

    t_start = time.perf_counter()
    from . import available_methods

    methods = list(available_methods() if methods is None else methods)
    for m in methods:
        get_method(m)  # an unknown name stops here, naming the choices
    outside = {str(n): Path(p).expanduser() for n, p in (defaced or {}).items()}
    names = [*([BASELINE] if baseline else []), *methods, *outside]
    if len(set(names)) != len(names):
        raise MRIFaceError(f"deface-eval: a row name is given twice ({', '.join(names)}); "
                           f"'{BASELINE}' is the undefaced row")
    opts = {str(m): dict(o) for m, o in (method_options or {}).items()}
    if unknown := sorted(set(opts) - set(methods)):
        raise MRIFaceError(f"deface-eval: options for {', '.join(unknown)}, which is not among the methods "
                           f"({', '.join(methods)})")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else out / "cache"
    inputs = source if isinstance(source, StudyInputs) else load_inputs(source, photos=photos)
    problems: list = list(inputs.problems)
    pipe = pipeline or Pipeline(device=device, backend=backend, model=model, weights=weights,
                                random_weights=random_weights)
    study_kw = dict(views=views, size=size, seed=seed, pipeline=pipe, cache_dir=cache_root, progress=progress,
                    executor="sequential", k=k, random_weights=random_weights)
    match_kw = {"k": int(k), "photo_agg": "sum"}

    def problem(kind: str, where: Any, message: str, subject: "str | None") -> None:
        p = Problem(kind, str(where), message, subject)
        problems.append(p)
        log.warning("%s", p)

    # ---- the originals, each registered once (shared by every built-in method)
    t0 = time.perf_counter()
    tpl = load_template(template) if methods else None
    template_seconds = time.perf_counter() - t0
    originals, contexts, reg_seconds, prep_fail = {}, {}, {}, {}
    for scan in inputs.gallery:
        s = scan.subject
        try:
            originals[s] = load_volume(scan.path)
            t0 = time.perf_counter()
            contexts[s] = prepare(originals[s], template=tpl or template, margin_mm=margin_mm)
            reg_seconds[s] = time.perf_counter() - t0
        except MRIFaceError as exc:
            prep_fail[s] = _kind(exc)
            problem(prep_fail[s], scan.path, f"subject {s!r}: {_first_line(exc)}", s)

    # ---- each row: deface, measure, study
    rows, studies, cmcs, photo_cmcs, per_scan = [], {}, {}, {}, {}
    photo_results: dict = {}
    images: list[str] = []
    surfaces: dict = {}
    for name in names:
        facts: dict[str, _Facts] = {}
        volumes: dict[str, Any] = {}
        source_text = "none" if name == BASELINE else ("outside: " + outside[name].name if name in outside
                                                       else "built-in")
        if name in outside:
            listed, _, manifest_problems = read_manifest(outside[name])
            problems.extend(manifest_problems)
            by_subject = {sc.subject: sc for sc in listed}
        for scan in inputs.gallery if name != BASELINE else []:
            s = scan.subject
            if name in outside:
                if s not in by_subject:
                    facts[s] = _Facts(False, "not_in_manifest")
                    problem("not_in_manifest", outside[name], f"{name}: no defaced scan of subject {s!r}", s)
                    continue
                try:
                    new = load_volume(by_subject[s].path)
                except MRIFaceError as exc:
                    facts[s] = _Facts(False, "scan_failed")
                    problem("scan_failed", by_subject[s].path, f"{name}: {_first_line(exc)}", s)
                    continue
                f, why = _measure(originals.get(s), new, contexts.get(s), math.nan)
            else:
                if s in prep_fail:
                    facts[s] = _Facts(False, prep_fail[s])
                    continue
                t0 = time.perf_counter()
                try:
                    res = run_method(name, originals[s], context=contexts[s], **opts.get(name, {}))
                except Exception as exc:  # noqa: BLE001 - a method (a plug-in too) that fails is a result
                    facts[s] = _Facts(False, _kind(exc))
                    problem(facts[s].kind, scan.path, f"{name} on subject {s!r}: {type(exc).__name__}: "
                                                      f"{_first_line(exc)}", s)
                    continue
                new = res.volume
                f, why = _measure(originals[s], new, contexts[s], time.perf_counter() - t0 + reg_seconds[s],
                                  getattr(res, "info", None))
            if why:
                problem("not_measured", scan.path, f"{name}, subject {s!r}: {why}", s)
            facts[s] = f
            volumes[str(scan.path)] = new
            if include_images:
                images.append(_before_after(pipe, originals, surfaces, s, new, name, out, size, seed))
        per_scan[name] = {s: {k: v for k, v in vars(f).items()} for s, f in facts.items()}

        # the scan-to-scan study: originals as the gallery, defaced scans as the probes
        study = None
        if name == BASELINE or volumes:
            probes = "protocol" if name == BASELINE else _defaced_probes(
                name, volumes, pipe, {s for s, f in facts.items() if f.ok})
            try:
                study = run_study(inputs, out=child_path(out, "studies", safe_component(name), "scan-to-scan"),
                                  probes=probes, title=f"deface-eval: {name}, defaced scans vs original scans",
                                  **study_kw)
            except MRIFaceError as exc:
                problem("study_failed", name, f"the scan-to-scan study of {name} stopped: {_first_line(exc)}", None)
        volumes.clear()
        studies[name] = study
        if study is not None:
            # with several face models the rates are the combined attacker's; the curve is the primary model's
            cmcs[name] = np.asarray(study.match.cmc if study.match is not None else [], float)

        # the photograph study: before defacing (the original gallery), then against the defaced gallery
        photo, photo_models = None, None
        if inputs.photos and study is not None:
            if name == BASELINE or not photo_results:
                try:
                    ps = run_study(inputs, out=child_path(out, "studies", BASELINE, "photos"), probes="photos",
                                   title="deface-eval: photographs vs original scans", **study_kw)
                    photo_results = {p: process_photos(p, paths, pipe, cache_root)
                                     for p, paths in inputs.photos.items()}
                    if name == BASELINE:
                        photo, photo_cmcs[name] = ps.summary, np.asarray(ps.match.cmc, float)
                        photo_models = {m["name"]: m for m in ps.summary.get("models", [])} \
                            if len(ps.summary.get("models", [])) > 1 else None
                except MRIFaceError as exc:
                    problem("photo_study_failed", inputs.source, f"photograph study: {_first_line(exc)}", None)
            if name != BASELINE and photo_results:
                defaced_gallery = [r for r in study.scans if r.role != "gallery"]
                photo, photo_cmcs[name], photo_models = _photo_match(pipe, defaced_gallery, photo_results, match_kw)
        rows.append(_row(name, source_text, len(inputs.gallery), facts, study, photo, photo_models))
        log.info("deface-eval: %s done", name)

    table = pd.DataFrame(rows)
    from ._evalreport import write_eval_report

    # deface_eval.json is shareable like a study's summary: paths by the study's one policy
    # (docs/privacy.md); problems.csv keeps the full paths and is private.
    from ..study.progress import input_roots

    paths = PathPolicy(input_roots(inputs, photos), {out: "<out>"})
    summary = {
        "mriface": __version__, "source": paths.path(inputs.source), "rows": jsonable(rows),
        "per_scan": jsonable(per_scan),
        "problems": [{"kind": p.kind, "where": paths.text(p.where), "subject": p.subject,
                      "message": paths.text(p.message)} for p in problems],
        "published": PUBLISHED_DEFACING,
        "definitions": {
            "rank1/top5": "scan-to-scan: the defaced scan's renders (probe protocol) ranked against the original "
                          "scans' renders; photo_*: the participants' photographs ranked against the defaced "
                          "scans' renders. Counts over the scans the method defaced; exact Clopper-Pearson 95% CIs",
            "face_detected_pct": "share of the defaced scans' renders in which MTCNN found a face (p >= 0.90); "
                                 "face_p95_pct: with p >= 0.95",
            "brain_voxels_changed": "voxels whose value differs from the original inside the brain-protection mask "
                                    f"(registered population brain grown by {margin_mm} mm), summed over scans",
            "face_region_changed_pct": "voxels changed inside the registered face region / its voxels",
            "seconds_per_scan": "registration (once per scan, shared by the built-in methods) + the method, "
                                "wall clock, mean over scans; outside tools: not known",
            "face_left_intact": f"defaced scans with < {100 * INTACT_SHARE:g}% of the face region changed",
        },
        "options": {"methods": methods, "defaced": {k: paths.path(Path(v).resolve()) for k, v in outside.items()},
                    "photos": paths.path(Path(photos).resolve()) if photos else None, "model": pipe.model, "views": views, "size": size,
                    "seed": seed, "device": str(pipe.device), "backend": pipe.backend,
                    "method_options": jsonable(opts), "margin_mm": margin_mm, "template": template,
                    "random_weights": bool(random_weights), "include_images": bool(include_images)},
        "seconds": {"total": time.perf_counter() - t_start, "template": template_seconds,
                    "registration": jsonable(reg_seconds)},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    files = {"table": write_csv_atomic(table, out / "deface_eval.csv"),
             "problems": write_csv_atomic(pd.DataFrame([(p.kind, p.where, p.subject, p.message) for p in problems],
                                                       columns=["kind", "where", "subject", "message"]),
                                          out / "problems.csv")}
    files.update(write_eval_report(out, table, cmcs, photo_cmcs, summary, images, n_gallery=len(inputs.gallery)))
    summary["seconds"]["total"] = time.perf_counter() - t_start
    files["json"] = write_text_atomic(out / "deface_eval.json", json.dumps(jsonable(summary), indent=2) + "\n")
    return DefaceEvalResult(out, table, jsonable(summary), problems, studies, files)


def _before_after(pipe, originals: dict, surfaces: dict, subject: str, new, name: str, out: Path,
                  size: "int | None", seed: "int | None") -> str:
    """One frontal render of the original and of the defaced scan side by side (the original's face frame)."""
    import dataclasses

    from PIL import Image

    from .._io import atomic_path
    from ..render import RenderProtocol, render_views

    if subject not in surfaces:
        surfaces[subject] = pipe.surface(originals[subject])
    before = surfaces[subject]
    after = dataclasses.replace(pipe.surface(new), frame=before.frame)  # aim where the face was
    protocol = RenderProtocol(views=1, image_size=int(size or 512), seed=int(seed or 0), azimuth_deg=(0.0, 0.0),
                              elevation_deg=(0.0, 0.0))
    pics = [render_views({subject: surf}, protocol, backend=pipe.backend, device=pipe.device).images[0]
            for surf in (before, after)]
    arr = (np.concatenate([p.detach().cpu().clamp(0, 1).numpy() for p in pics], axis=1) * 255 + 0.5).astype(np.uint8)
    path = child_path(out, "images", safe_component(name), safe_component(subject) + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return str(path.relative_to(out))
