"""The per-scan and per-photograph work of a study: stages, cached results.

:class:`Pipeline` holds the stages (load, surface, render, align, embed)
and builds the face models on first use. :func:`process_scan` takes one scan
(a volume or a mesh file) through them, or one transformed scan when a
transform is given; :func:`process_photos` does one participant's
photographs. Both read and fill the cache (:mod:`mriface.study.cache`), and
both are the guarded unit of :mod:`mriface.study.guard` that every executor calls.

This module is over 500 lines because one scan's work (cache keys, the
per-model embedding entries of several face models, the guarded wrappers) and
the Pipeline those steps call belong together; splitting them would put the
cache keys in a different module from the stages whose inputs they list.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._io import jsonable
from ..errors import MRIFaceError, TransformError
from ..inputs import Problem, Scan
from . import cache as _cache

__all__ = ["Pipeline", "ScanResult", "PhotoResult", "process_scan", "process_scans", "process_photos",
           "parse_models"]

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
    model : str or sequence of str
        Face model, a name from :func:`mriface.recognition.available_models`;
        or several (a sequence, or names joined by commas): every model
        embeds the same detections (one aligner cuts each model's crop).
    weights : str or Path, optional
        The model's weights file (default: the model's own); one model only.
    random_weights : bool
        Use untrained networks (timing runs where the weights are absent;
        the ranks mean nothing).

    Attributes
    ----------
    models : tuple of str
        The face models, the first one the primary (``ScanResult.embeddings``).
    model : str
        Their names joined by commas (the one name for a single model).
    """

    def __init__(self, *, device: str = "auto", backend: str = "auto", model: "str | Sequence[str]" = "facenet",
                 weights: "str | os.PathLike[str] | None" = None, random_weights: bool = False):
        from .._device import resolve_device
        from ..render import resolve_backend

        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device)
        self.models = parse_models(model)  # say so now, not after the first scan's surface
        if weights is not None and len(self.models) > 1:
            raise MRIFaceError(f"weights={weights!s} names one model's file, but {len(self.models)} models "
                               f"were asked for ({', '.join(self.models)}): give weights with one model")
        self.model = ",".join(self.models)
        self.weights = weights
        self.random_weights = random_weights
        self._aligner: dict = {}
        self._embedder = None  # None until built, then {name: Embedder} (executor.worker_copy resets it to None)
        self._digests: dict[tuple, str] = {}
        #: dummy batches run by :meth:`prepare` to warm up the aligner and face models
        self.warmups = 0
        # Hashed once, when the stages are loaded: the code that runs is the code imported now.
        self._code = {"surface": _cache.code_digest("volume", "surface"),
                      "render": _cache.code_digest("render", "recognition"),
                      "recognition": _cache.code_digest("recognition")}

    # ---- identity of the work, for cache keys
    def file_digest(self, path: Path) -> str:
        """SHA-256 of a file's bytes (memoised by path, size and mtime for this run); of a DICOM folder's files.

        A DICOM series folder is hashed over every file's relative name and
        bytes (:func:`mriface.dicom.folder_digest`) each time: a folder's size
        and mtime do not change when a file inside is rewritten, so it is not memoised.
        """
        from .._io import sha256_file

        path = Path(path)
        if path.is_dir():  # a DICOM series folder
            from ..dicom import folder_digest

            return folder_digest(path)
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
        """What an embedding depends on besides the image: the (primary) face model's identity and the aligner."""
        return {"model": self.embedder.model_id(), "aligner": "FaceAligner defaults"}

    def model_ids(self) -> "dict[str, dict]":
        """Model name -> :meth:`model_id` of each face model (a cache key per model's embeddings)."""
        if len(self.models) == 1:  # through model_id(), which a single-model subclass may override
            return {self.models[0]: self.model_id()}
        return {m: {"model": self.embedder_for(m).model_id(), "aligner": "FaceAligner defaults"}
                for m in self.models}

    def model_info(self) -> "list[dict]":
        """Per face model: name, embedding size, weights' SHA-256, licence and identity (summary, report)."""
        out = []
        for m, ident in self.model_ids().items():
            # model_ids() built the real models; a test pipeline's model_id() may stand in without one
            emb = self._embedder.get(m) if isinstance(self._embedder, dict) else None
            inner = ident.get("model", ident) if isinstance(ident, dict) else ident
            sha = inner.get("weights_sha256") if isinstance(inner, dict) else None
            out.append({"name": m, "dim": self.dim_for(m), "weights_sha256": sha,
                        "licence": str(getattr(emb, "licence", "") or "unknown"),
                        "licence_notice": str(getattr(emb, "licence_notice", "") or ""),
                        "model_id": ident})
        return out

    @property
    def dim(self) -> int:
        """Embedding size of the (primary) face model."""
        return int(self.embedder.dim)

    def dim_for(self, model: str) -> int:
        """Embedding size of face model ``model``."""
        return int(self.dim) if model == self.models[0] else int(self.embedder_for(model).dim)

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

    def render_many(self, items: "Sequence[tuple[Any, str]]", protocol) -> list:
        """Several subjects' renders: one :class:`~mriface.render.RenderBatch` per (surface, subject).

        One backend call for all of them where the backend batches meshes
        (zbuffer, pytorch3d); otherwise, and when a subclass overrides
        :meth:`render`, one :meth:`render` call per subject.
        """
        items = list(items)
        subjects = [s for _, s in items]
        if len(items) == 1 or not self.batches_meshes or len(set(subjects)) != len(subjects) \
                or type(self).render is not Pipeline.render:
            return [self.render(surface, subject, protocol) for surface, subject in items]
        from ..render import render_views

        batch = render_views(dict((s, surf) for surf, s in items), protocol, backend=self.backend,
                             device=self.device)
        v = int(protocol.views)
        return [batch[i * v:(i + 1) * v] for i in range(len(items))]

    @property
    def batches_meshes(self) -> bool:
        """Whether the render backend rasterizes several subjects' meshes in one call."""
        from ..render.rasterize import select_backend

        return bool(getattr(select_backend(self.backend, self.device)[0], "batches_meshes", False))

    @property
    def aligner(self):
        """The photographs' aligner: facenet-pytorch's MTCNN with mriface's defaults."""
        return self._aligner_for(None)

    def _aligner_for(self, min_face_size: "int | None"):
        from ..recognition import FaceAligner

        if min_face_size not in self._aligner:
            kw = {} if min_face_size is None else {"min_face_size": int(min_face_size)}
            if min_face_size is not None and self.device.type == "cuda":
                # renders of a batch of scans (process_scans): one detection call for up to 128 renders of 512²
                kw.update(batch_size=128, batch_pixels=128 * 512 * 512)
            specs: list = []
            for m in self.models:  # the primary model's crop first: Alignment.crops
                spec = self.embedder_for(m).crop
                if spec not in specs:
                    specs.append(spec)
            self._aligner[min_face_size] = FaceAligner(device=self.device, crops=tuple(specs), **kw)
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
        """The (primary) face model (:func:`mriface.recognition.get_model`), built on first use."""
        return self.embedder_for(self.models[0])

    def embedder_for(self, model: str):
        """Face model ``model`` (one of :attr:`models`), built on first use.

        Building one prints its licence notice when its weights' licence
        restricts use (:class:`~mriface.recognition.onnx_embed.LicenceNotice`);
        the notice also goes to the study's log.
        """
        if not isinstance(self._embedder, dict):
            self._embedder = {}
        if model not in self._embedder:
            import torch

            from ..recognition import get_model

            # A fixed seed without touching the caller's generator: the same
            # random network in every run, so cached embeddings stay comparable.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                emb = get_model(model, device=self.device, weights=self.weights,
                                random_weights=self.random_weights)
            if getattr(emb, "licence_notice", "") and getattr(emb, "_random", None) is None:
                log.warning("face model %s: %s", model, emb.licence_notice)
            self._embedder[model] = emb
        return self._embedder[model]

    def prepare(self, image_size: int) -> None:
        """Build the face models now and warm them up, so that stage timings do not include either.

        A network's first call pays one-off costs that later calls do not:
        oneDNN compiles its kernels for each layer's shapes, the allocator
        grows its pools, FaceNet builds its folded channels-last copy (see
        ``FaceNetEmbedder._runner``). So each aligner and face model, once
        built, runs one dummy batch (a black ``image_size`` render; two
        black crops) here, and the first scan of a study costs what the
        others do. Each is warmed once; :attr:`warmups` counts the dummy
        batches run.
        """
        import torch

        aligner = self._aligner_for(self.render_min_face(image_size))
        done = self.__dict__.setdefault("_warmed", [])  # objects warmed (by identity)
        with torch.no_grad():
            if not any(a is aligner for a in done):
                aligner.align(torch.zeros(1, int(image_size), int(image_size), 3))
                done.append(aligner)
                self.warmups = getattr(self, "warmups", 0) + 1
            for m in self.models:
                emb = self.embedder_for(m)
                if not any(e is emb for e in done):
                    s = int(emb.crop.size)
                    emb.embed(torch.zeros(2, 3, s, s))
                    done.append(emb)
                    self.warmups = getattr(self, "warmups", 0) + 1

    def align(self, images):
        """Images -> Alignment (crops for the model, found, prob, boxes, n_faces).

        A (N, H, W, 3) tensor is a batch of renders (see :meth:`render_min_face`);
        anything else (paths, arrays) is photographs.
        """
        if hasattr(images, "shape") and len(images.shape) == 4 and not isinstance(images, (list, tuple)):
            return self._aligner_for(self.render_min_face(int(images.shape[1]))).align(images)
        return self.aligner.align(images)

    def embed(self, crops, model: "str | None" = None) -> np.ndarray:
        """(n, 3, S, S) crops -> (n, dim) float32 L2-normalised embeddings of ``model`` (default: the primary)."""
        model = self.models[0] if model is None else model
        if len(crops) == 0:
            return np.zeros((0, self.dim_for(model)), np.float32)
        return np.asarray(_np(self.embedder_for(model).embed(crops)), np.float32)

    def crops_for(self, alignment, model: str):
        """``alignment``'s crops for face model ``model`` (the primary's are ``alignment.crops``)."""
        if model == self.models[0]:
            return alignment.crops
        return alignment.crop_for(self.embedder_for(model).crop)


def parse_models(model: "str | Sequence[str]") -> "tuple[str, ...]":
    """``"facenet,arcface-mbf"`` or ``["facenet", "arcface-mbf"]`` -> a tuple of known, distinct model names.

    Raises
    ------
    MRIFaceError
        No name, a repeated name, or a name not in :func:`mriface.recognition.available_models`.
    """
    from ..recognition import available_models

    names = [p.strip() for p in model.split(",")] if isinstance(model, str) else [str(m).strip() for m in model]
    names = [n for n in names if n]
    if not names:
        raise MRIFaceError(f"model={model!r}: name at least one face model ({', '.join(available_models())})")
    if len(set(names)) != len(names):
        raise MRIFaceError(f"model={model!r} names a model twice: give each once")
    known = available_models()
    for n in names:
        if n not in known:
            raise MRIFaceError(f"unknown face model {n!r}: available models are "
                               f"{', '.join(known)} (mriface.recognition.register_model adds one)")
    return tuple(names)


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
        (V, dim) float32 of the primary face model, one row per render; rows
        of renders with no face are NaN.
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
    model_embeddings : dict
        Face model name -> (V, dim) embeddings of the same renders, for every
        model of the pipeline (the primary's is :attr:`embeddings`).
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
    model_embeddings: dict = field(default_factory=dict)

    @property
    def n_found(self) -> int:
        return int(np.count_nonzero(self.found))

    def embeddings_of(self, model: "str | None" = None) -> np.ndarray:
        """(V, dim) embeddings of face model ``model`` (None: the primary)."""
        return self.embeddings if model is None else self.model_embeddings.get(model, self.embeddings)

    def gallery_embeddings(self, model: "str | None" = None) -> "np.ndarray | None":
        """(n_found, dim) embeddings (of ``model``) of renders with a face, or None when there is none."""
        if self.n_found == 0:
            return None
        return self.embeddings_of(model)[self.found]

    def probe_embeddings(self, model: "str | None" = None) -> list["np.ndarray | None"]:
        """One entry per render: its (dim,) embedding (of ``model``), or None where no face was found."""
        emb = self.embeddings_of(model)
        if emb.shape[0] == 0:
            return [None]  # a failed scan still counts as one failed probe
        return [e if ok else None for e, ok in zip(emb, self.found)]


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
    model_embeddings: dict = field(default_factory=dict)  # face model name -> (P, dim); primary = embeddings

    def probe_embeddings(self, model: "str | None" = None) -> list["np.ndarray | None"]:
        emb = self.embeddings if model is None else self.model_embeddings.get(model, self.embeddings)
        return [e if ok else None for e, ok in zip(emb, self.found)]


# --------------------------------------------------------------------------- one scan
def _surface_for(scan: Scan, pipeline: Pipeline, cache: _cache.CacheLayout, timings: dict,
                 stage: Callable[[str], None]):
    """The scan's HeadSurface, from the cache or computed (and cached)."""
    path = cache.surface(scan.subject, _surface_key(scan, pipeline))
    cached = _cache.load_surface(path)  # None when absent, or damaged (reported, then recomputed)
    if cached is not None:
        return cached
    with _timed("load", timings, stage):
        volume = pipeline.load(scan.path)
    with _timed("surface", timings, stage):
        surface = pipeline.surface(volume)
    _cache.save_surface(surface, path)
    return surface


def _surface_key(scan: Scan, pipeline: Pipeline) -> str:
    """The key of a scan's surface entry: the file's bytes and the surface code."""
    return _cache.key({"v": _cache.CACHE_VERSION, "file": pipeline.file_digest(scan.path),
                       "surface": pipeline.surface_options()})


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
    """Reconstruct, render, align and embed one scan, using and filling the cache: the guarded unit.

    :func:`process_scans` with one scan (the sequential path's call).
    Parameters as :func:`process_scans`.
    """
    return process_scans([scan], role, protocol, pipeline, cache_root, images_dir=images_dir,
                         transform=transform, on_stage=on_stage)[0]


def process_scans(scans: Sequence[Scan], role: str, protocol: Any, pipeline: Pipeline,
                  cache_root: "str | Path", *, images_dir: "Path | None" = None, transform: Any = None,
                  on_stage: "Callable[[str], None] | None" = None,
                  renders: "Mapping[str, tuple[Any, float]] | None" = None) -> "list[ScanResult]":
    """Reconstruct, render, align and embed several scans, their device stages batched: the guarded unit.

    Each scan's cache lookup and surface come first, one scan at a time.
    The scans that still need renders then go through the device stages
    together: one backend call renders them all where the backend batches
    meshes (``zbuffer``, ``pytorch3d``; one call per scan otherwise), one
    detection pass aligns every render, and each face model embeds every
    found crop in one call. The results are split per scan, and each scan's
    cache entries are written exactly as for a scan done alone.

    Every executor calls this function (the sequential path with one scan).
    Each scan is guarded (:func:`mriface.study.guard.guarded_scan`): any
    exception becomes that result's ``problem`` and damaged cache entries its
    ``extra_problems``; only environment failures (disk full, output not
    writable) raise :class:`~mriface.study.guard.StudyEnvironmentError`. If
    the batched device stages fail, each scan is done again alone, so that a
    failure is the failing scan's own.

    Parameters
    ----------
    scans : sequence of Scan
        The scan files (volumes or meshes) and their subject ids.
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
        Render each scan after this transform (:class:`mriface.study.TransformProbes`).
    on_stage : callable, optional
        Called with each stage's name as it starts (for progress displays).
    renders : mapping, optional
        (subject, str(path)) of a scan -> (RenderBatch, seconds): its renders
        already made under ``protocol`` (by a streaming worker), used instead
        of rendering it here; the seconds count as its render time.

    Returns
    -------
    list of ScanResult
        One per scan, in order. A result's ``timings`` of the batched stages
        (``render``, ``align``, ``embed``) are its share of the batch's
        seconds. ``problem`` is set (and there are no embeddings) when the
        scan could not be read, transformed, reconstructed or rendered.

    Notes
    -----
    The batch's shapes can change the networks' last bits: on the CPU,
    three scans together gave the same detections as one at a time and
    embeddings within 7e-8. So the CPU executors batch one scan by default,
    which is the sequential path byte for byte (docs/scale.md).
    """
    from .guard import environment_failure, guarded_scan
    from ..errors import WeightsError

    kw = dict(images_dir=images_dir, transform=transform, on_stage=on_stage)
    out: list = [guarded_scan(_prepare, s, role, protocol, pipeline, cache_root, failed=_failed_result(s, role), **kw)
                 for s in scans]
    todo = [i for i, r in enumerate(out) if isinstance(r, _Pending)]
    if len(todo) > 1:
        try:
            done = _device_stages([out[i] for i in todo], protocol, pipeline, cache_root, on_stage, renders)
        except WeightsError:
            raise  # not these scans' fault: the study cannot run (exit 2)
        except Exception as exc:  # noqa: BLE001 - redone one scan at a time below, where it is guarded
            if (env := environment_failure(exc, [cache_root, images_dir])) is not None:
                raise env from exc
            log.info("%d %s scans rendered together failed (%s: %s); doing each alone", len(todo), role,
                     type(exc).__name__, (str(exc).splitlines() or [""])[0])
        else:
            for i, res in zip(todo, done):
                res.extra_problems = list(out[i].extra_problems)
                out[i] = res
            todo = []
    for i in todo:  # one scan: any failure is this scan's own problem
        pending = out[i]
        res = guarded_scan(_device_stages_one, pending.scan, role, protocol, pipeline, cache_root,
                           failed=_failed_result(pending.scan, role), images_dir=images_dir, pending=pending,
                           on_stage=on_stage, renders=renders)
        res.extra_problems = [*pending.extra_problems, *getattr(res, "extra_problems", [])]
        out[i] = res
    if any(not r.cached for r in out):
        from .memory import release_memory

        release_memory()  # the scans' surfaces and renders are freed: keep memory flat over a long study
    return out


def _failed_result(scan: Scan, role: str) -> "Callable[[Problem, int], ScanResult]":
    """The guard's constructor of a failed scan's result."""
    def failed(problem: Problem, dim: int) -> ScanResult:
        return ScanResult(scan.subject, role, scan.path, np.zeros((0, dim), np.float32), np.zeros(0, bool),
                          np.zeros(0), problem=problem)

    return failed


@dataclass
class _Pending:
    """A scan whose renders are still to be made: what its cache entries need, decided before rendering."""

    scan: Scan
    role: str
    surface: Any
    digest: str
    dkey: str
    stem: Path
    entry: "tuple[dict, dict] | None"  # the cache entry found (its embeddings incomplete), or None
    have: dict  # face model -> cached embeddings of that entry
    cacheable: bool
    timings: dict
    transform: Any = None
    images_dir: "Path | None" = None
    extra_problems: list = field(default_factory=list)


def _scan_failed(scan: Scan, role: str, pipeline: Pipeline, exc: BaseException, timings: dict,
                 roots: Sequence) -> ScanResult:
    """The result of a scan whose input could not be read, transformed, reconstructed or rendered."""
    from .guard import environment_failure

    if (env := environment_failure(exc, roots)) is not None:
        raise env from exc  # disk full, output not writable: the study stops (guard.py)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    kind = "transform_failed" if isinstance(exc, TransformError) else "scan_failed"
    problem = Problem(kind, str(scan.path), f"{role} scan of subject {scan.subject!r} failed: {first}", scan.subject)
    log.warning("%s", problem)
    models = pipeline.model_ids()
    empty = {m: np.zeros((0, pipeline.dim_for(m)), np.float32) for m in models}
    return ScanResult(scan.subject, role, scan.path, empty[next(iter(models))], np.zeros(0, bool), np.zeros(0),
                      timings=timings, problem=problem, model_embeddings=empty)


def _prepare(scan: Scan, role: str, protocol: Any, pipeline: Pipeline, cache_root: "str | Path", *,
             images_dir: "Path | None" = None, transform: Any = None,
             on_stage: "Callable[[str], None] | None" = None) -> "ScanResult | _Pending":
    """A scan's cached result, its failure, or a :class:`_Pending` with its surface (loaded or reconstructed)."""
    cache = _cache.CacheLayout(cache_root)
    timings: dict[str, float] = {}
    stage = on_stage or (lambda name: None)
    model_ids = pipeline.model_ids()  # a weights problem stops the study: it is not this scan's fault
    models, primary = list(model_ids), next(iter(model_ids))
    try:
        digest = pipeline.file_digest(scan.path)
        dkey, stem = render_entry(scan, role, protocol, pipeline, cache, transform=transform)
        cacheable = transform is None or transform.cacheable
        entry = _read(stem) if cacheable else None
        have = _cached_embeddings(cache, stem, dkey, model_ids, entry) if cacheable else {}
        if entry is not None and len(have) == len(models) and (images_dir is None
                                                              or _images_dir(images_dir, scan).is_dir()):
            meta, arr = entry
            return ScanResult(scan.subject, role, scan.path, have[primary], arr["found"].astype(bool),
                              arr["prob"], meta.get("renders", []), meta.get("timings", {}), True,
                              model_embeddings=have)
        if transform is None:
            surface = _surface_for(scan, pipeline, cache, timings, stage)
        else:
            surface = _transformed_surface(scan, transform, pipeline, cache, timings, stage)
    except (MRIFaceError, OSError) as exc:  # TransformError (a transform that raised) included
        return _scan_failed(scan, role, pipeline, exc, timings, [cache_root, images_dir])
    return _Pending(scan, role, surface, digest, dkey, stem, entry, have, cacheable, timings, transform, images_dir)


def render_entry(scan: Scan, role: str, protocol: Any, pipeline: Pipeline, cache: _cache.CacheLayout, *,
                 transform: Any = None) -> "tuple[str, Path]":
    """The key and file stem of a scan's render entry (renders' detections, then each model's embeddings).

    The key covers the file's bytes, the surface and render code, the
    protocol, the subject (renders draw their cameras from
    ``subject_rng(seed, subject)``), the role and the transform.
    """
    what = {"v": _cache.CACHE_VERSION, "surface": _surface_key(scan, pipeline),
            "protocol": _cache.protocol_dict(protocol), "render": pipeline.render_options(),
            "aligner": "FaceAligner defaults",
            "subject": scan.subject, "role": role}
    if transform is not None:
        what["transform"] = transform.identity()
    dkey = _cache.key(what)
    return dkey, cache.renders(scan.subject, role, dkey)


def _device_stages_one(scan: Scan, role: str, protocol: Any, pipeline: Pipeline, cache_root: "str | Path", *,
                       images_dir: "Path | None" = None, pending: _Pending,
                       on_stage: "Callable[[str], None] | None" = None,
                       renders: "Mapping[str, tuple[Any, float]] | None" = None) -> ScanResult:
    """:func:`_device_stages` of one scan (the signature :func:`~mriface.study.guard.guarded_scan` calls)."""
    return _device_stages([pending], protocol, pipeline, cache_root, on_stage, renders)[0]


def _device_stages(todo: "list[_Pending]", protocol: Any, pipeline: Pipeline, cache_root: "str | Path",
                   on_stage: "Callable[[str], None] | None",
                   renders: "Mapping[str, tuple[Any, float]] | None" = None) -> "list[ScanResult]":
    """Render, align and embed the scans of ``todo`` together; write each one's entries; one result each.

    A render error of a single scan (e.g. nothing in front of its face
    frame) is that scan's problem; with several scans, any error propagates
    (:func:`process_scans` then does each alone).
    """
    cache = _cache.CacheLayout(cache_root)
    stage = on_stage or (lambda name: None)
    model_ids = pipeline.model_ids()
    models, primary = list(model_ids), next(iter(model_ids))
    shared: dict[str, float] = {}  # seconds of the batch's stages, shared out evenly below
    pipeline.prepare(int(protocol.image_size))  # models load outside the stage timings
    try:
        with _timed("render", shared, stage):
            batches, worker_s = _render(todo, protocol, pipeline, renders or {})
        shared["render"] += worker_s
    except MRIFaceError as exc:  # e.g. a surface with nothing in front of its face frame
        if len(todo) > 1:
            raise
        p = todo[0]
        return [_scan_failed(p.scan, p.role, pipeline, exc, p.timings, [cache_root, p.images_dir])]
    for p, batch in zip(todo, batches):
        if p.images_dir is not None:
            from ..render import write_renders

            write_renders(batch, _images_dir(p.images_dir, p.scan))
    with _timed("align", shared, stage):  # one detection for every model: each gets its own crops
        al = pipeline.align(batches[0].images if len(batches) == 1 else _cat([b.images for b in batches]))
    found_all = np.asarray(_np(al.found), bool).reshape(-1)
    prob_all = np.asarray(_np(al.prob), float).reshape(-1)
    bounds = np.cumsum([0] + [len(b.images) for b in batches])
    rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    # embeddings cached under another detection (e.g. from another device) are not mixed with these
    same = [p.entry is not None and np.array_equal(np.asarray(p.entry[1]["found"], bool), found_all[r])
            for p, r in zip(todo, rows)]
    haves = [p.have if s else {} for p, s in zip(todo, same)]
    computed: dict[str, np.ndarray] = {}
    with _timed("embed", shared, stage):
        for m in models:  # each model embeds, in one call, the found crops of the scans that lack its embeddings
            need = np.concatenate([found_all[r] if m not in h else np.zeros(r.stop - r.start, bool)
                                   for r, h in zip(rows, haves)])
            if any(m not in h for h in haves):
                computed[m] = _embed_found(pipeline, m, pipeline.crops_for(al, m), need)
    results = []
    for p, r, have, s in zip(todo, rows, haves, same):
        timings = {**p.timings, **{k: v / len(todo) for k, v in shared.items()}}
        found, prob = found_all[r], prob_all[r]
        embs = {m: have[m] if m in have else (computed[m] if len(todo) == 1 else computed[m][r].copy())
                for m in models}
        renders = _render_records(batches[len(results)], _rows(al, r))
        meta = {"subject": p.scan.subject, "role": p.role, "scan": str(p.scan.path), "sha256": p.digest,
                "cache_version": _cache.CACHE_VERSION, "protocol": _cache.protocol_dict(protocol),
                "backend": pipeline.backend, "device": str(pipeline.device), "timings": timings,
                "renders": renders, "n_found": int(found.sum()), "models": models}
        if p.transform is not None:
            meta["transform"] = p.transform.identity()
        if p.cacheable:
            if not s:  # an intact entry of the same detection stays as it is (only embeddings were missing)
                _cache.write_entry(p.stem, meta, found=found, prob=prob)
            for m in models:
                if m not in have:
                    _write_embeddings(cache, p.stem, p.dkey, m, model_ids[m], embs[m], found)
        results.append(ScanResult(p.scan.subject, p.role, p.scan.path, embs[primary], found, prob, renders,
                                  timings, False, model_embeddings=embs))
    return results


def _render(todo: "list[_Pending]", protocol: Any, pipeline: Pipeline, renders: Mapping) -> "tuple[list, float]":
    """One RenderBatch per scan of ``todo`` (from ``renders`` where a worker made it, else rendered here),
    and the seconds the workers spent on theirs."""
    keys = [(p.scan.subject, str(p.scan.path)) for p in todo]
    missing = [p for p, k in zip(todo, keys) if k not in renders]
    made = iter(pipeline.render_many([(p.surface, p.scan.subject) for p in missing], protocol) if missing else [])
    batches = [renders[k][0] if k in renders else next(made) for k in keys]
    return batches, float(sum(renders[k][1] for k in keys if k in renders))


def _cat(images: list):
    import torch

    return torch.cat(images)


def _rows(al, r: slice):
    """Rows ``r`` of an alignment: what :func:`_render_records` reads (found, prob, n_faces, boxes)."""
    from types import SimpleNamespace

    pick = {k: _np(getattr(al, k))[r] for k in ("found", "prob", "n_faces", "boxes")
            if getattr(al, k, None) is not None}
    return SimpleNamespace(**{"n_faces": None, "boxes": None, **pick})


def _images_dir(images_dir: Path, scan: Scan) -> Path:
    """The folder of one subject's renders: an id-derived name, kept inside ``images_dir``."""
    from .._io import child_path, safe_component

    return child_path(images_dir, safe_component(scan.subject))


def _read(stem: Path) -> "tuple[dict, dict] | None":
    """A cache entry, or None when absent or damaged (then it is recomputed)."""
    damaged = getattr(_cache, "Damaged", None)
    try:
        return _cache.read_entry(stem)
    except Exception as exc:  # noqa: BLE001 - only the cache's own "damaged" signal is expected here
        if damaged is not None and isinstance(exc, damaged):
            log.warning("cache entry %s is damaged (%s); recomputing", stem, exc)
            return None
        raise


def _embeddings_stem(cache: _cache.CacheLayout, stem: Path, dkey: str, model: str, model_id: Any) -> Path:
    """Stem of one face model's embeddings of the entry ``stem`` (keyed by that entry's key and the model's id)."""
    k = _cache.key({"v": _cache.CACHE_VERSION, "entry": dkey, "model": model_id})
    name = f"{stem.name}-{_cache.safe_name(model)}-{k[:16]}"
    layout = getattr(cache, "embeddings", None)
    if layout is not None:
        return layout(stem.name, model, k)
    try:
        from .._io import child_path
    except ImportError:
        return Path(cache.root) / "embeddings" / name
    return child_path(cache.root, "embeddings", name)


def _cached_embeddings(cache: _cache.CacheLayout, stem: Path, dkey: str, model_ids: dict,
                       entry: "tuple[dict, dict] | None") -> "dict[str, np.ndarray]":
    """Model name -> cached embeddings of the entry ``stem``, for the models that have them (and match its detections)."""
    if entry is None:
        return {}
    found = np.asarray(entry[1].get("found", np.zeros(0)), bool)
    out = {}
    for m, ident in model_ids.items():
        got = _read(_embeddings_stem(cache, stem, dkey, m, ident))
        if got is not None and got[1]["embeddings"].shape[0] == found.size \
                and np.array_equal(got[1]["found"].astype(bool), found):
            out[m] = got[1]["embeddings"]
    return out


def _write_embeddings(cache: _cache.CacheLayout, stem: Path, dkey: str, model: str, model_id: Any,
                      emb: np.ndarray, found: np.ndarray) -> None:
    _cache.write_entry(_embeddings_stem(cache, stem, dkey, model, model_id),
                       {"entry": stem.name, "model": model, "model_id": model_id},
                       embeddings=emb, found=found)


def _embed_found(pipeline: Pipeline, model: str, crops, found: np.ndarray) -> np.ndarray:
    """(n, dim) embeddings by face model ``model`` of the crops where ``found``; NaN rows elsewhere."""
    emb = np.full((found.size, pipeline.dim_for(model)), np.nan, np.float32)
    if found.any():
        emb[found] = _embed(pipeline, model, crops[_torch_index(crops, found)])
    return emb


def _embed(pipeline: Pipeline, model: str, crops) -> np.ndarray:
    """``pipeline.embed`` for ``model``: the primary as ``embed(crops)`` (subclasses may override that alone)."""
    if model == pipeline.models[0]:
        return pipeline.embed(crops)
    return pipeline.embed(crops, model=model)


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
    """Align and embed one participant's photographs: the guarded unit (:func:`mriface.study.guard.guarded_photos`)."""
    from .guard import guarded_photos

    def failed(problem: Problem, dim: int) -> PhotoResult:
        n = len(paths)
        return PhotoResult(participant, [Path(p) for p in paths], np.full((n, dim), np.nan, np.float32),
                           np.zeros(n, bool), np.full(n, np.nan), False, [problem])

    return guarded_photos(_process_photos, participant, paths, pipeline, cache_root, failed=failed)


def _process_photos(participant: str, paths: Sequence[Path], pipeline: Pipeline,
                    cache_root: "str | Path") -> PhotoResult:
    """Align and embed one participant's photographs (cached by their bytes)."""
    cache = _cache.CacheLayout(cache_root)
    paths = [Path(p) for p in paths]
    model_ids = pipeline.model_ids()
    models, primary = list(model_ids), next(iter(model_ids))
    k = _cache.key({"v": _cache.CACHE_VERSION, "photos": [pipeline.file_digest(p) for p in paths],
                    "aligner": "FaceAligner defaults", "code": pipeline._code["recognition"]})
    stem = cache.photos(participant, k)
    entry = _read(stem)
    have = _cached_embeddings(cache, stem, k, model_ids, entry)
    if entry is not None and len(have) == len(models):
        _, arr = entry
        return PhotoResult(participant, paths, have[primary], arr["found"].astype(bool), arr["prob"], True,
                           model_embeddings=have)
    n = len(paths)
    embs = {m: np.full((n, pipeline.dim_for(m)), np.nan, np.float32) for m in models}
    found = np.zeros(n, bool)
    prob = np.full(n, np.nan)
    problems = []
    try:
        groups = [(list(range(n)), pipeline.align(paths))]  # all at once: the aligner batches equal sizes
    except Exception:  # noqa: BLE001 - some file fails: isolate it, one photograph at a time
        from .guard import environment_failure

        groups = []
        for i, p in enumerate(paths):
            try:
                groups.append(([i], pipeline.align([p])))
            except Exception as exc:  # noqa: BLE001 - any failure of one photograph is that photograph's problem
                if (env := environment_failure(exc, [cache_root])) is not None:
                    raise env from exc
                first = (str(exc).splitlines() or [""])[0]
                text = first if isinstance(exc, MRIFaceError) and first else f"{type(exc).__name__}: {first}"
                problems.append(Problem("unreadable_photo", str(p), text, participant))
    for idx, al in groups:
        ok = np.asarray(_np(al.found), bool).reshape(-1)
        prob[idx] = np.asarray(_np(al.prob), float).reshape(-1)
        found[idx] = ok
    same = entry is not None and np.array_equal(entry[1]["found"].astype(bool), found)
    if not same:
        have = {}  # cached embeddings of another detection are not mixed with these
    for idx, al in groups:
        ok = np.asarray(_np(al.found), bool).reshape(-1)
        if ok.any():
            rows = [i for i, good in zip(idx, ok) if good]
            for m in models:
                if m not in have:
                    crops = pipeline.crops_for(al, m)
                    embs[m][rows] = _embed(pipeline, m, crops[_torch_index(crops, ok)])
    embs.update(have)
    if not same:  # an intact entry of the same detection stays as it is (only embeddings were missing)
        _cache.write_entry(stem, {"participant": participant, "photos": [str(p) for p in paths],
                                  "found": found.tolist(), "cache_version": _cache.CACHE_VERSION,
                                  "models": models}, found=found, prob=prob)
    for m in models:
        if m not in have:
            _write_embeddings(cache, stem, k, m, model_ids[m], embs[m], found)
    return PhotoResult(participant, paths, embs[primary], found, prob, False, problems, model_embeddings=embs)
