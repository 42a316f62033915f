"""The per-scan and per-photograph work of a study: stages, cached results.

:class:`Pipeline` holds the stages (load, surface, render, align, embed)
and builds the face models on first use. :func:`process_scan` takes one scan
(a volume or a mesh file) through them, or one transformed scan when a
transform is given; :func:`process_photos` does one participant's
photographs. Both read and fill the cache (:mod:`mriface.study.cache`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._io import jsonable
from ..errors import MRIFaceError, TransformError
from ..inputs import Problem, Scan
from . import cache as _cache

__all__ = ["Pipeline", "ScanResult", "PhotoResult", "process_scan", "process_photos"]

log = logging.getLogger("mriface.study")


class Pipeline:
    """The per-scan stages, with models built on first use.

    ``run_study`` calls ``load``, ``surface``, ``render``, ``align`` and
    ``embed``; tests may pass a subclass with cheaper stages. The face
    models load only when something is not cached.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    backend : str
        Renderer backend (``"auto"``: zbuffer on CUDA, embree on the CPU; or
        any name from :func:`mriface.render.available_backends`).
    model : str
        Face model, a name from :func:`mriface.recognition.available_models`.
    weights : str or Path, optional
        The model's weights file (default: the model's own).
    random_weights : bool
        Use an untrained network (timing runs where the weights are absent;
        the ranks mean nothing).
    """

    def __init__(self, *, device: str = "auto", backend: str = "auto", model: str = "facenet",
                 weights: "str | os.PathLike[str] | None" = None, random_weights: bool = False):
        from .._device import resolve_device
        from ..recognition import available_models
        from ..render import resolve_backend

        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device)
        if model not in available_models():  # say so now, not after the first scan's surface
            raise MRIFaceError(f"unknown face model {model!r}: available models are "
                               f"{', '.join(available_models())} (mriface.recognition.register_model adds one)")
        self.model = model
        self.weights = weights
        self.random_weights = random_weights
        self._aligner: dict = {}
        self._embedder = None
        self._digests: dict[tuple, str] = {}
        # Hashed once, when the stages are loaded: the code that runs is the code imported now.
        self._code = {"surface": _cache.code_digest("volume", "surface"),
                      "render": _cache.code_digest("render", "recognition"),
                      "recognition": _cache.code_digest("recognition")}

    # ---- identity of the work, for cache keys
    def file_digest(self, path: Path) -> str:
        """SHA-256 of a file's bytes (memoised by path, size and mtime for this run)."""
        from .._io import sha256_file

        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = sha256_file(path)
        return self._digests[memo]

    def surface_options(self) -> dict:
        """What a surface depends on besides the scan's bytes: the loading and surface code."""
        return {"extract_head_surface": "defaults", "code": self._code["surface"]}

    def render_options(self) -> dict:
        """What renders and embeddings depend on besides surface, protocol and model: the code."""
        return {"backend": self.backend, "code": self._code["render"],
                "render_min_face": "image_size // 8, at least 20"}

    def model_id(self) -> dict:
        """What an embedding depends on besides the image: the face model's identity and the aligner."""
        return {"model": self.embedder.model_id(), "aligner": "FaceAligner defaults"}

    @property
    def dim(self) -> int:
        """Embedding size of the face model."""
        return int(self.embedder.dim)

    # ---- stages
    def load(self, path: Path):
        """Scan file -> :class:`~mriface.volume.Volume`, or mesh file -> :class:`~mriface.surface.HeadSurface`."""
        from ..scans import load_scan

        return load_scan(path)

    def surface(self, volume):
        """:class:`~mriface.volume.Volume` -> :class:`~mriface.surface.HeadSurface` (a surface passes through)."""
        from ..surface import HeadSurface, extract_head_surface

        if isinstance(volume, HeadSurface):
            return volume
        return extract_head_surface(volume, device=self.device)

    def render(self, surface, subject: str, protocol):
        """One subject's renders: a :class:`~mriface.render.RenderBatch`."""
        from ..render import render_views

        return render_views({subject: surface}, protocol, backend=self.backend, device=self.device)

    @property
    def aligner(self):
        """The photographs' aligner: facenet-pytorch's MTCNN with mriface's defaults."""
        return self._aligner_for(None)

    def _aligner_for(self, min_face_size: "int | None"):
        from ..recognition import FaceAligner

        if min_face_size not in self._aligner:
            kw = {} if min_face_size is None else {"min_face_size": int(min_face_size)}
            self._aligner[min_face_size] = FaceAligner(device=self.device, crops=(self.embedder.crop,), **kw)
        return self._aligner[min_face_size]

    @staticmethod
    def render_min_face(image_size: int) -> int:
        """Smallest face (pixels) MTCNN looks for in a render of ``image_size`` pixels.

        A render is a portrait: the protocol's distance and field of view
        make the face about half the image high. Photographs can show small
        faces, renders cannot, so MTCNN's image pyramid can start at a
        coarser scale: at 512 pixels this skips most of its work.
        """
        return max(20, int(image_size) // 8)

    @property
    def embedder(self):
        """The face model (:func:`mriface.recognition.get_model`), built on first use."""
        if self._embedder is None:
            import torch

            from ..recognition import get_model

            # A fixed seed without touching the caller's generator: the same
            # random network in every run, so cached embeddings stay comparable.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._embedder = get_model(self.model, device=self.device, weights=self.weights,
                                           random_weights=self.random_weights)
        return self._embedder

    def prepare(self, image_size: int) -> None:
        """Build the face models now, so that stage timings do not include loading them."""
        self._aligner_for(self.render_min_face(image_size))

    def align(self, images):
        """Images -> Alignment (crops for the model, found, prob, boxes, n_faces).

        A (N, H, W, 3) tensor is a batch of renders (see :meth:`render_min_face`);
        anything else (paths, arrays) is photographs.
        """
        if hasattr(images, "shape") and len(images.shape) == 4 and not isinstance(images, (list, tuple)):
            return self._aligner_for(self.render_min_face(int(images.shape[1]))).align(images)
        return self.aligner.align(images)

    def embed(self, crops) -> np.ndarray:
        """(n, 3, S, S) crops -> (n, dim) float32 L2-normalised embeddings."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(_np(self.embedder.embed(crops)), np.float32)


# --------------------------------------------------------------------------- per-scan results
@dataclass
class ScanResult:
    """One scan rendered under one protocol and embedded.

    Attributes
    ----------
    subject : str
        Subject id.
    role : str
        ``"gallery"``, ``"probe-scan"``, ``"probe-protocol"`` or ``"probe-<transform>"``.
    path : Path
        The scan file.
    embeddings : numpy.ndarray
        (V, dim) float32, one row per render; rows of renders with no face are NaN.
    found : numpy.ndarray
        (V,) bool: a face was detected in the render.
    prob : numpy.ndarray
        (V,) float detection probability (NaN where none).
    renders : list of dict
        Per render: view index, camera and light parameters, detection results.
    timings : dict
        Seconds per stage (``load``, ``surface``, ``transform``, ``render``, ``align``, ``embed``) when computed.
    cached : bool
        Read from the cache (nothing recomputed).
    problem : Problem or None
        Why the scan gave nothing, when it did not.
    """

    subject: str
    role: str
    path: Path
    embeddings: np.ndarray
    found: np.ndarray
    prob: np.ndarray
    renders: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    cached: bool = False
    problem: "Problem | None" = None

    @property
    def n_found(self) -> int:
        return int(np.count_nonzero(self.found))

    def gallery_embeddings(self) -> "np.ndarray | None":
        """(n_found, dim) embeddings of renders with a face, or None when there is none."""
        if self.n_found == 0:
            return None
        return self.embeddings[self.found]

    def probe_embeddings(self) -> list["np.ndarray | None"]:
        """One entry per render: its (dim,) embedding, or None where no face was found."""
        if self.embeddings.shape[0] == 0:
            return [None]  # a failed scan still counts as one failed probe
        return [e if ok else None for e, ok in zip(self.embeddings, self.found)]


@dataclass
class PhotoResult:
    """A participant's photographs, aligned and embedded."""

    participant: str
    paths: list[Path]
    embeddings: np.ndarray  # (P, dim), NaN rows where no face
    found: np.ndarray  # (P,) bool
    prob: np.ndarray
    cached: bool = False
    problems: list = field(default_factory=list)

    def probe_embeddings(self) -> list["np.ndarray | None"]:
        return [e if ok else None for e, ok in zip(self.embeddings, self.found)]


# --------------------------------------------------------------------------- one scan
def _surface_for(scan: Scan, pipeline: Pipeline, cache: _cache.CacheLayout, timings: dict,
                 stage: Callable[[str], None]):
    """The scan's HeadSurface, from the cache or computed (and cached)."""
    from ..surface import load_surface_npz

    skey = _cache.key({"v": _cache.CACHE_VERSION, "file": pipeline.file_digest(scan.path),
                       "surface": pipeline.surface_options()})
    path = cache.surface(scan.subject, skey)
    if path.is_file():
        try:
            return load_surface_npz(path)
        except (OSError, ValueError, KeyError):
            log.warning("surface cache %s is damaged; recomputing", path)
    with _timed("load", timings, stage):
        volume = pipeline.load(scan.path)
    with _timed("surface", timings, stage):
        surface = pipeline.surface(volume)
    _cache.save_surface(surface, path)
    return surface


@contextlib.contextmanager
def _timed(name: str, timings: dict, stage: Callable[[str], None]):
    """Announce stage ``name`` and record its seconds in ``timings`` when it finishes."""
    stage(name)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def _transformed_surface(scan: Scan, transform, pipeline: Pipeline, cache: _cache.CacheLayout,
                         timings: dict, stage: Callable[[str], None]):
    """The transformed scan's HeadSurface: ``transform`` on the volume (then reconstructed) or on the surface."""
    if transform.on == "surface":
        surface = _surface_for(scan, pipeline, cache, timings, stage)
        with _timed("transform", timings, stage):
            return transform.apply(surface, scan)
    with _timed("load", timings, stage):
        volume = pipeline.load(scan.path)
    with _timed("transform", timings, stage):
        volume = transform.apply(volume, scan)
    with _timed("surface", timings, stage):
        return pipeline.surface(volume)


def process_scan(scan: Scan, role: str, protocol: Any, pipeline: Pipeline, cache_root: "str | Path", *,
                 images_dir: "Path | None" = None, transform: Any = None,
                 on_stage: "Callable[[str], None] | None" = None) -> ScanResult:
    """Reconstruct, render, align and embed one scan, using and filling the cache.

    Parameters
    ----------
    scan : Scan
        The scan file (a volume or a mesh) and its subject id.
    role : str
        ``"gallery"``, ``"probe-scan"``, ``"probe-protocol"`` or a transform's role (names the entry).
    protocol : RenderProtocol
        How to render (views, size, seed, ranges).
    pipeline : Pipeline
        The stages.
    cache_root : str or Path
        Cache folder.
    images_dir : Path, optional
        Also write the renders as PNG here (``include_images``).
    transform : TransformProbes, optional
        Render the scan after this transform (:class:`mriface.study.TransformProbes`).
    on_stage : callable, optional
        Called with each stage's name as it starts (for progress displays).

    Returns
    -------
    ScanResult
        With ``problem`` set (and no embeddings) when the scan could not be
        read, transformed or reconstructed; errors of other kinds propagate (bugs).
    """
    cache = _cache.CacheLayout(cache_root)
    timings: dict[str, float] = {}
    stage = on_stage or (lambda name: None)

    def failed(exc: BaseException) -> ScanResult:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind = "transform_failed" if isinstance(exc, TransformError) else "scan_failed"
        problem = Problem(kind, str(scan.path),
                          f"{role} scan of subject {scan.subject!r} failed: {first}", scan.subject)
        log.warning("%s", problem)
        return ScanResult(scan.subject, role, scan.path, np.zeros((0, pipeline.dim), np.float32),
                          np.zeros(0, bool), np.zeros(0), timings=timings, problem=problem)

    model = pipeline.model_id()  # a weights problem stops the study: it is not this scan's fault
    try:
        digest = pipeline.file_digest(scan.path)
        skey = _cache.key({"v": _cache.CACHE_VERSION, "file": digest, "surface": pipeline.surface_options()})
        what = {"v": _cache.CACHE_VERSION, "surface": skey, "protocol": _cache.protocol_dict(protocol),
                "render": pipeline.render_options(), "model": model}
        if transform is not None:
            what["transform"] = transform.identity()
        stem = cache.renders(scan.subject, role, _cache.key(what))
        entry = _cache.read_entry(stem) if transform is None or transform.cacheable else None
        if entry is not None and (images_dir is None or (images_dir / scan.subject).is_dir()):
            meta, arr = entry
            return ScanResult(scan.subject, role, scan.path, arr["embeddings"], arr["found"].astype(bool),
                              arr["prob"], meta.get("renders", []), meta.get("timings", {}), True)
        if transform is None:
            surface = _surface_for(scan, pipeline, cache, timings, stage)
        else:
            surface = _transformed_surface(scan, transform, pipeline, cache, timings, stage)
    except (MRIFaceError, OSError) as exc:  # TransformError (a transform that raised) included
        return failed(exc)
    pipeline.prepare(int(protocol.image_size))  # models load outside the stage timings
    try:
        with _timed("render", timings, stage):
            batch = pipeline.render(surface, scan.subject, protocol)
    except MRIFaceError as exc:  # e.g. a surface with nothing in front of its face frame
        return failed(exc)
    if images_dir is not None:
        from ..render import write_renders

        write_renders(batch, images_dir / scan.subject)
    with _timed("align", timings, stage):
        al = pipeline.align(batch.images)
    found = np.asarray(_np(al.found), bool).reshape(-1)
    with _timed("embed", timings, stage):
        emb = _embed_found(pipeline, al.crops, found)
    prob = np.asarray(_np(al.prob), float).reshape(-1)
    renders = _render_records(batch, al)
    meta = {"subject": scan.subject, "role": role, "scan": str(scan.path), "sha256": digest,
            "cache_version": _cache.CACHE_VERSION, "protocol": _cache.protocol_dict(protocol),
            "backend": pipeline.backend, "device": str(pipeline.device), "timings": timings,
            "renders": renders, "n_found": int(found.sum())}
    if transform is not None:
        meta["transform"] = transform.identity()
    if transform is None or transform.cacheable:
        _cache.write_entry(stem, meta, embeddings=emb, found=found, prob=prob)
    return ScanResult(scan.subject, role, scan.path, emb, found, prob, renders, timings, False)


def _embed_found(pipeline: Pipeline, crops, found: np.ndarray) -> np.ndarray:
    """(n, dim) embeddings of the crops where ``found``; NaN rows elsewhere."""
    dim = pipeline.dim
    emb = np.full((found.size, dim), np.nan, np.float32)
    if found.any():
        emb[found] = pipeline.embed(crops[_torch_index(crops, found)])
    return emb


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _torch_index(crops, mask: np.ndarray):
    if hasattr(crops, "detach"):
        import torch

        return torch.as_tensor(mask, device=crops.device)
    return mask


def _render_records(batch, al) -> list[dict]:
    """Per render: its parameters (from the batch) and what the detector found."""
    try:
        recs = jsonable(batch.to_dataframe().to_dict(orient="records"))
    except AttributeError:
        recs = [{"view": i} for i in range(len(batch.images))]
    found, prob = _np(al.found).reshape(-1), _np(al.prob).reshape(-1)
    n_faces = _np(al.n_faces).reshape(-1) if getattr(al, "n_faces", None) is not None else None
    boxes = _np(al.boxes) if getattr(al, "boxes", None) is not None else None
    for i, r in enumerate(recs):
        r["face_found"] = bool(found[i])
        r["face_prob"] = None if not math.isfinite(float(prob[i])) else float(prob[i])
        if n_faces is not None:
            r["n_faces"] = int(n_faces[i])
        if boxes is not None:
            r["box"] = [None if not math.isfinite(float(b)) else float(b) for b in boxes[i]]
    return recs


# --------------------------------------------------------------------------- photographs
def process_photos(participant: str, paths: Sequence[Path], pipeline: Pipeline,
                   cache_root: "str | Path") -> PhotoResult:
    """Align and embed one participant's photographs (cached by their bytes)."""
    cache = _cache.CacheLayout(cache_root)
    paths = [Path(p) for p in paths]
    k = _cache.key({"v": _cache.CACHE_VERSION, "photos": [pipeline.file_digest(p) for p in paths],
                    "model": pipeline.model_id(), "code": pipeline._code["recognition"]})
    stem = cache.photos(participant, k)
    entry = _cache.read_entry(stem)
    if entry is not None:
        _, arr = entry
        return PhotoResult(participant, paths, arr["embeddings"], arr["found"].astype(bool), arr["prob"], True)
    n = len(paths)
    emb = np.full((n, pipeline.dim), np.nan, np.float32)
    found = np.zeros(n, bool)
    prob = np.full(n, np.nan)
    problems = []
    try:
        groups = [(list(range(n)), pipeline.align(paths))]  # all at once: the aligner batches equal sizes
    except MRIFaceError:
        groups = []  # some file is unreadable: isolate it, one photograph at a time
        for i, p in enumerate(paths):
            try:
                groups.append(([i], pipeline.align([p])))
            except MRIFaceError as exc:
                problems.append(Problem("unreadable_photo", str(p), f"{str(exc).splitlines()[0]}", participant))
    for idx, al in groups:
        ok = np.asarray(_np(al.found), bool).reshape(-1)
        prob[idx] = np.asarray(_np(al.prob), float).reshape(-1)
        if ok.any():
            rows = [i for i, good in zip(idx, ok) if good]
            emb[rows] = pipeline.embed(al.crops[_torch_index(al.crops, ok)])
            found[rows] = True
    _cache.write_entry(stem, {"participant": participant, "photos": [str(p) for p in paths],
                              "found": found.tolist(), "cache_version": _cache.CACHE_VERSION},
                       embeddings=emb, found=found, prob=prob)
    return PhotoResult(participant, paths, emb, found, prob, False, problems)
