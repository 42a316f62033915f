"""Recognition speed at the study's size: MTCNN alignment and FaceNet embeddings.

Workload (the study): 840 renders of 512x512 (84 scans x 10) and 420
photographs (84 participants x 5); ``--small`` uses 20 and 10.

* renders: the five public aligned faces of ``tests/data/facenet-reference``
  scaled to 220-320 px and placed at random on a black 512x512 canvas, given
  to :class:`FaceAligner` as one float (N, 512, 512, 3) tensor, as
  ``RenderBatch.images`` would be;
* photographs: face_recognition's four test photographs (910x1137 to
  1434x2333) cycled, if cached; otherwise the same faces on 1000x1250 canvases.

Measured: our path (batched MTCNN + cropping, batched FaceNet) against the
named peer, **facenet-pytorch's own usage** (``MTCNN(image)`` then
``InceptionResnetV1(crop[None])``, one image at a time), on the same images in
the same run (alternating chunk by chunk so that both see the same load; the peer on a
share of every chunk on the CPU, on all images on CUDA);
float16/bfloat16 agreement with float32; and the matching step.

    .venv/bin/python -m benchmarks.bench_recognition [--small] [--device cuda] [--random-weights]
    .venv/bin/python -m benchmarks.bench_recognition --choose-render-agg   # the render_agg measurement
    .venv/bin/python -m benchmarks.bench_recognition --large-photos        # photo downscaling (issue 12)

``--large-photos`` times :class:`FaceAligner` on a 4000x3000 JPEG (a sample
photograph pasted onto a grey canvas at 1.6x), with the default downscaling
and without it, on two threads and on one core (best of 10; the machine is
shared), and compares FaceNet embeddings on the default path with the
full-size path (``detect_side=None``, ``decode_side=None``, the pre-refactor
behaviour): the sample photographs and the 4000x3000 JPEG. Table printed,
JSON in ``benchmarks/out/recognition_large_photos.json``.

``--choose-render-agg`` renders the four sample heads (gallery: 5 protocol
seeds x 10 views; probes: 5 seeds x 5 views under the same protocol and
under wider views and lighting) and compares ``max``, ``mean`` and
``centroid`` aggregation: per-probe rank-1 rate, verification AUC and d'.
Only numbers are kept; no render is written (two heads are real people).
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


def _faces() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(REF.glob("*.png"))]


def make_renders(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) float in [0, 1]: a face pasted on black at a random place and scale."""
    rng = np.random.default_rng(seed)
    faces = _faces()
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        s = int(rng.uniform(0.43, 0.62) * size)
        f = np.asarray(faces[i % len(faces)].resize((s, s), Image.BILINEAR))
        y, x = rng.integers(0, size - s, 2)
        out[i, y:y + s, x:x + s] = (f * rng.uniform(0.7, 1.0)).astype(np.uint8)
    return torch.from_numpy(out).float() / 255.0


def make_photos(n: int) -> tuple[list[np.ndarray], str]:
    """n photographs as uint8 arrays of their own sizes, and where they came from."""
    try:
        from mriface import datasets

        base = [np.asarray(Image.open(datasets.fetch(k, download=False)).convert("RGB"))
                for k in ("obama", "obama2", "obama3", "biden")]
        source = "face_recognition 1.3.0 test photographs (910x1137 .. 1434x2333)"
    except Exception:  # noqa: BLE001 - not cached (e.g. on the GPU host): synthetic stand-ins
        base = []
        for f in _faces():
            c = np.full((1250, 1000, 3), 90, np.uint8)
            c[300:800, 250:750] = np.asarray(f.resize((500, 500), Image.BILINEAR))
            base.append(c)
        source = "reference faces on 1000x1250 canvases (photographs not cached)"
    return [base[i % len(base)] for i in range(n)], source


def _timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def run_peer(mtcnn, images: "list[Image.Image]", model: torch.nn.Module, device: torch.device) -> dict:
    """facenet-pytorch's documented usage, one image at a time: MTCNN(img) -> resnet(crop[None]).

    Returns summed seconds: ``{"n", "found", "align_s", "embed_s"}``.
    """
    n_found, t_det, t_emb = 0, 0.0, 0.0
    for img in images:
        crop, dt = _timed(lambda: mtcnn(img), device)
        t_det += dt
        if crop is None:
            continue
        n_found += 1
        with torch.no_grad():
            _, dt = _timed(lambda: model(crop[None].to(device)), device)
        t_emb += dt
    return {"n": len(images), "found": n_found, "align_s": t_det, "embed_s": t_emb}


def _add(acc: dict, part: dict) -> None:
    for key, value in part.items():
        acc[key] = acc.get(key, 0) + value


def precision_agreement(crops: torch.Tensor, weights_model: torch.nn.Module, device: torch.device,
                        dtypes: "list[torch.dtype]") -> dict:
    """Cosine between reduced-precision and float32 embeddings of the same crops; nearest-neighbour agreement."""
    from mriface.recognition import FaceNetEmbedder

    e32 = FaceNetEmbedder.from_model(weights_model, device=device).embed(crops)
    out = {}
    for dt in dtypes:
        low = FaceNetEmbedder.from_model(weights_model, device=device, dtype=dt)
        low.embed(crops[:2])  # warm-up
        (e, secs) = _timed(lambda: low.embed(crops), device)
        cos = (e * e32).sum(1)
        nn32 = (torch.cdist(e32, e32) + 1e3 * torch.eye(len(e32))).argmin(1)
        nn_lo = (torch.cdist(e, e) + 1e3 * torch.eye(len(e))).argmin(1)
        out[str(dt).replace("torch.", "")] = {
            "n": len(crops), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "max_abs_diff": float((e - e32).abs().max()),
            "nearest_neighbour_agreement": float((nn32 == nn_lo).float().mean()),
            "embed_per_s": len(crops) / secs,
        }
    return out


def choose_render_agg(device: torch.device, out_path: Path, n_seeds: int = 5) -> dict:
    """Compare render aggregations on renders of the sample heads (see module docstring)."""
    from dataclasses import replace

    from mriface import datasets, match
    from mriface.recognition import FaceAligner, FaceNetEmbedder
    from mriface.render import RenderProtocol, render_views
    from mriface.surface import extract_head_surface
    from mriface.volume import load_volume

    surfs = {h: extract_head_surface(load_volume(datasets.fetch(h)), device=device) for h in datasets.HEADS}
    aligner = FaceAligner(device=device, min_face_size=60)  # faces fill the renders
    embedder = FaceNetEmbedder(device=device)

    def embed(proto):
        batch = render_views(surfs, proto, device=device)
        e = embedder.embed(aligner.align(batch.images)).numpy()
        return {s: e[[i for i, x in enumerate(batch.subjects) if x == s]] for s in surfs}

    base = RenderProtocol(views=10, seed=0)
    wide = dict(azimuth_deg=(-40.0, 40.0), elevation_deg=(-15.0, 20.0), light_azimuth_deg=(-70.0, 70.0))
    galleries = [embed(replace(base, seed=g)) for g in range(n_seeds)]
    probe_sets = {"same protocol": [embed(replace(base, views=5, seed=100 + i)) for i in range(n_seeds)],
                  "wider views and light": [embed(replace(base, views=5, seed=200 + i, **wide))
                                            for i in range(n_seeds)]}
    out = {}
    for pname, sets in probe_sets.items():
        for agg in match.RENDER_AGGS:
            hits, aucs, gen, imp = [], [], [], []
            for gal in galleries:
                ok = {g: v[np.all(np.isfinite(v), 1)] for g, v in gal.items()}
                for probes in sets:
                    aucs.append(match.run_matching(gal, {s: list(v) for s, v in probes.items()},
                                                   render_agg=agg).roc_auc)
                    for s, v in probes.items():
                        for p in v:
                            if not np.all(np.isfinite(p)):
                                hits.append(0)
                                continue
                            sc = {g: match.subject_similarity(p[None], r, agg)[0] for g, r in ok.items()}
                            others = [x for g, x in sc.items() if g != s]
                            hits.append(int(sc[s] > max(others)))
                            gen.append(sc[s])
                            imp.extend(others)
            gen, imp = np.asarray(gen), np.asarray(imp)
            out[f"{pname} | {agg}"] = {
                "probe_rank1": float(np.mean(hits)), "n_probe_trials": len(hits),
                "auc_mean": float(np.mean(aucs)),
                "dprime": float((gen.mean() - imp.mean()) / np.sqrt((gen.var() + imp.var()) / 2))}
            print(f"{pname:24s} {agg:9s} " + "  ".join(f"{k} {v:.4f}" for k, v in out[f"{pname} | {agg}"].items()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, out_path)
    return out


def _best_align(aligner, path: Path, repeats: int) -> dict:
    """Best wall and CPU seconds of ``aligner.align([path])`` over ``repeats`` runs (after one warm-up)."""
    import os

    aligner.align([path])
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        a = aligner.align([path])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s_best": min(wall), "wall_s_median": float(np.median(wall)), "cpu_s_best": min(cpu),
            "repeats": repeats, "found": bool(a.found.all()), "load_avg_1min": os.getloadavg()[0]}


def large_photos(out_path: Path, repeats: int = 10, full_repeats: int = 2) -> dict:
    """Photo downscaling: time a 4000x3000 JPEG, and check embeddings against the full-size path.

    Timed on all cores with two torch threads, then on one core with one
    thread (``sched_setaffinity``; the load-robust figure on a shared
    machine); best of ``repeats`` runs each (``full_repeats`` for the slow
    full-size path). Cosines: the sample photographs and the 4000x3000 JPEG,
    default path against the full-size path (``detect_side=None,
    decode_side=None``).
    """
    import os
    import tempfile

    from mriface import datasets
    from mriface.recognition import FaceAligner, get_model

    photos = [p for ps in datasets.sample_photos().values() for p in ps]
    face = Image.open(photos[0]).convert("RGB")
    model = get_model("facenet", device="cpu")
    full_kw = {"detect_side": None, "decode_side": None}
    cores = sorted(os.sched_getaffinity(0))
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jpg"
        canvas = Image.new("RGB", (4000, 3000), (90, 90, 90))
        canvas.paste(face.resize((int(face.width * 1.6), int(face.height * 1.6)), Image.BICUBIC), (1000, 200))
        canvas.save(big, quality=92)
        for mode, threads, cpus in (("2 threads", min(2, len(cores)), cores), ("1 core", 1, cores[:1])):
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, cpus)
            try:
                for name, kw, n in (("default", {}, repeats), ("full_size", full_kw, full_repeats)):
                    timings[f"{name} | {mode}"] = _best_align(FaceAligner(device="cpu", **kw), big, n)
            finally:
                os.sched_setaffinity(0, cores)
        torch.set_num_threads(min(2, len(cores)))
        big_full = model.embed(FaceAligner(device="cpu", **full_kw).align([big]))
        big_dflt = model.embed(FaceAligner(device="cpu").align([big]))
    full = FaceAligner(device="cpu", **full_kw).align(photos)
    dflt = FaceAligner(device="cpu").align(photos)
    e_full, e_dflt = model.embed(full), model.embed(dflt)
    cos = (e_full * e_dflt).sum(1)
    out = {"machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "photo_4000x3000": timings,
           "photo_4000x3000_cosine_to_full_size_path": float((big_full * big_dflt).sum()),
           "sample_photos": {"files": [p.name for p in photos],
                             "cosine_to_full_size_path": cos.tolist(),
                             "max_box_difference_px": float((full.boxes - dflt.boxes).abs().max())}}
    write_json(out, out_path)
    print(f"4000x3000 JPEG on {out['machine']['cpu']} ({len(cores)} cores), best of {repeats} "
          f"(full size: {full_repeats})")
    print(f"{'path | threads':28s} {'wall s':>8s} {'cpu s':>8s} {'load 1 min':>10s}")
    for name, t in timings.items():
        print(f"{name:28s} {t['wall_s_best']:8.3f} {t['cpu_s_best']:8.3f} {t['load_avg_1min']:10.2f}")
    print(f"cosine to the full-size path: 4000x3000 JPEG {out['photo_4000x3000_cosine_to_full_size_path']:.5f}; "
          f"sample photographs min {float(cos.min()):.7f} (boxes within "
          f"{out['sample_photos']['max_box_difference_px']:.1e} px)")
    print(f"wrote {out_path}")
    return out


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="20 renders and 10 photographs")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--random-weights", action="store_true",
                   help="random FaceNet weights (timing only; for hosts without the weights file)")
    p.add_argument("--renders", type=int, default=None, help="number of renders (default 840; --small 40)")
    p.add_argument("--photos", type=int, default=None, help="number of photographs (default 420; --small 20)")
    p.add_argument("--size", type=int, default=512, help="render side in pixels")
    p.add_argument("--peer-fraction", type=float, default=None,
                   help="share of the images the per-image peer runs on (default: 1 on CUDA, 0.1 on CPU)")
    p.add_argument("--choose-render-agg", action="store_true",
                   help="measure max/mean/centroid render aggregation on renders of the sample heads")
    p.add_argument("--large-photos", action="store_true",
                   help="time a 4000x3000 photograph and check downscaling on the sample photographs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "recognition.json"))
    args = p.parse_args(argv)
    if args.large_photos:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        large_photos(ROOT / "benchmarks" / "out" / "recognition_large_photos.json")
        return 0
    if args.choose_render_agg:
        from mriface._device import resolve_device as _rd

        choose_render_agg(_rd(args.device), ROOT / "benchmarks" / "out" / "recognition_render_agg.json")
        return 0

    from mriface._device import resolve_device
    from mriface.recognition import FaceAligner, FaceNetEmbedder

    device = resolve_device(args.device)  # FaceNetEmbedder directly: from_model() is needed for the precision runs
    n_r = args.renders or (20 if args.small else 840)
    n_p = args.photos or (10 if args.small else 420)
    frac = args.peer_fraction if args.peer_fraction is not None else (1.0 if device.type == "cuda" else 0.1)
    if args.small and args.peer_fraction is None:
        frac = 0.25 if device.type == "cpu" else 1.0

    torch.manual_seed(0)  # --random-weights: the same network every run
    renders = make_renders(n_r, args.size)
    photos, photo_source = make_photos(n_p)
    embedder = FaceNetEmbedder(device=device, random_weights=args.random_weights)
    aligner = FaceAligner(device=device)

    # warm-up: CUDA context, cuDNN autotuning, MTCNN's first pass
    aligner.align(renders[:2])
    embedder.embed(torch.zeros(2, 3, 160, 160))

    # Ours and the peer alternate chunk by chunk, so both see the same machine load
    # (this CPU is shared); the peer runs on the first `frac` of every chunk.
    from facenet_pytorch import MTCNN

    peer_mtcnn = MTCNN(image_size=160, margin=0, device=device)
    n_chunks = max(1, min(10, n_r, n_p))
    r_edges = np.linspace(0, n_r, n_chunks + 1).astype(int)
    p_edges = np.linspace(0, n_p, n_chunks + 1).astype(int)
    o_r, o_p, o_e = {}, {}, {}
    peer_r, peer_p = {}, {}
    al_r, al_p, emb_r, emb_p = [], [], [], []
    for c in range(n_chunks):
        rc = renders[r_edges[c]:r_edges[c + 1]]
        pc = photos[p_edges[c]:p_edges[c + 1]]
        a_r, t = _timed(lambda: aligner.align(rc), device)
        _add(o_r, {"n": len(rc), "found": int(a_r.found.sum()), "align_s": t})
        a_p, t = _timed(lambda: aligner.align(pc), device)
        _add(o_p, {"n": len(pc), "found": int(a_p.found.sum()), "align_s": t})
        e_r, t1 = _timed(lambda: embedder.embed(a_r), device)
        e_p, t2 = _timed(lambda: embedder.embed(a_p), device)
        _add(o_e, {"n": int(a_r.found.sum() + a_p.found.sum()), "embed_s": t1 + t2})
        al_r.append(a_r), al_p.append(a_p), emb_r.append(e_r), emb_p.append(e_p)
        k_r, k_p = max(1, int(round(len(rc) * frac))), max(1, int(round(len(pc) * frac)))
        _add(peer_r, run_peer(peer_mtcnn, [Image.fromarray((x.numpy() * 255 + 0.5).astype(np.uint8))
                                           for x in rc[:k_r]], embedder.model, device))
        _add(peer_p, run_peer(peer_mtcnn, [Image.fromarray(x) for x in pc[:k_p]], embedder.model, device))
    t_total = o_r["align_s"] + o_p["align_s"] + o_e["embed_s"]
    ours = {
        "renders": {**o_r, "align_per_s": o_r["n"] / o_r["align_s"]},
        "photos": {**o_p, "align_per_s": o_p["n"] / o_p["align_s"]},
        "embed": {**o_e, "embed_per_s": o_e["n"] / o_e["embed_s"]},
        "total_s": t_total,
        "total_images_per_s": (n_r + n_p) / t_total,
    }
    peer = {}
    for name, d in (("renders", peer_r), ("photos", peer_p)):
        peer[name] = {**d, "align_per_s": d["n"] / d["align_s"], "embed_per_s": d["found"] / max(d["embed_s"], 1e-9),
                      "total_per_s": d["n"] / (d["align_s"] + d["embed_s"])}
    k_r, k_p = peer_r["n"], peer_p["n"]
    crops = torch.cat([a.crops[a.found] for a in al_r + al_p])

    # matching at the study's size: 84 subjects x 10 renders, 84 participants x 5 photos
    e_r, e_p = torch.cat(emb_r), torch.cat(emb_p)
    n_sub = max(1, n_r // 10)
    gallery = {f"sub-{i:03d}": e_r[i::n_sub].numpy() for i in range(n_sub)}
    n_part = max(1, n_p // 5)
    probes = {f"sub-{i:03d}": list(e_p[i::n_part].numpy()) for i in range(n_part)}
    try:  # pandas is not on every GPU host
        from mriface import match

        res, t_match = _timed(lambda: match.run_matching(gallery, probes), torch.device("cpu"))
        rank1 = res.summary["rank1"]
    except ImportError as exc:
        t_match, rank1 = float("nan"), f"skipped: {exc}"
    ours["match_s"] = t_match

    ratio = {
        "align_renders": ours["renders"]["align_per_s"] / peer["renders"]["align_per_s"],
        "align_photos": ours["photos"]["align_per_s"] / peer["photos"]["align_per_s"],
        "embed": ours["embed"]["embed_per_s"] / (
            (peer["renders"]["found"] + peer["photos"]["found"])
            / (peer["renders"]["embed_s"] + peer["photos"]["embed_s"])),
        "end_to_end": ours["total_images_per_s"] / (
            (k_r + k_p) / sum(peer[k]["align_s"] + peer[k]["embed_s"] for k in ("renders", "photos"))),
    }

    # with --random-weights the agreement is not informative (a random network's embeddings barely
    # differ between faces); the CPU run with the real weights measures it, float16 emulated there
    dtypes = [torch.float16, torch.bfloat16]
    sub = crops[: (len(crops) if device.type == "cuda" else min(len(crops), 8 if args.small else 32))]
    agreement = precision_agreement(sub, embedder.model, device, dtypes)

    result = {"machine": machine_info(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "weights": "random" if args.random_weights else "CASIA-WebFace (converted)",
              "workload": {"renders": n_r, "render_size": args.size, "photos": n_p, "photo_source": photo_source,
                           "peer_fraction": frac},
              "ours": ours, "peer_facenet_pytorch_per_image": peer, "speedup_ours_over_peer": ratio,
              "precision_agreement": agreement, "match_summary_rank1": rank1}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)

    m = result["machine"]
    print(f"recognition benchmark on {m.get('gpu', m['cpu'])} ({m['cores']} cores), torch {m['torch']}, "
          f"device {device}, weights {result['weights']}")
    print(f"{'stage':28s} {'ours /s':>10s} {'peer /s':>10s} {'ratio':>7s}")
    rows = [("align renders " + f"{args.size}px", ours["renders"]["align_per_s"], peer["renders"]["align_per_s"],
             ratio["align_renders"]),
            ("align photographs", ours["photos"]["align_per_s"], peer["photos"]["align_per_s"], ratio["align_photos"]),
            ("embed (FaceNet)", ours["embed"]["embed_per_s"],
             ours["embed"]["embed_per_s"] / ratio["embed"], ratio["embed"]),
            ("end to end (images)", ours["total_images_per_s"], ours["total_images_per_s"] / ratio["end_to_end"],
             ratio["end_to_end"])]
    for name, a, b, r in rows:
        print(f"{name:28s} {a:10.2f} {b:10.2f} {r:7.2f}x")
    print(f"study size total (ours): {ours['total_s']:.1f} s for {n_r} renders + {n_p} photographs; "
          f"matching {t_match * 1000:.0f} ms; peer ran on {k_r} renders + {k_p} photographs")
    print(f"faces found: renders {ours['renders']['found']}/{n_r}, photographs {ours['photos']['found']}/{n_p}")
    for name, a in agreement.items():
        print(f"{name} vs float32 on {a['n']} crops: cosine min {a['cos_min']:.5f} mean {a['cos_mean']:.5f}, "
              f"nearest-neighbour agreement {a['nearest_neighbour_agreement']:.3f}, {a['embed_per_s']:.1f} /s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
