"""Photographs: the face model's mesh rendered with mriface's own renderer."""

from __future__ import annotations

import functools
import io
import math

import numpy as np

from .config import CohortConfig
from .facemodel import FaceModel, load_face_model
from .scans import _smoothstep


# ----------------------------------------------------------------------------- photographs

@functools.lru_cache(maxsize=1)
def _regions(faces_key: int = 0) -> np.ndarray:
    """(V, 5) soft per-vertex weights of skin, lips, brows, sclera and iris on the model's mean face."""
    from matplotlib.path import Path as MPath

    m = load_face_model()
    p = m.mean[:, [0, 2]]  # frontal projection (x, z)
    lm = p[m.landmarks]

    def inside(poly, pts, grow=0.0):
        c = poly.mean(0)
        return MPath(c + (poly - c) * (1 + grow)).contains_points(pts)

    lips = inside(lm[48:60], p, 0.05).astype(np.float64)
    eyes = np.zeros(len(p))
    iris = np.zeros(len(p))
    for a, b in ((36, 42), (42, 48)):
        poly = lm[a:b]
        ein = inside(poly, p, 0.1)
        eyes = np.maximum(eyes, ein)
        c = poly.mean(0)
        width = np.linalg.norm(lm[a] - lm[a + 3])
        r = np.linalg.norm(p - c, axis=1) / width
        iris = np.maximum(iris, ein * (1 - _smoothstep(r, 0.17, 0.22)))
    brows = np.zeros(len(p))
    for a, b in ((17, 22), (22, 27)):
        line = lm[a:b] + np.array([0.0, 1.5])
        seg = np.linspace(0, 1, 40)
        pts = np.concatenate([line[k] + (line[k + 1] - line[k]) * seg[:, None] for k in range(len(line) - 1)])
        dist = np.min(np.linalg.norm(p[:, None, :] - pts[None, ::4, :], axis=2), axis=1)
        brows = np.maximum(brows, 1 - _smoothstep(dist, 2.5, 4.0))
    sclera = eyes * (1 - iris)
    skin = np.clip(1 - lips - brows - eyes, 0, 1)
    w = np.stack([skin, lips, brows * (1 - eyes), sclera, iris], 1)
    return w / np.maximum(w.sum(1, keepdims=True), 1e-9)


def _photo_params(rng: np.random.Generator, cfg: CohortConfig, n_expr: int) -> dict:
    n = int(cfg.photos)
    return {
        "azimuth_deg": rng.uniform(*cfg.yaw_deg, size=n),
        "elevation_deg": rng.uniform(*cfg.pitch_deg, size=n),
        "roll_deg": rng.uniform(*cfg.roll_deg, size=n),
        "distance_mm": rng.uniform(450, 650, size=n),
        "fov_deg": rng.uniform(24, 30, size=n),
        "light_azimuth_deg": rng.uniform(-60, 60, size=n),
        "light_elevation_deg": rng.uniform(0, 50, size=n),
        "light_intensity": rng.uniform(0.6, 1.0, size=n),
        "ambient": rng.uniform(0.2, 0.45, size=n),
        "color_temperature_k": rng.uniform(3200, 7000, size=n),
        "specular": rng.uniform(0.02, 0.15, size=n),
        "albedo_gain": rng.uniform(0.9, 1.1, size=n),
        "expression": rng.standard_normal((n, n_expr)) * rng.uniform(*cfg.expression_sd, size=(n, 1)),
        "background": rng.uniform(0.1, 0.9, size=(n, 3)),
        "background_gradient": rng.uniform(-0.25, 0.25, size=n),
        "grain": rng.uniform(0.005, 0.02, size=n),
        "grain_seed": rng.integers(2**31, size=n),
    }


def _render_photos(model: FaceModel, face_t: np.ndarray, ident: dict, pp: dict, size: int) -> np.ndarray:
    """(P, size, size, 3) uint8 photographs of one participant."""
    import torch

    from ..render import Lights, Material, kelvin_to_rgb, look_at_face, rasterize, shade, vertex_normals_torch
    from ..surface import FaceFrame

    n = len(pp["azimuth_deg"])
    lm = model.landmarks
    up = np.array([0.0, 0.0, 1.0])
    fwd = np.array([0.0, 1.0, 0.0])
    nv = len(model.mean)
    reg = np.zeros((2 * nv, 6), np.float32)
    reg[:nv, :5] = _regions()
    reg[nv:, 5] = 1.0  # the backing: a dark inner copy seen through the nostrils and an open mouth
    weights = torch.as_tensor(reg)
    faces_t = torch.as_tensor(np.concatenate([model.faces, model.faces[:, [0, 2, 1]] + nv]), dtype=torch.int64)
    ss = 2  # supersampling: render at twice the size, average 2x2 blocks (anti-aliasing)
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        verts = face_t + np.tensordot(pp["expression"][k].astype(np.float32), model.expression, axes=1) * ident["face_scale"]
        centre = np.mean(verts[lm[[36, 39, 42, 45, 30, 48, 54]]], axis=0) - 25.0 * fwd
        inner = centre - 30.0 * fwd
        verts = np.concatenate([verts, inner + 0.85 * (verts - inner) - 4.0 * fwd])
        frame = FaceFrame(center=centre, forward=fwd, up=up)
        cams = look_at_face(frame, pp["azimuth_deg"][k], pp["elevation_deg"][k], pp["roll_deg"][k],
                            pp["distance_mm"][k], pp["fov_deg"][k])
        a, e = math.radians(pp["light_azimuth_deg"][k]), math.radians(pp["light_elevation_deg"][k])
        ldir = math.cos(e) * (math.cos(a) * fwd + math.sin(a) * frame.right) + math.sin(e) * up
        rgb = kelvin_to_rgb(torch.tensor([pp["color_temperature_k"][k]], dtype=torch.float32))
        lights = Lights(torch.tensor(ldir[None], dtype=torch.float32), rgb * float(pp["light_intensity"][k]),
                        rgb * float(pp["ambient"][k]))
        vt = torch.as_tensor(verts, dtype=torch.float32)
        normals = vertex_normals_torch(vt, faces_t)
        frags = rasterize(vt, faces_t, cams, size * ss, backend="embree", device="cpu", threads=1)
        skin = ident["skin_albedo"] * pp["albedo_gain"][k]
        albedos = np.stack([skin, np.array([0.55, 0.20, 0.18]) * ident["lip_tint"] * (0.6 + 0.6 * skin[0] / 0.7),
                            ident["brow_albedo"], np.array([0.62, 0.58, 0.55]), ident["iris_albedo"],
                            0.3 * skin])
        p2f = frags.pix_to_face[0]
        cov = p2f >= 0
        vid = faces_t[p2f.clamp(min=0)]  # (S, S, 3)
        wpix = (weights[vid] * frags.bary[0][..., None]).sum(2)  # (S, S, 5) region weights per pixel
        alb = wpix @ torch.as_tensor(np.clip(albedos, 0, 1), dtype=torch.float32)  # (S, S, 3) linear albedo
        spec = float(pp["specular"][k]) * (1.0 + wpix[..., [1, 3, 4]].sum(-1))  # lips and eyes are wetter
        # the shader is linear in albedo before its gamma: shade the light (albedo 0.5) and the
        # highlight (albedo 0, unit specular) once, and mix per pixel (one pass per term, not per region)
        half = Material(torch.full((1, 3), 0.5), torch.zeros(1), torch.tensor([16.0]))
        gloss = Material(torch.zeros((1, 3)), torch.ones(1), torch.tensor([16.0]))
        light_lin = (shade(frags, vt, faces_t, normals, cams, lights, half)[0].clamp(1e-6, 1) ** (1 / _GAMMA)) * 2
        spec_lin = shade(frags, vt, faces_t, normals, cams, lights, gloss)[0].clamp(1e-6, 1) ** (1 / _GAMMA)
        img = ((alb * light_lin + spec[..., None] * spec_lin).clamp(1e-6, 1) ** _GAMMA)[None]
        bg = torch.tensor(pp["background"][k], dtype=torch.float32)
        # background: a vertical gradient of the photo's colour
        s2 = size * ss
        ramp = torch.linspace(-1, 1, s2)[:, None, None] * float(pp["background_gradient"][k])
        back = (bg[None, None, :] * (1 + ramp)).clamp(0, 1).expand(s2, s2, 3)
        img = torch.where(cov[None, ..., None], img, back[None])
        small = img[0].reshape(size, ss, size, ss, 3).mean((1, 3)).numpy()
        g = np.random.default_rng(int(pp["grain_seed"][k])).standard_normal(small.shape).astype(np.float32)
        small = np.clip(small + g * float(pp["grain"][k]), 0, 1)
        out[k] = np.round(small * 255).astype(np.uint8)
    return out


_GAMMA = 1 / 2.2  # the shader's output curve (mriface.render.shade), inverted to mix linear terms


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
