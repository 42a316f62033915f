"""Benchmark: the synthetic cohort (docs/synthetic.md) -- generation cost, and how distinct its people are.

Three measurements on one freshly generated cohort (default n = 12, seed 0):

1. **Generation**: wall time and CPU time (this process and its workers),
   CPU seconds per participant, size on disk.
2. **Identities, to FaceNet** (CASIA-WebFace weights, MTCNN crops, CPU):
   cosine similarity between photographs of the same participant and of
   different participants (median and 5/95 percentiles), how often a
   photograph's nearest other photograph is of the same participant, and
   the same two figures for the real sample photographs (Obama vs Obama,
   Obama vs Biden) as the reference.
3. **Studies** (``--study``, default on): ``mriface study`` on the cohort,
   photographs vs scans and scan-to-scan (session 2 vs session 1), run as
   the command line runs them; their rank-1 and top-5 rates.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_synthetic                  # n = 12, both studies
    .venv/bin/python -m benchmarks.bench_synthetic --n 12 --no-study  # generation and cosines only

Prints a table and writes ``benchmarks/out/synthetic.json`` (the cohort and
the studies go to ``--out``, default a temporary folder that is removed).
The synthetic faces come from the Basel Face Model (non-commercial research
only); nothing of them is written outside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine_info, write_json

#: `make bench` (benchmarks.run_all --small): 3 participants, no studies (fetches the non-commercial face model)
QUICK_ARGS = ["--n", "3", "--no-study", "--json", "benchmarks/out/synthetic-quick.json"]
OUT = Path(__file__).resolve().parent / "out"


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _du_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _stats(x) -> dict:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "median": round(float(np.median(x)), 3), "p5": round(float(np.percentile(x, 5)), 3),
            "p95": round(float(np.percentile(x, 95)), 3)}


def photo_similarities(paths: "list[Path]", labels: "list[str]") -> dict:
    """FaceNet cosine similarities of photographs: same vs different label, nearest-neighbour rate.

    Parameters
    ----------
    paths : list of Path
        Photographs.
    labels : list of str
        The person in each photograph.

    Returns
    -------
    dict
        ``found`` (MTCNN detections of ``n``), ``same`` and ``different``
        (n, median, p5, p95 of the cosine over pairs of found photographs),
        ``nn_same`` (share of found photographs whose most similar other
        photograph shows the same person).
    """
    import torch

    from mriface.recognition import FaceAligner, get_model

    aligner = FaceAligner(device="cpu")
    model = get_model("facenet", device="cpu")
    found, embs = [], []
    for a in range(0, len(paths), 16):
        al = aligner.align([str(p) for p in paths[a:a + 16]])
        with torch.no_grad():
            embs.append(model.embed(al))
        found.append(al.found)
    e = torch.cat(embs).numpy()
    ok = torch.cat(found).numpy()
    lab = np.asarray(labels)[ok]
    e = e[ok]
    cos = e @ e.T
    iu = np.triu_indices(len(e), 1)
    same = lab[iu[0]] == lab[iu[1]]
    c = cos[iu]
    np.fill_diagonal(cos, -np.inf)
    nn = lab[np.argmax(cos, axis=1)] == lab if len(e) > 1 else np.zeros(0, bool)
    return {"n": len(paths), "found": int(ok.sum()), "same": _stats(c[same]), "different": _stats(c[~same]),
            "nn_same": round(float(nn.mean()), 3) if nn.size else None}


def _study(manifest: Path, out: Path, extra: "list[str]") -> dict:
    """``mriface study`` as the command line runs it; rank-1/top-5 and CPU/wall from summary.json."""
    cmd = [sys.executable, "-m", "mriface", "study", str(manifest), "--out", str(out), *extra]
    t0, c0 = time.perf_counter(), _cpu_s()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    s = json.loads((out / "summary.json").read_text())
    return {"command": " ".join(["mriface", *cmd[3:]]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "rank1": s["rank1"], "top5": s["top5"], "failures": s.get("failures", {})}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="participants (default 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the cohort and studies here (default: a temporary folder)")
    ap.add_argument("--study", action=argparse.BooleanOptionalAction, default=True,
                    help="run the photograph and scan-to-scan studies (default on)")
    ap.add_argument("--json", default=str(OUT / "synthetic.json"))
    args = ap.parse_args(argv)

    from mriface import datasets
    from mriface.synthetic import synthetic_cohort

    tmp = None
    if args.out is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-synthetic-"))
        root = tmp
    else:
        root = Path(args.out)
        root.mkdir(parents=True, exist_ok=True)
    cohort_dir = root / f"cohort{args.n}"
    result = {"machine": machine_info("cpu"), "n": args.n, "seed": args.seed, "workers": args.workers}
    try:
        # the face model and templates are fetched and prepared once per process: time that apart
        from mriface.synthetic.facemodel import load_face_model
        from mriface.synthetic.scans import _template

        t0, c0 = time.perf_counter(), _cpu_s()
        load_face_model()
        for key in ("pydeface", "voxface"):
            _template(key)
        setup = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_s() - c0, 1)}
        t0, c0 = time.perf_counter(), _cpu_s()
        cohort = synthetic_cohort(args.n, seed=args.seed, out=cohort_dir, workers=args.workers)
        wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
        result["generation"] = {"setup": setup, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                "cpu_s_per_participant": round(cpu / args.n, 2),
                                "bytes": _du_bytes(cohort_dir), "load_avg_after": round(os.getloadavg()[0], 2)}

        photos = sorted(cohort.photos.glob("*/*.png"))
        result["synthetic"] = photo_similarities(photos, [p.parent.name for p in photos])
        real = datasets.sample_photos()
        rp = [p for ps in real.values() for p in ps]
        result["real"] = photo_similarities(rp, [k for k, ps in real.items() for _ in ps])

        if args.study:
            result["study_photos"] = _study(cohort.manifest, root / "study-photos", ["--photos", str(cohort.photos)])
            result["study_scans"] = _study(cohort.manifest, root / "study-s2s", ["--probes", "scans"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    write_json(result, args.json)
    _print(result)
    return result


def _print(r: dict) -> None:
    g = r["generation"]
    print(f"machine: {r['machine'].get('cpu')}, {r['machine'].get('cores')} cores, "
          f"load {r['machine'].get('load_avg_1min')} before, {g['load_avg_after']} after")
    print(f"generation of {r['n']} (workers {r['workers']}): {g['wall_s']} s wall, {g['cpu_s']} s CPU "
          f"({g['cpu_s_per_participant']} s per participant), {g['bytes'] / 1e6:.0f} MB; set-up {g['setup']}")
    for key in ("synthetic", "real"):
        s = r[key]
        print(f"{key:9s} photos {s['found']}/{s['n']} found, nearest is same person {s['nn_same']}")
        for kind in ("same", "different"):
            d = s[kind]
            if d.get("n"):
                print(f"    {kind:9s} cosine median {d['median']:.3f}  5-95% {d['p5']:.3f}-{d['p95']:.3f}  ({d['n']} pairs)")
    for key in ("study_photos", "study_scans"):
        if key in r:
            s = r[key]
            print(f"{key}: rank 1 {s['rank1']['count']}/{s['rank1']['n']}, top 5 {s['top5']['count']}/{s['top5']['n']}"
                  f"  ({s['wall_s']} s wall, {s['cpu_s']} s CPU)  {s['command']}")


if __name__ == "__main__":
    main()
