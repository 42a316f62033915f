"""Time the ``adversarial`` defacing method on one sample head (CPU or CUDA).

    python -m benchmarks.bench_deface_adversarial --device cuda --random-weights --json benchmarks/out/deface-adversarial.json
    python -m benchmarks.bench_deface_adversarial --head pydeface --profile benchmarks/out/deface-adversarial.prof

Where the templates (pydeface's average head, nilearn's brain mask) cannot be
fetched (the GPU host carries only the 'voxface' head), the face region is a
stand-in: the voxels within 45 mm of the face frame's centre on the face's
side; the brain mask is empty. The timing is of the method itself (surface,
detection, optimisation, write-back), not of registration; ``--random-weights``
times the network without its real weights (figures of *what* the method
achieves come from CPU runs with real weights, docs/deidentification.md).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks._common import machine_info, sync, write_json

QUICK_ARGS = ["--steps", "1", "--rounds", "1", "--views", "2", "--image-size", "128", "--target-faces", "20000",
              "--check-views", "2", "--check-size", "128", "--random-weights", "--model", "facenet", "--no-verify",
              "--json", "benchmarks/out/deface-adversarial-quick.json"]


def _context(vol, device):
    """The real DefaceContext, or a stand-in face region when the templates are not on this machine."""
    from mriface.deface import prepare
    from mriface.deface.core import DefaceContext
    from mriface.surface import extract_head_surface

    try:
        return prepare(vol), "registered"
    except Exception as exc:  # noqa: BLE001 (no templates on the GPU host: fetching fails in any number of ways)
        print(f"templates unavailable ({type(exc).__name__}: {exc}); stand-in face region")
    frame = extract_head_surface(vol, device=device).frame
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ vol.affine[:3, :3].T + vol.affine[:3, 3] - frame.center
    face = ((np.linalg.norm(xyz, axis=1) < 45.0) & (xyz @ frame.forward > -10.0)).reshape(vol.shape)
    return DefaceContext(template=None, registration=None, face=face, brain=np.zeros(vol.shape, bool),
                         tissue_ratio=1.0), "stand-in"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head", default="voxface")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="facenet")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--check-views", type=int, default=16)
    ap.add_argument("--check-size", type=int, default=512)
    ap.add_argument("--target-faces", type=int, default=None)
    ap.add_argument("--target-gap", type=float, default=None,
                    help="a fixed goal for own minus impostor similarity (cosine; default: the drawn stranger's)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--profile", default=None, help="write cProfile stats (CPU time) here and print the top")
    ap.add_argument("--json", default="benchmarks/out/deface-adversarial.json")
    a = ap.parse_args(argv)

    from mriface import datasets
    from mriface._device import resolve_device
    from mriface.deface.adversarial import adversarial_face
    from mriface.recognition import get_model
    from mriface.volume import load_volume

    dev = resolve_device(a.device)
    vol = load_volume(datasets.fetch(a.head))
    ctx, how = _context(vol, dev)
    model = get_model(a.model, device=dev, random_weights=a.random_weights)
    # random weights give a random target: stop by steps only (a goal no render reaches)
    goal = {"target_gap": -3.0} if a.random_weights else ({} if a.target_gap is None else {"target_gap": a.target_gap})
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile(time.process_time)
    sync(dev)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    _, _, info = adversarial_face(vol, ctx, model=model, steps=a.steps, rounds=a.rounds, views=a.views,
                                  image_size=a.image_size, check_views=a.check_views, check_size=a.check_size,
                                  target_faces=a.target_faces,
                                  **goal, device=dev, verify=not a.no_verify)
    sync(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        import pstats

        prof.disable()
        prof.dump_stats(a.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    info.pop("similarity_history", None)
    result = {"machine": machine_info(dev), "head": a.head, "context": how, "model": a.model,
              "random_weights": a.random_weights, "steps_asked": a.steps, "views": a.views,
              "load_average_start": round(load0, 2), "load_average_end": round(os.getloadavg()[0], 2),
              "image_size": a.image_size, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
              "per_step_s": round(info["seconds_by_step"]["optimise_check"] / max(info["steps"], 1), 3), "info": info}
    print(result)
    write_json(result, a.json)
    return result


if __name__ == "__main__":
    main()
