"""The face models side by side: torch ports against onnxruntime, same/different-person cosines, throughput.

Models: ``facenet`` (today's default), ``arcface-mbf`` (insightface
w600k_mbf) and ``sface`` (OpenCV zoo 2021dec), all through the registry.

1. **Port against the oracle** (ONNX models only): the torch port's raw
   (unnormalised) outputs against onnxruntime's on the same float32 inputs;
   relative error ``||e_torch - e_ort|| / ||e_ort||`` per crop, the largest
   reported. Inputs: the five reference crops of ``tests/data/facenet-reference``
   (160 px FaceNet crops, resized to 112 px bilinearly) and the four sample
   photographs aligned with each model's crop by :class:`FaceAligner`.
2. **Same person and different person**: cosine similarity of the
   L2-normalised embeddings on the sample photographs (obama x3: 3 same
   pairs; each obama with biden: 3 different pairs); the margin is the
   smallest same-person cosine minus the largest different-person one.
3. **Throughput**: aligned faces embedded per second (crops ready, batch
   ``--batch``; the best of ``--repeat`` timed passes after one warm-up), for
   every model in the same run; on the CPU also onnxruntime on the same
   crops as the peer (one session per model, whole-batch calls where the
   graph allows a batch, else one crop per call); and the aligner with
   FaceNet's crop alone against the aligner cutting all three models' crops
   from one detection (renders of 512x512 as in bench_recognition).
4. **A study's per-render work with several models** (``--renders``): the
   renders aligned and their faces embedded, as
   :func:`mriface.study.stages.process_scan` does it -- FaceNet alone (its
   crop only) against FaceNet, arcface-mbf and sface on one detection (one
   aligner with the three crops, each model embedding its own crops); the
   aligned-and-embedded renders per second of each, in the same rounds.

    .venv/bin/python -m benchmarks.bench_models [--device cpu|cuda] [--batch 64] [--repeat 3]
        [--random-weights] [--out benchmarks/out/models-<device>.json]

``--random-weights`` times networks with seeded random values (the GPU host
carries no FaceNet weights); parts 1-2 skip those models. On CUDA part 1 becomes
the device against the CPU (float32, float16, bfloat16) on the reference crops.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._common import machine_info, sync, write_json

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "data" / "facenet-reference"
MODELS = ("facenet", "arcface-mbf", "sface")
PHOTO_KEYS = ("obama", "obama2", "obama3", "biden")


def _registry():
    import mriface.recognition as rec
    from mriface.recognition import arcface, sface  # noqa: F401 - registers the two ONNX models

    return rec


def reference_crops(size: int) -> torch.Tensor:
    """The five reference faces as (5, 3, size, size) float 0..255 RGB."""
    ims = [Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR) for p in sorted(REF.glob("*.png"))]
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in ims]).transpose(0, 3, 1, 2).copy())


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # SFace lists its initializers as inputs: ort warns once per tensor
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_run(sess, x: np.ndarray) -> np.ndarray:
    """Run a session on a batch, one crop per call where the graph's batch is fixed at 1."""
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int) and inp.shape[0] == 1:
        return np.concatenate([sess.run(None, {inp.name: x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {inp.name: x})[0]


def port_errors(model, crops: torch.Tensor) -> dict:
    """Largest relative error of the torch port's raw outputs against onnxruntime, on normalised crops."""
    x = crops.float().contiguous()
    with torch.no_grad():
        mine = model.model.float().cpu()(x).numpy().astype(np.float64)
    model.model.to(model.device, model.dtype)
    ref = ort_run(ort_session(model.weights_path), x.numpy()).astype(np.float64)
    rel = np.linalg.norm(mine - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return {"n": int(len(x)), "max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean())}


def cosines(e: torch.Tensor) -> dict:
    """Same-person (obama pairs) and different-person (obama-biden) cosines of 4 unit rows."""
    c = (e.double() @ e.double().T).numpy()
    same = [c[0, 1], c[0, 2], c[1, 2]]
    diff = [c[0, 3], c[1, 3], c[2, 3]]
    return {"same": [round(float(v), 4) for v in same], "different": [round(float(v), 4) for v in diff],
            "margin": round(float(min(same) - max(diff)), 4),
            "separates": bool(min(same) > max(diff))}


def interleaved(jobs: "dict[str, tuple[callable, int, torch.device]]", repeat: int) -> "dict[str, float]":
    """Items per second of each ``name -> (fn, n_items, device)``, best of ``repeat`` rounds.

    One warm-up call each, then every round runs every job once in turn, so
    that on a shared machine all jobs see the same load.
    """
    for fn, _, _ in jobs.values():
        fn()
    best = {name: float("inf") for name in jobs}
    for _ in range(repeat):
        for name, (fn, _, device) in jobs.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: round(jobs[name][1] / best[name], 2) for name in jobs}


def main(argv: "list[str] | None" = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64, help="crops per timed embed call")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--renders", type=int, default=16, help="512x512 renders for the aligner timing (0: skip)")
    p.add_argument("--random-weights", nargs="*", default=None, metavar="MODEL",
                   help="models to time with seeded random weights (no names: all); parts 1-2 then skip them")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    randomized = set(MODELS if args.random_weights == [] else args.random_weights or ())

    import warnings

    rec = _registry()
    from mriface.recognition import FaceAligner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # the insightface licence notice, once
        models = {name: rec.get_model(name, device=args.device, random_weights=name in randomized)
                  for name in MODELS}
    result: dict = {"machine": machine_info(args.device), "batch": args.batch, "repeat": args.repeat,
                    "random_weights": sorted(randomized),
                    "models": {n: {"model_id": m.model_id(), "licence": m.licence} for n, m in models.items()}}
    trained = {n: m for n, m in models.items() if n not in randomized}

    if trained and torch.device(args.device).type == "cpu":
        from mriface import datasets

        photos = [datasets.fetch(k) for k in PHOTO_KEYS]
        aligner = FaceAligner(device="cpu", crops=tuple(dict.fromkeys(m.crop for m in trained.values())))
        a = aligner.align(photos)
        result["photos_found"] = a.found.tolist()
        for name, m in trained.items():
            entry = result["models"][name]
            entry["photos"] = cosines(m.embed(a))
            if name == "facenet":
                continue
            ref = m.crop.normalise(reference_crops(m.crop.size))
            entry["port_vs_onnxruntime"] = {"reference_crops": port_errors(m, ref),
                                            "sample_photos": port_errors(m, a.crop_for(m.crop))}
    elif trained:  # on CUDA: the same crops on the device against the CPU, at each precision
        for name, m in trained.items():
            ref = m.crop.normalise(reference_crops(m.crop.size))
            cpu = rec.get_model(name, device="cpu").embed(ref).double()
            agree = {}
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                m.model.to(dtype)
                m.dtype = dtype
                e = m.embed(ref).double()
                agree[str(dtype).replace("torch.", "")] = {
                    "min_cosine": round(float((e * cpu).sum(1).min()), 6),
                    "max_rel_error": float(((e - cpu).norm(dim=1) / cpu.norm(dim=1)).max())}
            m.model.to(torch.float32)
            m.dtype = torch.float32
            result["models"][name]["cuda_vs_cpu_reference_crops"] = agree

    gen = torch.Generator().manual_seed(0)
    jobs = {}
    for name, m in models.items():
        s = m.crop.size
        crops = m.crop.normalise(torch.rand((args.batch, 3, s, s), generator=gen) * 255)
        jobs[name] = (lambda m=m, c=crops: m.embed(c), args.batch, m.device)
        if name != "facenet" and m.device.type == "cpu":
            sess, x = ort_session(m.weights_path), crops.numpy()
            jobs[f"{name} (onnxruntime)"] = (lambda s=sess, x=x: ort_run(s, x), args.batch, m.device)
    result["embed_faces_per_s"] = interleaved(jobs, args.repeat)
    result["embed_note"] = f"crops ready, batches of {args.batch}"
    if torch.device(args.device).type == "cpu":
        import onnxruntime

        result["embed_note"] += (f"; peer: onnxruntime {onnxruntime.__version__} CPU provider, default threads, "
                                 "SFace one crop per call (its graph fixes the batch at 1)")

    if args.renders:
        from benchmarks.bench_recognition import make_renders

        renders = make_renders(args.renders, 512)
        one = FaceAligner(device=args.device)
        every = FaceAligner(device=args.device, crops=tuple(dict.fromkeys(m.crop for m in models.values())))
        dev = torch.device(args.device)
        result["align_renders_per_s"] = dict(n=args.renders, **interleaved(
            {"facenet_crop_only": (lambda: one.align(renders), args.renders, dev),
             "all_three_crops": (lambda: every.align(renders), args.renders, dev)}, args.repeat))

        def study_step(aligner, names):  # process_scan's align + embed stages
            a = aligner.align(renders)
            for n in names:
                c = a.crop_for(models[n].crop)[a.found]
                if len(c):
                    models[n].embed(c)

        result["align_and_embed_renders_per_s"] = dict(n=args.renders, **interleaved(
            {"facenet": (lambda: study_step(one, ["facenet"]), args.renders, dev),
             "+".join(MODELS): (lambda: study_step(every, list(MODELS)), args.renders, dev)}, args.repeat))

    out = Path(args.out or ROOT / "benchmarks" / "out" / f"models-{torch.device(args.device).type}.json")
    write_json(result, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(), indent=2, default=str))
