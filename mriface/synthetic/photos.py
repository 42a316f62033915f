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
def _geometry() -> dict:
    """Per-vertex geometry of the model's mean face that appearance regions are drawn on (cached).

    ``p`` (V, 2): frontal projection (x, z) mm; ``lm`` (68, 2): the landmarks
    there; ``lips``, ``eyes``, ``iris`` (V,) soft masks; ``brow`` (V,) mm to
    the brows' line (1.5 mm above the brow landmarks).
    """
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
    brow = np.full(len(p), np.inf)
    for a, b in ((17, 22), (22, 27)):
        line = lm[a:b] + np.array([0.0, 1.5])
        seg = np.linspace(0, 1, 40)
        pts = np.concatenate([line[k] + (line[k + 1] - line[k]) * seg[:, None] for k in range(len(line) - 1)])
        brow = np.minimum(brow, np.min(np.linalg.norm(p[:, None, :] - pts[None, ::4, :], axis=2), axis=1))
    return {"p": p, "lm": lm, "lips": lips, "eyes": eyes, "iris": iris, "brow": brow}


#: hair colours (linear RGB) and how often they are drawn: black, dark brown, brown, blond, red, grey
_HAIR = np.array([[0.018, 0.015, 0.013], [0.045, 0.028, 0.018], [0.11, 0.065, 0.035], [0.34, 0.24, 0.12],
                  [0.28, 0.09, 0.035], [0.30, 0.29, 0.28]])
_HAIR_P = np.array([0.28, 0.25, 0.15, 0.12, 0.06, 0.14])


def _appearance(rng: np.random.Generator) -> dict:
    """A participant's photographed appearance (stream 4): skin, lips, eyes, brows, scalp and facial hair.

    Everything the face model has no shape for but people are told apart
    by: skin tone from dark to pale with its own redness and yellowness and
    a cheek flush; lip colour; iris colour; brow colour, thickness and
    height; the hair seen on the modelled face (a hairline or fringe on the
    forehead, sideburns) and, for about 40 %, facial hair (stubble,
    moustache, goatee or beard). The face model ends at the forehead and in
    front of the ears, so a head without the scalp would be a mask: an
    ellipsoid of hair (or, for about 12 %, of skin: bald) of the
    participant's size sits behind the face (:func:`_scalp`). Colours are
    linear RGB albedo.
    """
    light = rng.uniform(0.0, 1.0)
    dark, pale = np.array([0.13, 0.075, 0.05]), np.array([0.72, 0.50, 0.40])
    skin = dark + (pale - dark) * light ** 0.8
    skin = skin * np.array([1.0 + rng.uniform(-0.10, 0.12), 1.0, 1.0 + rng.uniform(-0.15, 0.10)])  # red, yellow
    hair_k = int(rng.choice(len(_HAIR), p=_HAIR_P))
    hair = _HAIR[hair_k] * rng.uniform(0.8, 1.25, size=3)
    beard_kind = ["none", "stubble", "moustache", "goatee", "beard"][int(rng.choice(5, p=[0.6, 0.12, 0.08, 0.08, 0.12]))]
    return {
        "skin_albedo": np.clip(skin * rng.uniform(0.95, 1.05, size=3), 0.02, 0.95),
        "cheek_flush": rng.uniform(0.0, 1.0),
        "lip_albedo": np.clip(np.array([0.50, 0.17, 0.16]) * rng.uniform(0.7, 1.2) * (0.55 + 0.6 * skin[0] / 0.7)
                              * rng.uniform(0.85, 1.15, size=3), 0.02, 0.9),
        "iris_albedo": np.array([[0.10, 0.05, 0.02], [0.05, 0.09, 0.14], [0.06, 0.08, 0.04], [0.03, 0.02, 0.012]])[
            int(rng.choice(4, p=[0.35, 0.2, 0.15, 0.3]))] * rng.uniform(0.6, 1.6),
        "hair_color": hair_k,
        "hair_albedo": hair,
        "brow_albedo": np.clip(hair * rng.uniform(0.45, 1.0), 0.01, 0.5),
        "brow_thickness": rng.uniform(0.6, 1.7),
        "brow_raise_mm": rng.uniform(-2.5, 3.5),
        "hairline_mm": rng.uniform(55.0, 105.0),  # above the mesh's top (89 mm) at the middle: none there
        "hairline_curve_mm": rng.uniform(-20.0, 25.0),  # + recedes at the temples, - a fringe lower at the sides
        "sideburn_x_mm": rng.uniform(60.0, 78.0),  # beyond the mesh (76 mm): none
        "scalp": "bald" if rng.uniform() < 0.12 else "hair",
        "scalp_radii_mm": np.array([rng.uniform(76.0, 94.0), rng.uniform(70.0, 88.0), rng.uniform(95.0, 118.0)]),
        "scalp_height_mm": rng.uniform(0.0, 22.0),  # centre above the ear-level face border
        "scalp_bottom_mm": rng.uniform(-45.0, 0.0),  # how far the hair reaches down, from the centre
        "beard": beard_kind,
        "beard_density": rng.uniform(0.35, 0.6) if beard_kind == "stubble" else rng.uniform(0.75, 1.0),
        "freckles": rng.uniform(0.2, 1.0) if rng.uniform() < 0.25 else 0.0,
        "moles": int(rng.integers(0, 6)),
        "texture_seed": int(rng.integers(2**31)),
    }


def _vertex_albedo(app: dict) -> tuple:
    """(V, 3) float32 linear albedo and (V,) specular weight of a participant's face, layer by layer."""
    gm = _geometry()
    p, lm = gm["p"], gm["lm"]
    x, z = p[:, 0], p[:, 1]
    tex = np.random.default_rng(app["texture_seed"]).standard_normal((len(p), 2))
    skin = np.asarray(app["skin_albedo"], np.float64)
    alb = np.broadcast_to(skin, (len(p), 3)).copy()
    spec = np.ones(len(p))

    def layer(a, colour, s=None):
        a = np.clip(a, 0.0, 1.0)[:, None]
        alb[:] = alb * (1 - a) + a * colour
        if s is not None:
            spec[:] = spec * (1 - a[:, 0]) + a[:, 0] * s

    # cheek flush: a soft blob under each eye
    for ci in ((36, 48), (45, 54)):
        c = np.array([lm[ci[0], 0] * 0.9 + lm[ci[1], 0] * 0.1, (lm[ci[0], 1] + lm[ci[1], 1]) / 2])
        r2 = ((p - c) ** 2).sum(1) / 18.0 ** 2
        layer(app["cheek_flush"] * 0.6 * np.exp(-r2), skin * np.array([1.35, 0.85, 0.85]))
    # freckles (some participants) and a few moles: spots of darker skin
    spots = np.random.default_rng(app["texture_seed"] + 2)
    if app["freckles"] > 0:
        c = p[spots.choice(len(p), size=int(400 * app["freckles"]), replace=False)]
        near = np.zeros(len(p))
        for cc in c:
            d2 = ((p - cc) ** 2).sum(1)
            near = np.maximum(near, np.exp(-d2 / 0.8))
        layer(0.6 * near, skin * np.array([0.7, 0.55, 0.45]))
    for cc in p[spots.choice(len(p), size=int(app["moles"]), replace=False)]:
        layer(np.exp(-((p - cc) ** 2).sum(1) / 1.5), skin * 0.35)
    strands = np.clip(1.0 + 0.3 * tex[:, 0], 0.4, 1.8)[:, None]  # hair is not one flat colour
    hair = np.asarray(app["hair_albedo"], np.float64) * strands
    # scalp hair on the forehead (a hairline, or a fringe) and sideburns in front of the ears
    zh = app["hairline_mm"] + app["hairline_curve_mm"] * (x / 60.0) ** 2
    scalp = _smoothstep(z - zh, -2.0, 2.0)
    sideburn = _smoothstep(np.abs(x) - app["sideburn_x_mm"], -2.0, 2.0) * _smoothstep(z, -12.0, -4.0)
    layer(np.maximum(scalp, sideburn), hair, 0.5)
    # facial hair
    kind, dens = app["beard"], app["beard_density"]
    mw = (lm[48, 0] - lm[54, 0]) / 2  # half the mouth's width
    if kind != "none":
        moustache = (1 - _smoothstep(np.abs(x), mw + 2, mw + 6)) * _smoothstep(z, lm[51, 1] - 1, lm[51, 1] + 2) \
            * (1 - _smoothstep(z, lm[33, 1] - 4, lm[33, 1] - 1))
        chin = (1 - _smoothstep(np.abs(x), mw, mw + 6)) * (1 - _smoothstep(z, lm[57, 1] - 5, lm[57, 1] - 2))
        zjaw = np.interp(np.abs(x), [mw, 45.0, 75.0], [lm[48, 1] - 4, lm[48, 1] + 8, 10.0])
        jaw = 1 - _smoothstep(z, zjaw - 2, zjaw + 2)
        area = {"stubble": np.maximum.reduce([moustache, chin, jaw]), "moustache": moustache,
                "goatee": np.maximum(moustache, chin), "beard": np.maximum.reduce([moustache, chin, jaw])}[kind]
        cover = dens * (np.clip(0.75 + 0.5 * tex[:, 1], 0, 1) if kind == "stubble" else 1.0)
        layer(area * cover * (1 - gm["lips"]), hair * (1.1 if kind == "stubble" else 1.0), 0.5)
    th = app["brow_thickness"]
    brow = 1 - _smoothstep(_brow_distance(app["brow_raise_mm"]), 2.5 * th, 4.0 * th)
    layer(brow * (1 - gm["eyes"]), np.asarray(app["brow_albedo"]) * strands)
    layer(gm["lips"], np.asarray(app["lip_albedo"]), 2.0)
    layer(gm["eyes"] * (1 - gm["iris"]), np.array([0.62, 0.58, 0.55]), 2.0)
    layer(gm["iris"], np.asarray(app["iris_albedo"]), 2.0)
    return np.clip(alb, 0.0, 1.0).astype(np.float32), spec.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _unit_sphere(n_lat: int = 36, n_lon: int = 72) -> tuple:
    """A UV sphere of radius 1 without its poles' caps: (N, 3) vertices (lat-major, z up), (F, 3) triangles
    counter-clockwise seen from outside, and (N,) latitude index of each vertex."""
    lat = np.linspace(0.02, np.pi - 0.02, n_lat)
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    th, ph = np.meshgrid(lat, lon, indexing="ij")
    v = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
    a = np.arange(n_lat - 1)[:, None] * n_lon + np.arange(n_lon)[None, :]
    b = np.arange(n_lat - 1)[:, None] * n_lon + (np.arange(n_lon)[None, :] + 1) % n_lon
    f = np.concatenate([np.stack([a, a + n_lon, b], -1).reshape(-1, 3), np.stack([b, a + n_lon, b + n_lon], -1).reshape(-1, 3)])
    return v, f.astype(np.int64), np.repeat(np.arange(n_lat), n_lon)


def _scalp(verts: np.ndarray, lm: np.ndarray, app: dict, scale: float) -> tuple:
    """The scalp behind a face: (N, 3) vertices, (F, 3) triangles of a cut ellipsoid, and which of
    :func:`_unit_sphere`'s vertices they are.

    Its centre is ``scalp_height_mm`` above the face's ear-level border
    (landmarks 0 and 16), set back so that its surface passes 15 mm behind
    the outer eye corners (the face always covers it in front); it is cut
    ``scalp_bottom_mm`` below its centre (hair length; a bald head ends at
    ear level).
    """
    v, f, _ = _unit_sphere()
    r = np.asarray(app["scalp_radii_mm"], np.float64) * scale
    ear = (verts[lm[0]] + verts[lm[16]]) / 2
    cz = ear[2] + app["scalp_height_mm"] * scale
    eye = (verts[lm[36]] + verts[lm[45]]) / 2
    ex = abs(verts[lm[36], 0] - verts[lm[45], 0]) / 2
    q = max(1.0 - (ex / r[0]) ** 2 - ((eye[2] - cz) / r[2]) ** 2, 0.05)
    cy = eye[1] - 15.0 * scale - r[1] * np.sqrt(q)
    # the sphere's y runs out of the face: ellipsoid axes (x, y, z) = radii (r0, r1, r2)
    pts = v * r[None, :] + np.array([ear[0], cy, cz])
    bottom = cz + (app["scalp_bottom_mm"] if app["scalp"] == "hair" else -5.0) * scale
    keep_v = pts[:, 2] >= bottom
    keep_f = keep_v[f].all(1)
    idx = np.nonzero(keep_v)[0]
    remap = np.full(len(pts), -1, np.int64)
    remap[idx] = np.arange(len(idx))
    return pts[idx], remap[f[keep_f]], idx


def _brow_distance(raise_mm: float) -> np.ndarray:
    """(V,) mm from each vertex to the brows' line moved up by ``raise_mm``."""
    gm = _geometry()
    p, lm = gm["p"], gm["lm"]
    near = gm["brow"] < 15.0  # only vertices near the brows can be in them
    out = np.full(len(p), np.inf)
    q = p[near]
    d = np.full(len(q), np.inf)
    seg = np.linspace(0, 1, 10)
    for a, b in ((17, 22), (22, 27)):
        line = lm[a:b] + np.array([0.0, 1.5 + raise_mm])
        pts = np.concatenate([line[k] + (line[k + 1] - line[k]) * seg[:, None] for k in range(len(line) - 1)])
        d = np.minimum(d, np.min(np.linalg.norm(q[:, None, :] - pts[None, :, :], axis=2), axis=1))
    out[near] = d
    return out


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
    """(P, size, size, 3) uint8 photographs of one participant (``ident`` holds :func:`_appearance`)."""
    import torch

    from ..render import Lights, Material, kelvin_to_rgb, look_at_face, rasterize, shade, vertex_normals_torch
    from ..surface import FaceFrame

    n = len(pp["azimuth_deg"])
    lm = model.landmarks
    up = np.array([0.0, 0.0, 1.0])
    fwd = np.array([0.0, 1.0, 0.0])
    from scipy import ndimage

    nv, nf = len(model.mean), len(model.faces)
    valb, vspec = _vertex_albedo(ident)
    alb_v = torch.as_tensor(valb)
    spec_v = torch.as_tensor(vspec)
    faces_t = torch.as_tensor(model.faces, dtype=torch.int64)
    # scalp colour: hair with strands, or skin
    stex = np.random.default_rng(ident["texture_seed"] + 1).standard_normal(len(_unit_sphere()[0]))
    if ident["scalp"] == "hair":
        scalp_alb = np.asarray(ident["hair_albedo"], np.float32)[None, :] * np.clip(1 + 0.3 * stex, 0.4, 1.8)[:, None]
    else:
        scalp_alb = np.broadcast_to(np.asarray(ident["skin_albedo"], np.float32), (len(stex), 3))
    scalp_alb = np.ascontiguousarray(scalp_alb, dtype=np.float32)
    # the shader is linear in albedo before its gamma: shade the light (albedo 0.5) and the
    # highlight (albedo 0, unit specular) once each, and mix per pixel
    half = Material(torch.full((1, 3), 0.5), torch.zeros(1), torch.tensor([16.0]))
    gloss = Material(torch.zeros((1, 3)), torch.ones(1), torch.tensor([16.0]))
    ss = 2  # supersampling: render at twice the size, average 2x2 blocks (anti-aliasing)
    s2 = size * ss
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        verts = face_t + np.tensordot(pp["expression"][k].astype(np.float32), model.expression, axes=1) * ident["face_scale"]
        centre = np.mean(verts[lm[[36, 39, 42, 45, 30, 48, 54]]], axis=0) - 25.0 * fwd
        sv, sf, sidx = _scalp(verts, lm, ident, float(ident["face_scale"]))
        verts = np.concatenate([verts, sv])
        if k == 0:  # the scalp's triangles are the same in every photograph of the participant
            faces_t = torch.cat([faces_t, torch.as_tensor(sf + nv)])
            alb_v = torch.cat([alb_v, torch.as_tensor(scalp_alb[sidx])])
            spec_v = torch.cat([spec_v, torch.full((len(sv),), 0.5 if ident["scalp"] == "hair" else 1.0)])
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
        frags = rasterize(vt, faces_t, cams, s2, backend="embree", device="cpu", threads=1)
        p2f = frags.pix_to_face[0]
        cov = p2f >= 0
        vid = faces_t[p2f.clamp(min=0)]  # (S, S, 3)
        bary = frags.bary[0][..., None]
        alb = (alb_v[vid] * bary).sum(2) * float(pp["albedo_gain"][k])  # (S, S, 3) linear albedo
        spec = float(pp["specular"][k]) * (spec_v[vid] * bary[..., 0]).sum(2)  # lips and eyes are wetter, hair matte
        light_lin = (shade(frags, vt, faces_t, normals, cams, lights, half)[0].clamp(1e-6, 1) ** (1 / _GAMMA)) * 2
        spec_lin = shade(frags, vt, faces_t, normals, cams, lights, gloss)[0].clamp(1e-6, 1) ** (1 / _GAMMA)
        img = (alb * light_lin + spec[..., None] * spec_lin).clamp(1e-6, 1) ** _GAMMA
        bg = torch.tensor(pp["background"][k], dtype=torch.float32)
        # background: a vertical gradient of the photo's colour
        ramp = torch.linspace(-1, 1, s2)[:, None, None] * float(pp["background_gradient"][k])
        back = (bg[None, None, :] * (1 + ramp)).clamp(0, 1).expand(s2, s2, 3)
        img = torch.where(cov[..., None], img, back)
        # the face mesh's holes (the folds under the nose, a parted mouth): what a ray sees through
        # them, inside the face's outline, is the dark inside of the head, lit by the ambient light only
        face = (cov & (p2f < nf)).numpy()
        holes = torch.from_numpy(ndimage.binary_fill_holes(face) & ~face)
        dark = (0.3 * torch.as_tensor(np.asarray(ident["skin_albedo"], np.float32)) * rgb[0] * float(pp["ambient"][k])
                ).clamp(1e-6, 1) ** _GAMMA
        img = torch.where(holes[..., None], dark, img)
        small = img.reshape(size, ss, size, ss, 3).mean((1, 3)).numpy()
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
