"""The rendering protocol of the study and the batch renderer built on it.

:class:`RenderProtocol` says how to photograph a head: how many views, the
ranges from which each view's camera, light and skin are drawn, image size
and background. :func:`render_views` draws those parameters per subject from
the seed and renders every subject's views in memory-sized chunks.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..errors import MRIFaceError
from .cameras import Cameras, look_at_face
from .lights import Lights, Material, kelvin_to_rgb
from .backends import Scene
from .geometry import front_faces
from .rasterize import select_backend
from .shade import shade

__all__ = ["RenderProtocol", "RenderBatch", "render_views", "sample_view_params", "PARAM_COLUMNS"]

Range = tuple  # (min, max)


@dataclass(frozen=True)
class RenderProtocol:
    """How the gallery renders of each head are drawn (all angles in degrees, lengths in mm).

    Every ``(min, max)`` range is sampled uniformly and independently per
    view. Camera angles are relative to the head's face frame, so a tilted
    head still gets portrait views. The defaults were tuned so that MTCNN
    (facenet-pytorch) detects the face in practically every render, like a
    portrait photograph; ``docs/render.md`` explains each choice.

    Attributes
    ----------
    views : int
        Renders per subject (the study: 10).
    azimuth_deg : (float, float)
        Camera turn about the face's up axis; positive towards the subject's
        left (image right). +-25 deg keeps both eyes visible, like photos
        in the study.
    elevation_deg : (float, float)
        Camera height angle; slightly more above than below eye level, as
        photos are usually taken.
    roll_deg : (float, float)
        Head tilt in the image plane; small, as in casual photographs.
    distance_mm : (float, float)
        Camera to face centre.
    fov_deg : (float, float)
        Full field of view. With the distance it sets how much of the frame
        the face fills (about half the image height at the defaults).
    light_azimuth_deg, light_elevation_deg : (float, float)
        Direction towards the directional light in the face frame (0, 0 =
        from straight in front of the face).
    light_intensity : (float, float)
        Strength of the directional light (linear).
    ambient : (float, float)
        Strength of the ambient light (linear).
    color_temperature_k : (float, float)
        Colour temperature of both lights, kelvin (warm indoor to daylight).
    skin_albedo : (float, float, float)
        Mean linear-RGB diffuse reflectance of skin.
    albedo_jitter : float
        Relative jitter of the albedo's lightness (uniform +-); each channel
        also varies by a third of it, so skin tones vary a little.
    specular : (float, float)
        Strength of the specular highlight.
    shininess : float
        Blinn-Phong exponent of the highlight.
    image_size : int
        Square image side, pixels.
    background : (float, float, float)
        sRGB colour of the background, in [0, 1].
    crop_behind_mm : float or None
        Drop triangles further than this behind the face centre before
        rendering; None (default) keeps the whole head. The cut shows at the
        ears and cheeks from 20-25 deg azimuth even at 90 mm, so it is off;
        render_views instead drops the triangles that face away from all of
        a subject's cameras, which is exact for closed surfaces.
    seed : int
        Root of every random draw; same seed, same views and images.
    """

    views: int = 10
    azimuth_deg: Range = (-25.0, 25.0)
    elevation_deg: Range = (-10.0, 15.0)
    roll_deg: Range = (-8.0, 8.0)
    distance_mm: Range = (500.0, 650.0)
    fov_deg: Range = (24.0, 30.0)
    light_azimuth_deg: Range = (-50.0, 50.0)
    light_elevation_deg: Range = (15.0, 55.0)
    light_intensity: Range = (0.7, 1.0)
    ambient: Range = (0.2, 0.35)
    color_temperature_k: Range = (4000.0, 7000.0)
    skin_albedo: tuple = (0.62, 0.40, 0.30)
    albedo_jitter: float = 0.15
    specular: Range = (0.03, 0.12)
    shininess: float = 20.0
    image_size: int = 512
    background: tuple = (0.6, 0.6, 0.6)
    crop_behind_mm: "float | None" = None
    seed: int = 0

    def with_overrides(self, **changes) -> "RenderProtocol":
        """A copy with some fields changed; a value of None leaves its field as it is.

        The command line's and ``run_study``'s ``--views``/``--size``/``--seed``
        style options map onto this: unset options stay None. Counts and the
        seed are made ints; ranges given as lists become tuples.

        Examples
        --------
        >>> p = RenderProtocol().with_overrides(views=3, seed=None, azimuth_deg=[-40, 40])
        >>> p.views, p.seed, p.azimuth_deg
        (3, 0, (-40, 40))
        >>> RenderProtocol().with_overrides(views=None) == RenderProtocol()
        True
        """
        from dataclasses import fields, replace

        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise MRIFaceError(f"RenderProtocol has no field {', '.join(unknown)}: use {', '.join(sorted(names))}")
        set_ = {}
        for name, value in changes.items():
            if value is None:
                continue
            if name in ("views", "image_size", "seed"):
                value = int(value)
            elif isinstance(value, list):
                value = tuple(value)
            set_[name] = value
        return replace(self, **set_) if set_ else self

    def __post_init__(self):
        if int(self.views) < 1:
            raise MRIFaceError(f"RenderProtocol(views={self.views!r}): need at least 1 view per subject")
        if int(self.image_size) < 8:
            raise MRIFaceError(f"RenderProtocol(image_size={self.image_size!r}): use at least 8 pixels")
        for name in ("azimuth_deg", "elevation_deg", "roll_deg", "distance_mm", "fov_deg", "light_azimuth_deg",
                     "light_elevation_deg", "light_intensity", "ambient", "color_temperature_k", "specular"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise MRIFaceError(f"RenderProtocol({name}={getattr(self, name)!r}): give (min, max) with min <= max")
        if not (0 < self.fov_deg[0] and self.fov_deg[1] < 180):
            raise MRIFaceError(f"RenderProtocol(fov_deg={self.fov_deg!r}): field of view must lie in (0, 180) degrees")
        if self.distance_mm[0] <= 0:
            raise MRIFaceError(f"RenderProtocol(distance_mm={self.distance_mm!r}): distances must be positive")


#: the per-image parameter columns of :meth:`RenderBatch.to_dataframe` and the sidecar CSV
PARAM_COLUMNS = (
    "azimuth_deg", "elevation_deg", "roll_deg", "distance_mm", "fov_deg",
    "light_azimuth_deg", "light_elevation_deg", "light_x", "light_y", "light_z",
    "light_intensity", "ambient", "color_temperature_k",
    "albedo_r", "albedo_g", "albedo_b", "specular", "shininess",
)


def subject_rng(seed: int, subject_id: str) -> np.random.Generator:
    """The random stream of one subject: depends only on ``seed`` and the id.

    Adding or removing other subjects never changes a subject's draws.
    """
    key = zlib.crc32(str(subject_id).encode("utf-8"))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=int(seed), spawn_key=(key,))))


def sample_view_params(protocol: RenderProtocol, subject_id: str) -> dict:
    """Draw one subject's view, light and skin parameters.

    Returns
    -------
    dict
        column name -> (views,) float64 array, for every name in
        :data:`PARAM_COLUMNS` except the world light direction
        (``light_x/y/z``, which needs the face frame).
    """
    rng = subject_rng(protocol.seed, subject_id)
    v = protocol.views

    def u(r):
        return rng.uniform(r[0], r[1], size=v)

    p = {}
    for name in ("azimuth_deg", "elevation_deg", "roll_deg", "distance_mm", "fov_deg",
                 "light_azimuth_deg", "light_elevation_deg", "light_intensity", "ambient", "color_temperature_k"):
        p[name] = u(getattr(protocol, name))
    j = protocol.albedo_jitter
    light = rng.uniform(1 - j, 1 + j, size=(v, 1))
    tint = rng.uniform(1 - j / 3, 1 + j / 3, size=(v, 3))
    albedo = np.clip(np.asarray(protocol.skin_albedo)[None, :] * light * tint, 0.0, 1.0)
    p["albedo_r"], p["albedo_g"], p["albedo_b"] = albedo.T
    p["specular"] = u(protocol.specular)
    p["shininess"] = np.full(v, float(protocol.shininess))
    return p


def _light_world(frame, az_deg: np.ndarray, el_deg: np.ndarray) -> np.ndarray:
    """(V, 3) unit directions towards the light in world RAS+, from face-frame angles."""
    a, e = np.radians(az_deg)[:, None], np.radians(el_deg)[:, None]
    return np.cos(e) * (np.cos(a) * frame.forward + np.sin(a) * frame.right) + np.sin(e) * frame.up


def scene_from_params(frame, params: dict, *, device="cpu"):
    """Cameras, lights and material (torch) for the rows of ``params`` in the face frame."""
    cams = look_at_face(frame, params["azimuth_deg"], params["elevation_deg"], params["roll_deg"],
                        params["distance_mm"], params["fov_deg"], device=device)
    ldir = np.stack([params["light_x"], params["light_y"], params["light_z"]], axis=1)
    rgb = kelvin_to_rgb(torch.as_tensor(params["color_temperature_k"], dtype=torch.float32))
    inten = torch.as_tensor(params["light_intensity"], dtype=torch.float32)[:, None]
    amb = torch.as_tensor(params["ambient"], dtype=torch.float32)[:, None]
    lights = Lights(torch.as_tensor(ldir, dtype=torch.float32), rgb * inten, rgb * amb).to(device)
    albedo = np.stack([params["albedo_r"], params["albedo_g"], params["albedo_b"]], axis=1)
    mat = Material(torch.as_tensor(albedo, dtype=torch.float32),
                   torch.as_tensor(params["specular"], dtype=torch.float32),
                   torch.as_tensor(params["shininess"], dtype=torch.float32)).to(device)
    return cams, lights, mat


@dataclass(eq=False)
class RenderBatch:
    """Renders of many subjects with the parameters of each image.

    Attributes
    ----------
    images : torch.Tensor
        (N, H, W, 3) float32 sRGB in [0, 1] (on the CPU).
    subjects : list of str
        (N,) subject id of each image.
    view : torch.Tensor
        (N,) int64 view index within its subject.
    params : dict
        column name (see :data:`PARAM_COLUMNS`) -> (N,) float64 array.
    cameras : Cameras
        The N cameras (CPU).
    lights : Lights
        The N lights (CPU).
    material : Material
        The N materials (CPU).
    """

    images: torch.Tensor
    subjects: list
    view: torch.Tensor
    params: dict
    cameras: Cameras
    lights: Lights
    material: Material

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, rows: slice) -> "RenderBatch":
        """The images ``rows`` (a slice, e.g. one subject's views) with their parameters, as a RenderBatch."""
        return RenderBatch(self.images[rows], list(self.subjects[rows]), self.view[rows],
                           {k: v[rows] for k, v in self.params.items()}, self.cameras[rows], self.lights[rows],
                           self.material[rows])

    def to_dataframe(self):
        """pandas DataFrame, one row per image: subject, view and every parameter column."""
        import pandas as pd

        df = pd.DataFrame({"subject": list(self.subjects), "view": self.view.numpy()})
        for k in PARAM_COLUMNS:
            df[k] = np.asarray(self.params[k])
        return df


def _as_items(surfaces, subject_ids):
    if isinstance(surfaces, Mapping):
        items = [(str(k), s) for k, s in surfaces.items()]
        if subject_ids is not None:
            raise MRIFaceError("render_views: give subject_ids only with a sequence of surfaces, not with a mapping")
    else:
        surfaces = list(surfaces)
        ids = [str(i) for i in range(len(surfaces))] if subject_ids is None else [str(i) for i in subject_ids]
        if len(ids) != len(surfaces):
            raise MRIFaceError(f"render_views: {len(ids)} subject_ids for {len(surfaces)} surfaces: give one id per surface")
        items = list(zip(ids, surfaces))
    if len({k for k, _ in items}) != len(items):
        raise MRIFaceError("render_views: subject ids must be unique")
    for k, s in items:
        if not (hasattr(s, "verts") and hasattr(s, "faces") and hasattr(s, "frame")):
            raise MRIFaceError(f"render_views: subject {k!r} is a {type(s).__name__}, not a HeadSurface")
        if s.faces.shape[0] == 0:
            raise MRIFaceError(f"render_views: subject {k!r} has an empty surface (0 triangles)")
    return items


def _mesh_tensors(surface, crop_behind_mm, device):
    """verts, faces, normals on ``device``; faces far behind the face centre dropped."""
    verts = torch.as_tensor(np.asarray(surface.verts, np.float32), device=device)
    faces = torch.as_tensor(np.asarray(surface.faces, np.int64), device=device)
    normals = torch.as_tensor(np.asarray(surface.normals, np.float32), device=device)
    if crop_behind_mm is not None:
        c = torch.as_tensor(np.asarray(surface.frame.center, np.float32), device=device)
        f = torch.as_tensor(np.asarray(surface.frame.forward, np.float32), device=device)
        keep = ((verts - c) @ f > -float(crop_behind_mm))[faces].all(dim=1)
        faces = faces[keep]
        if faces.shape[0] == 0:
            raise MRIFaceError("render_views: nothing of the surface lies in front of its face frame's centre; "
                               "check the surface's frame or use RenderProtocol(crop_behind_mm=None)")
    return verts, faces, normals


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def render_views(
    surfaces,
    protocol: RenderProtocol = RenderProtocol(),
    *,
    backend: str = "auto",
    device="auto",
    subject_ids=None,
    progress: bool = False,
    batch_images: "int | None" = None,
    timings: "dict | None" = None,
    out_device="cpu",
) -> RenderBatch:
    """Render ``protocol.views`` photo-like images of every head.

    Parameters
    ----------
    surfaces : sequence of HeadSurface or mapping subject_id -> HeadSurface
        Heads in world RAS+ mm with their face frames.
    protocol : RenderProtocol
        Views, light, skin, image size, background and seed.
    backend : str
        "auto" (zbuffer on CUDA, embree on the CPU) or a name in
        :func:`~mriface.render.available_backends`.
    device : str or torch.device
        'auto' = the backend's default device (CUDA when present; the CPU for embree).
    subject_ids : sequence of str, optional
        Ids for a sequence of surfaces (default "0", "1", ...). A subject's
        parameters depend only on ``protocol.seed`` and its id.
    progress : bool
        Show a tqdm bar over subjects.
    batch_images : int, optional
        Images per rasterizer call (backends that batch meshes, such as zbuffer
        and pytorch3d, group whole subjects up to this; default 80 on CUDA, one
        subject's views on the CPU) -- lower it if memory runs out.
    timings : dict, optional
        If given, seconds are added to its keys "setup", "rasterize" and
        "shade" (CUDA is synchronised around each stage).
    out_device : str or torch.device
        Where ``images`` are returned (default the CPU; ``None`` leaves them
        on the compute device, saving a large copy on GPUs).

    Returns
    -------
    RenderBatch
        ``len(surfaces) * protocol.views`` images, subjects in the given
        order, views in order within each subject; tensors on the CPU.
    """
    impl, dev = select_backend(backend, device)
    items = _as_items(surfaces, subject_ids)
    if not items:
        raise MRIFaceError("render_views: no surfaces given")
    if batch_images is None:
        batch_images = 80 if dev.type == "cuda" else protocol.views
    per_batch = max(1, int(batch_images) // protocol.views) if impl.batches_meshes else 1
    t = timings if timings is not None else {}
    for k in ("setup", "rasterize", "shade"):
        t.setdefault(k, 0.0)

    all_params = []
    images = []
    chunks = [items[i:i + per_batch] for i in range(0, len(items), per_batch)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="render", unit="subject")
    for chunk in chunks:
        _sync(dev)
        t0 = time.perf_counter()
        verts_l, faces_l, normals_l, cams_l, lights_l, mats_l = [], [], [], [], [], []
        for sid, surf in chunk:
            p = sample_view_params(protocol, sid)
            ldir = _light_world(surf.frame, p["light_azimuth_deg"], p["light_elevation_deg"])
            p["light_x"], p["light_y"], p["light_z"] = ldir.T
            all_params.append((sid, p))
            v, f, nrm = _mesh_tensors(surf, protocol.crop_behind_mm, dev)
            cams, lights, mat = scene_from_params(surf.frame, p, device=dev)
            # only triangles facing one of this subject's cameras can be seen (closed surface)
            f = f.index_select(0, front_faces(v, f, cams.centers()))
            verts_l.append(v); faces_l.append(f); normals_l.append(nrm)
            cams_l.append(cams); lights_l.append(lights); mats_l.append(mat)
        cams, lights, mat = Cameras.cat(cams_l), Lights.cat(lights_l), Material.cat(mats_l)
        mesh_index = torch.arange(len(chunk)).repeat_interleave(protocol.views)
        _sync(dev)
        t1 = time.perf_counter()
        with torch.no_grad():
            scene = Scene(tuple(verts_l), tuple(faces_l), mesh_index, cams, protocol.image_size)
            # the joined meshes, which hits' face ids index (computed once, shared with the backend)
            v_all, f_all = scene.joined
            n_all = normals_l[0] if len(chunk) == 1 else torch.cat(normals_l)
            # only the covered pixels, as compact lists: no full-size fragments to fill and re-read
            hits = impl.hits(scene)
            _sync(dev)
            t2 = time.perf_counter()
            # one call over all hits: elementwise kernels then split the work exactly as shading
            # full fragments would, so the images are bit-identical to shade(rasterize(...))
            img = shade(hits, v_all, f_all, n_all, cams, lights, mat, background=protocol.background)
            images.append(img if out_device is None else img.to(out_device))
            _sync(dev)
            t3 = time.perf_counter()
        t["setup"] += t1 - t0
        t["rasterize"] += t2 - t1
        t["shade"] += t3 - t2
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()

    subjects = [sid for sid, _ in all_params for _ in range(protocol.views)]
    view = torch.arange(protocol.views).repeat(len(all_params))
    params = {k: np.concatenate([p[k] for _, p in all_params]) for k in PARAM_COLUMNS}
    frames = [s.frame for _, s in items]
    cams_cpu, lights_cpu, mat_cpu = [], [], []
    for (sid, p), fr in zip(all_params, frames):
        c, l, m = scene_from_params(fr, p, device="cpu")
        cams_cpu.append(c); lights_cpu.append(l); mat_cpu.append(m)
    return RenderBatch(images=torch.cat(images), subjects=subjects, view=view, params=params,
                       cameras=Cameras.cat(cams_cpu), lights=Lights.cat(lights_cpu), material=Material.cat(mat_cpu))
