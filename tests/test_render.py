"""Renderer: camera conventions, backend agreement, determinism, gradients, writing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import mriface
from mriface.errors import BackendError, MRIFaceError
from mriface.render import (
    Lights, Material, RenderProtocol, available_backends, look_at_face, rasterize, render_views, shade, write_renders,
)
from mriface.render._synthetic import synthetic_head

#: the registered backends other than the CPU reference (embree) they are compared with
OTHERS = [b for b in available_backends() if b != "embree"]


@pytest.fixture(scope="module")
def small_head():
    """The 2 mm averaged head, decimated so pytorch3d's CPU rasterizer stays affordable."""
    from mriface.surface import crop_face, extract_head_surface
    from mriface.volume import load_volume

    surf = extract_head_surface(load_volume(mriface.datasets.fetch("voxface")), target_faces=30000)
    return crop_face(surf, behind_mm=60)


def _fixed_scene(frame, n=1, light_az=0.0, light_el=0.0, dtype=torch.float64):
    cams = look_at_face(frame, np.linspace(-10, 10, n), 5.0, 0.0, 420.0, 40.0, dtype=dtype)
    a, e = np.radians(light_az), np.radians(light_el)
    d = np.cos(e) * (np.cos(a) * frame.forward + np.sin(a) * frame.right) + np.sin(e) * frame.up
    lights = Lights(torch.tensor(np.tile(d, (n, 1)), dtype=dtype), torch.full((n, 3), 0.8, dtype=dtype),
                    torch.full((n, 3), 0.3, dtype=dtype))
    mat = Material(torch.tensor([[0.6, 0.4, 0.3]] * n, dtype=dtype), torch.full((n,), 0.1, dtype=dtype),
                   torch.full((n,), 10.0, dtype=dtype))
    return cams, lights, mat


# ----------------------------------------------------------------------------- cameras
def test_frontal_camera_puts_face_centre_mid_image_and_right_on_the_right():
    head = synthetic_head()
    fr = head.frame
    cams = look_at_face(fr, 0, 0, 0, 500, 30)
    pts = torch.tensor(np.stack([fr.center, fr.center + 50 * fr.right, fr.center + 50 * fr.up]), dtype=torch.float32)
    px = cams.project(pts, 100)[0]
    assert torch.allclose(px[0], torch.tensor([50.0, 50.0]), atol=1e-3)
    assert px[1, 0] > 60 and abs(px[1, 1] - 50) < 1e-3  # frame.right -> image right
    assert px[2, 1] < 40 and abs(px[2, 0] - 50) < 1e-3  # frame.up -> image top
    assert torch.allclose(cams.centers()[0], torch.tensor(fr.center + 500 * fr.forward, dtype=torch.float32), atol=1e-3)
    rolled = look_at_face(fr, 0, 0, 10, 500, 30).project(pts, 100)[0]
    assert rolled[2, 0] < 48 and torch.allclose(rolled[0], px[0], atol=1e-3)  # top of the head tilts to image left


def test_azimuth_moves_camera_towards_frame_right_and_rays_hit_pixel_centres():
    fr = synthetic_head().frame
    cams = look_at_face(fr, [30, 0], [0, 20], [0, 10], 500, [30, 45], dtype=torch.float64)
    c = cams.centers().double().numpy()
    assert (c[0] - fr.center) @ fr.right > 100 and (c[1] - fr.center) @ fr.up > 100
    dirs = cams.ray_directions(8)
    pts = cams.centers()[:, None, None, :] + 3.0 * dirs
    px = cams.project(pts.reshape(2, -1, 3), 8).reshape(2, 8, 8, 2)
    jj, ii = torch.meshgrid(torch.arange(8.0, dtype=torch.float64), torch.arange(8.0, dtype=torch.float64), indexing="xy")
    assert torch.allclose(px[..., 0], (jj + 0.5).expand(2, -1, -1), atol=1e-4)
    assert torch.allclose(px[..., 1], (ii + 0.5).expand(2, -1, -1), atol=1e-4)


# ----------------------------------------------------------------------------- backends
@pytest.mark.parametrize("other", OTHERS)
def test_backends_agree_with_embree_on_a_decimated_sample_head(small_head, other):
    prot = RenderProtocol(views=4, image_size=128, seed=3)
    a = render_views([small_head], prot, backend="embree", device="cpu").images
    b = render_views([small_head], prot, backend=other, device="cpu").images
    bg = torch.tensor(prot.background)
    mask_a = (a - bg).abs().amax(-1) > 1e-6
    mask_b = (b - bg).abs().amax(-1) > 1e-6
    assert mask_a.float().mean() > 0.1, "the head should fill a good part of the image"
    assert (mask_a != mask_b).float().mean() <= 0.005
    assert ((a - b).abs().amax(-1) <= 2 / 255).float().mean() >= 0.99


@pytest.mark.parametrize("other", OTHERS)
def test_fragments_agree_between_backends_on_depth_and_face_ids(other):
    head = synthetic_head()
    cams, _, _ = _fixed_scene(head.frame, n=2, dtype=torch.float32)
    v, f = torch.tensor(head.verts), torch.tensor(head.faces)
    fe = rasterize(v, f, cams, 48, backend="embree", device="cpu")
    fp = rasterize(v, f, cams, 48, backend=other, device="cpu")
    both = fe.mask & fp.mask
    assert both.float().mean() > 0.2
    assert (fe.pix_to_face[both] == fp.pix_to_face[both]).float().mean() > 0.98
    assert torch.allclose(fe.depth[both], fp.depth[both], rtol=1e-4, atol=1e-2)
    same = both & (fe.pix_to_face == fp.pix_to_face)
    assert torch.allclose(fe.bary[same], fp.bary[same], atol=1e-3)


def test_unknown_backend_and_impossible_device_raise_helpful_errors():
    head = synthetic_head()
    with pytest.raises(BackendError, match="backend='vtk'.*'zbuffer', 'embree'.*register_backend"):
        render_views([head], RenderProtocol(views=1, image_size=16), backend="vtk", device="cpu")
    with pytest.raises(MRIFaceError, match="views"):
        RenderProtocol(views=0)
    with pytest.raises(MRIFaceError, match="azimuth_deg"):
        RenderProtocol(azimuth_deg=(10, -10))
    with pytest.raises(MRIFaceError, match="subject_ids"):
        render_views([head], RenderProtocol(views=1, image_size=16), subject_ids=["a", "b"], device="cpu")


# ----------------------------------------------------------------------------- protocol
def test_same_seed_same_images_and_adding_a_subject_changes_no_other_subject():
    head = synthetic_head()
    other = dataclasses.replace(head, verts=head.verts * 1.05)
    prot = RenderProtocol(views=3, image_size=40, seed=7)
    one = render_views({"a": head}, prot, device="cpu")
    two = render_views({"b": other, "a": head}, prot, device="cpu")
    again = render_views({"a": head}, prot, device="cpu")
    assert torch.equal(one.images, again.images)
    assert two.subjects == ["b"] * 3 + ["a"] * 3
    assert torch.equal(two.images[3:], one.images)
    df1, df2 = one.to_dataframe(), two.to_dataframe()
    pd.testing.assert_frame_equal(df1, df2.iloc[3:].reset_index(drop=True))
    part = two[3:6]  # one subject's rows of a batch: what the study's batched rendering hands each scan
    assert len(part) == 3 and part.subjects == ["a"] * 3 and torch.equal(part.images, one.images)
    pd.testing.assert_frame_equal(part.to_dataframe(), df1)
    assert torch.equal(part.cameras.R, one.cameras.R) and torch.equal(part.lights.direction, one.lights.direction)
    other_seed = render_views({"a": head}, dataclasses.replace(prot, seed=8), device="cpu")
    assert not np.allclose(other_seed.params["azimuth_deg"], one.params["azimuth_deg"])
    assert not np.allclose(df2["azimuth_deg"][:3], df2["azimuth_deg"][3:])  # subjects draw differently


def test_parameters_stay_in_their_ranges_and_are_reported_per_image():
    head = synthetic_head()
    prot = RenderProtocol(views=20, image_size=16, azimuth_deg=(-5, 5), distance_mm=(400, 410))
    b = render_views([head, head], prot, device="cpu")
    df = b.to_dataframe()
    assert len(df) == 40 and list(b.view[:20]) == list(range(20))
    assert df["azimuth_deg"].between(-5, 5).all() and df["distance_mm"].between(400, 410).all()
    d = np.linalg.norm(b.cameras.centers().double().numpy() - head.frame.center, axis=1)
    assert np.allclose(d, df["distance_mm"], atol=1e-2)
    assert np.allclose(np.linalg.norm(df[["light_x", "light_y", "light_z"]].to_numpy(), axis=1), 1)
    assert (df[["light_x", "light_y", "light_z"]].to_numpy() @ head.frame.forward > 0).all()  # lit from the front
    assert b.images.shape == (40, 16, 16, 3) and b.images.dtype == torch.float32
    assert 0 <= b.images.min() and b.images.max() <= 1


def test_render_views_drops_only_triangles_no_camera_can_see(small_head):
    from mriface.render import front_faces, sample_view_params, scene_from_params
    from mriface.render.protocol import _light_world

    prot = RenderProtocol(views=3, image_size=96, seed=5)
    culled = render_views({"s": small_head}, prot, device="cpu").images
    p = sample_view_params(prot, "s")
    p["light_x"], p["light_y"], p["light_z"] = _light_world(small_head.frame, p["light_azimuth_deg"],
                                                             p["light_elevation_deg"]).T
    cams, lights, mat = scene_from_params(small_head.frame, p)
    v, f, n = (torch.tensor(x) for x in (small_head.verts, small_head.faces, small_head.normals))
    full = shade(rasterize(v, f, cams, 96, backend="embree", device="cpu"), v, f, n, cams, lights, mat,
                 background=prot.background)
    assert torch.equal(culled, full)
    kept = front_faces(v, f, cams.centers())
    assert 0.3 * len(f) < len(kept) < 0.95 * len(f)  # the fixture is already cropped to the front


def test_write_renders_writes_pngs_and_a_parameter_table(tmp_path):
    from mriface._io import safe_component

    head = synthetic_head()
    b = render_views({"sub/01": head}, RenderProtocol(views=2, image_size=24), device="cpu")
    paths = write_renders(b, tmp_path / "out", prefix="g_")
    safe = safe_component("sub/01")  # issue 13: one safe name per id ("sub_01-<hash>": "/" was replaced)
    assert safe.startswith("sub_01-") and [p.name for p in paths] == [f"g_{safe}_view00.png", f"g_{safe}_view01.png"]
    png = np.asarray(Image.open(paths[1]))
    assert png.shape == (24, 24, 3)
    assert np.abs(png.astype(float) / 255 - b.images[1].numpy()).max() <= 0.5 / 255 + 1e-6
    table = pd.read_csv(tmp_path / "out" / "g_renders.csv")
    assert list(table["file"]) == [p.name for p in paths]
    assert np.allclose(table["fov_deg"], b.params["fov_deg"])
    assert not list((tmp_path / "out").glob("*.part"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(MRIFaceError, match="not a folder"):
        write_renders(b, tmp_path / "file")


# ----------------------------------------------------------------------------- gradients
def _interior_weights(mask: torch.Tensor, seed=0) -> torch.Tensor:
    """Random pixel weights, zero within 2 px of the silhouette (where images are not differentiable)."""
    m = mask.float()[:, None]
    eroded = -torch.nn.functional.max_pool2d(-m, 5, stride=1, padding=2)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(mask.shape + (3,), generator=g, dtype=torch.float64) * eroded[:, 0, ..., None]).to(torch.float64)


def _render(verts, faces, cams, lights, mat, backend, size=40):
    frags = rasterize(verts, faces, cams, size, backend=backend, device="cpu")
    return shade(frags, verts, faces, None, cams, lights, mat), frags


@pytest.mark.parametrize("backend", available_backends())
def test_vertex_gradients_match_finite_differences(backend):
    head = synthetic_head(24, 32)
    dtype = torch.float32 if backend == "pytorch3d" else torch.float64
    cams, lights, mat = _fixed_scene(head.frame, n=1, dtype=dtype)
    faces = torch.tensor(head.faces)
    verts = torch.tensor(head.verts, dtype=dtype, requires_grad=True)
    img, frags = _render(verts, faces, cams, lights, mat, backend)
    w = _interior_weights(frags.mask).to(dtype)
    (img * w).sum().backward()
    # vertices of the visible front, away from the silhouette
    front = np.argsort(-(head.verts - head.frame.center) @ head.frame.forward)[:40:4]
    eps = 1e-5 if dtype == torch.float64 else 2e-2
    num, ana = [], []
    for vi in front:
        for ax in range(3):
            vals = []
            for sgn in (1, -1):
                v2 = verts.detach().clone()
                v2[vi, ax] += sgn * eps
                # requires_grad makes embree recompute hits in float64 too, like the analytic pass
                im2, _ = _render(v2.requires_grad_(True), faces, cams, lights, mat, backend)
                vals.append((im2 * w).sum().item())
            num.append((vals[0] - vals[1]) / (2 * eps))
            ana.append(verts.grad[vi, ax].item())
    num, ana = np.array(num), np.array(ana)
    assert np.abs(ana).max() > 1e-3, "gradients should not vanish on the visible front"
    err = np.abs(num - ana).max() / np.abs(num).max()
    print(f"{backend}: max relative error {err:.2e}")
    assert err < (0.05 if backend == "pytorch3d" else 1e-5), (num, ana)


@pytest.mark.parametrize("backend", available_backends())
def test_light_and_material_gradients_match_finite_differences(backend):
    head = synthetic_head(24, 32)
    cams, lights, mat = _fixed_scene(head.frame, n=1, light_az=30.0, light_el=20.0, dtype=torch.float64)
    verts, faces = torch.tensor(head.verts, dtype=torch.float64), torch.tensor(head.faces)
    frags = rasterize(verts.float(), faces, cams.to("cpu"), 40, backend=backend, device="cpu")
    frags = type(frags)(frags.pix_to_face, frags.bary.double(), frags.depth.double())
    w = _interior_weights(frags.mask)

    def loss(direction, albedo):
        lt = Lights(direction, lights.color, lights.ambient)
        mt = Material(albedo, mat.specular, mat.shininess)
        return (shade(frags, verts, faces, None, cams, lt, mt) * w).sum()

    d = lights.direction.clone().requires_grad_(True)
    alb = mat.albedo.clone().requires_grad_(True)
    loss(d, alb).backward()
    eps = 1e-6
    for ax in range(3):
        e = torch.zeros_like(d)
        e[0, ax] = eps
        num = (loss(d.detach() + e, alb.detach()) - loss(d.detach() - e, alb.detach())).item() / (2 * eps)
        assert num == pytest.approx(d.grad[0, ax].item(), rel=1e-4, abs=1e-6)
    e = torch.zeros_like(alb)
    e[0, 0] = eps
    num = (loss(d.detach(), alb.detach() + e) - loss(d.detach(), alb.detach() - e)).item() / (2 * eps)
    assert num == pytest.approx(alb.grad[0, 0].item(), rel=1e-4)
    assert abs(d.grad).max() > 1e-3


def test_soft_silhouette_has_gradients_at_the_outline():
    from mriface.render.backends.pytorch3d import soft_silhouette

    head = synthetic_head(24, 32)
    cams, _, _ = _fixed_scene(head.frame, n=1, dtype=torch.float32)
    verts = torch.tensor(head.verts, requires_grad=True)
    sil = soft_silhouette(verts, torch.tensor(head.faces), cams, 32, sigma=1e-4)
    assert sil.shape == (1, 32, 32) and 0 <= sil.min() and sil.max() <= 1
    hard = rasterize(verts.detach(), torch.tensor(head.faces), cams, 32, backend="embree", device="cpu").mask
    assert ((sil > 0.5) == hard).float().mean() > 0.97
    sil.sum().backward()
    assert verts.grad.abs().sum() > 0


def _cpu_reference_backend() -> str:
    """embree where embreex imports, else zbuffer on the CPU (the GPU host has no embreex;
    CPU tests check the two against each other)."""
    try:
        import embreex  # noqa: F401
    except ImportError:
        return "zbuffer"
    return "embree"


def _cuda_backends() -> list:
    """The registered backends that run on CUDA ("auto" is zbuffer there)."""
    from mriface.render import get_backend

    return [b for b in available_backends() if get_backend(b).default_device != "cpu"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _cuda_backends())
def test_cuda_backends_agree_with_the_cpu_reference(small_head, backend):
    prot = RenderProtocol(views=4, image_size=128, seed=3)
    a = render_views([small_head], prot, backend=_cpu_reference_backend(), device="cpu").images
    b = render_views([small_head], prot, backend=backend, device="cuda").images
    bg = torch.tensor(prot.background)
    mask_a = (a - bg).abs().amax(-1) > 1e-6
    mask_b = (b - bg).abs().amax(-1) > 1e-6
    assert mask_a.float().mean() > 0.1
    assert (mask_a != mask_b).float().mean() <= 0.005
    assert ((a - b).abs().amax(-1) <= 2 / 255).float().mean() >= 0.99


# ----------------------------------------------------------------------------- command line
def test_render_command_writes_pngs_and_table_and_reports_bad_input(tmp_path, capsys):
    from mriface.cli import main
    from mriface.surface import save_surface_npz

    save_surface_npz(synthetic_head(), tmp_path / "subj.npz")
    assert main(["render", str(tmp_path / "subj.npz"), "--out", str(tmp_path / "r"), "--views", "2",
                 "--size", "32", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["renders.csv", "subj_view00.png", "subj_view01.png"]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert main(["render", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "r2"), "--device", "cpu"]) == 2
    assert "bad.npz" in capsys.readouterr().err


def test_the_low_level_example_in_the_docs_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "render.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "rasterize(" in b and "backward" in b)
    exec(compile(example, "docs/render.md", "exec"), {})


def _three_heads() -> dict:
    """Three small heads of different shapes (one without a nose), for batching tests."""
    a = synthetic_head(24, 32)
    b = dataclasses.replace(a, verts=(a.verts * np.array([1.1, 0.95, 1.0], np.float32)).astype(np.float32))
    return {"a": a, "b": b, "c": synthetic_head(20, 28, nose=False)}


def test_pytorch3d_batches_several_subjects_into_one_call_like_embree_renders_them_one_by_one():
    heads = _three_heads()
    prot = RenderProtocol(views=2, image_size=40, seed=2)
    emb = render_views(heads, prot, backend="embree", device="cpu")
    p3d = render_views(heads, prot, backend="pytorch3d", device="cpu", batch_images=4)  # 2 subjects per call
    assert emb.subjects == p3d.subjects
    mask_e = (emb.images - torch.tensor(prot.background)).abs().amax(-1) > 1e-6
    assert mask_e.float().mean() > 0.1
    assert ((emb.images - p3d.images).abs().amax(-1) <= 2 / 255).float().mean() >= 0.99


@pytest.mark.gpu
def test_pytorch3d_default_settings_give_the_naive_rasterizers_faces_on_cuda():
    # binned (coarse-to-fine) rasterization exists on CUDA only; its overflow is a silent printf there,
    # so the defaults must leave room for a whole mesh in every bin
    head = synthetic_head()
    v, f = torch.tensor(head.verts), torch.tensor(head.faces)
    cams = look_at_face(head.frame, [0, 10, -15], 0, 0, 260, 40)  # close: the face fills many bins
    for size in (64, 128):
        naive = rasterize(v, f, cams, size, backend="pytorch3d", device="cuda", bin_size=0)
        binned = rasterize(v, f, cams, size, backend="pytorch3d", device="cuda")
        assert naive.mask.float().mean() > 0.3
        assert torch.equal(naive.pix_to_face, binned.pix_to_face)


def test_pytorch3d_bin_buffer_arithmetic_and_split_calls(monkeypatch):
    from mriface.render.backends import pytorch3d as bp

    assert bp.default_bin_size(512, torch.device("cuda")) == 32  # pytorch3d's heuristic
    assert bp.default_bin_size(64, torch.device("cuda")) == 8
    assert bp.default_bin_size(512, torch.device("cpu")) == 0  # naive on the CPU
    # the study: 512 px, 16 x 16 bins, a 210k-triangle culled head -> 9 images per call under 2 GiB
    k = bp.images_per_call(512, 32, 210_000)
    assert k * 256 * 210_000 * 4 <= bp.BIN_BUFFER_BYTES < (k + 1) * 256 * 210_000 * 4
    assert bp.images_per_call(512, 32, 10**9) == 1 and bp.images_per_call(512, 0, 10**9) > 10**6
    # split calls give the same fragments as one call, face ids into the concatenated meshes
    a = synthetic_head(24, 32)
    b = synthetic_head(20, 28, nose=False)
    cams = look_at_face(a.frame, [-10, 0, 10, 20, 5], 0, 0, 420, 40)
    vs = [torch.tensor(a.verts), torch.tensor(b.verts)]
    fs = [torch.tensor(a.faces), torch.tensor(b.faces)]
    index = torch.tensor([0, 1, 1, 0, 1])
    whole = rasterize(vs, fs, cams, 32, backend="pytorch3d", mesh_index=index, device="cpu")
    monkeypatch.setattr(bp, "images_per_call", lambda *args, **kw: 2)
    split = rasterize(vs, fs, cams, 32, backend="pytorch3d", mesh_index=index, device="cpu")
    assert whole.mask.float().mean() > 0.1
    assert torch.equal(whole.pix_to_face, split.pix_to_face) and torch.equal(whole.depth, split.depth)
    assert int(whole.pix_to_face[1].max()) >= len(a.faces)  # views of mesh 1 index past mesh 0's faces
    # a too small bin on the CPU (where pytorch3d raises instead of printing) becomes advice
    with pytest.raises(BackendError, match="max_faces_per_bin=None"):
        rasterize(vs[0], fs[0], cams[:1], 64, backend="pytorch3d", device="cpu", bin_size=8, max_faces_per_bin=5)


def test_embree_hits_do_not_depend_on_the_number_of_tracing_threads():
    from mriface.render import Scene
    from mriface.render.backends.embree import cast_hits

    head = synthetic_head()
    cams, _, _ = _fixed_scene(head.frame, n=3, dtype=torch.float32)
    v, f = torch.tensor(head.verts), torch.tensor(head.faces)
    scene = Scene((v,), (f,), torch.zeros(3, dtype=torch.int64), cams, 64)
    one = cast_hits(scene, threads=1)
    many = cast_hits(scene, threads=3)
    assert one.pixel.numel() > 1000
    for name in ("pixel", "face", "bary", "depth"):
        assert torch.equal(getattr(one, name), getattr(many, name)), name
    # the compact hits are exactly the covered pixels of the full fragments
    frags = rasterize(v, f, cams, 64, backend="embree", device="cpu", threads=2)
    assert torch.equal(torch.nonzero(frags.mask.reshape(-1)).flatten(), one.pixel)
    assert torch.equal(frags.pix_to_face.reshape(-1)[one.pixel], one.face)


def _with_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_shading_gives_the_same_bits_with_any_number_of_torch_threads():
    """A streaming worker renders on one thread what the main process renders on all cores (issue 11)."""
    from mriface.render.shade import _pow

    # a length that is no multiple of the SIMD width: threads' shares end in partial vectors
    x = torch.rand(123_457, 3, generator=torch.Generator().manual_seed(0)) * 0.999 + 1e-6
    e = torch.rand(123_457, 3, generator=torch.Generator().manual_seed(1)) * 40 + 1
    for exponent in (1 / 2.2, e):
        one = _with_threads(1, lambda: _pow(x, exponent))
        assert torch.equal(one, _with_threads(3, lambda: _pow(x, exponent)))
        assert torch.allclose(one, x.pow(exponent), rtol=1e-6, atol=0)  # it is pow
    head = synthetic_head()
    proto = RenderProtocol(views=3, image_size=192, seed=4)
    a = _with_threads(1, lambda: render_views({"s": head}, proto, backend="embree").images)
    b = _with_threads(3, lambda: render_views({"s": head}, proto, backend="embree").images)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- zbuffer backend
def _box_scene():
    """A 160 mm cube in front of a 1.1 m backdrop quad (whose triangles reach far beyond the image)."""
    c = np.array([[x, y, z] for x in (-80, 80) for y in (-80, 80) for z in (-80, 80)], np.float32)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    back = np.array([[-550, -550, -300], [550, -550, -300], [550, 550, -300], [-550, 550, -300]], np.float32)
    verts = np.concatenate([c, back])
    quads.append((8, 9, 10, 11))
    faces = [tri for a, b, cc, d in quads for tri in ((a, b, d), (b, cc, d))]  # quad k: rows 2k, 2k + 1
    return torch.tensor(verts), torch.tensor(faces, dtype=torch.int64)


def test_zbuffer_renders_large_triangles_like_embree():
    from mriface.render import Cameras

    verts, faces = _box_scene()
    ang = np.radians([20.0, -35.0, 5.0])
    Rs, Ts = [], []
    for a in ang:  # cameras on a circle in the x-z plane, looking at the origin, +z up in world -> image up
        eye = 260 * np.array([np.sin(a), 0.3, np.cos(a)])
        zax = -eye / np.linalg.norm(eye)
        xax = np.cross([0, 1, 0], zax); xax /= np.linalg.norm(xax)
        yax = np.cross(zax, xax)
        R = np.stack([xax, yax, zax], 1)
        Rs.append(R); Ts.append(-eye @ R)
    cams = Cameras(torch.tensor(np.array(Rs), dtype=torch.float32), torch.tensor(np.array(Ts), dtype=torch.float32),
                   torch.full((3,), 70.0))
    fe = rasterize(verts, faces, cams, 96, backend="embree", device="cpu")
    fz = rasterize(verts, faces, cams, 96, backend="zbuffer", device="cpu")
    assert (cams.world_to_camera(verts)[..., 2] > 10).all()  # nothing near the camera plane
    px = cams.project(verts[8:], 96)
    assert (px.amax(1) - px.amin(1) > 96).all()  # backdrop triangles span more than the image
    assert fe.mask.float().mean() > 0.5 and (fe.pix_to_face >= 12).any()
    assert (fe.pix_to_face < 12).float().mean() > 0.1  # the cube is seen
    # pixel centres on a shared edge (the quads' diagonals) may go to either triangle: compare visible quads
    same_quad = (fe.pix_to_face.clamp(min=-2) // 2) == (fz.pix_to_face.clamp(min=-2) // 2)
    assert same_quad.float().mean() >= 0.999
    both = fe.mask & fz.mask
    assert torch.allclose(fe.depth[both], fz.depth[both], rtol=1e-4, atol=1e-2)


def test_zbuffer_batches_several_subjects_like_embree_renders_them_one_by_one():
    heads = _three_heads()
    a = heads["a"]
    prot = RenderProtocol(views=2, image_size=40, seed=2)
    emb = render_views(heads, prot, backend="embree", device="cpu")
    zb = render_views(heads, prot, backend="zbuffer", device="cpu", batch_images=4)  # 2 subjects per call
    assert ((emb.images - zb.images).abs().amax(-1) <= 2 / 255).float().mean() >= 0.995
    # small chunks give exactly the same fragments as one big chunk
    cams, _, _ = _fixed_scene(a.frame, n=2, dtype=torch.float32)
    v, f = torch.tensor(a.verts), torch.tensor(a.faces)
    big = rasterize(v, f, cams, 48, backend="zbuffer", device="cpu")
    small = rasterize(v, f, cams, 48, backend="zbuffer", device="cpu", max_candidates=64)
    assert torch.equal(big.pix_to_face, small.pix_to_face) and torch.equal(big.depth, small.depth)


def test_auto_backend_is_zbuffer_on_cuda_and_embree_on_the_cpu():
    from mriface.render import resolve_backend

    assert resolve_backend("auto", torch.device("cuda")) == "zbuffer"
    assert resolve_backend("auto", torch.device("cpu")) == "embree"
    assert resolve_backend("zbuffer", torch.device("cpu")) == "zbuffer"


@pytest.mark.gpu
def test_zbuffer_on_cuda_equals_zbuffer_on_cpu_and_agrees_with_pytorch3d(small_head):
    prot = RenderProtocol(views=4, image_size=128, seed=3)
    a = render_views([small_head], prot, backend="zbuffer", device="cpu").images
    b = render_views([small_head], prot, backend="zbuffer", device="cuda").images
    c = render_views([small_head], prot, backend="pytorch3d", device="cuda").images
    assert ((a - b).abs().amax(-1) <= 2 / 255).float().mean() >= 0.999
    assert ((b - c).abs().amax(-1) <= 2 / 255).float().mean() >= 0.99
    v, f = torch.tensor(small_head.verts), torch.tensor(small_head.faces)
    cams = look_at_face(small_head.frame, [-20, 0, 20], 5, 0, 575, 27)
    fc = rasterize(v, f, cams, 256, backend="zbuffer", device="cpu")
    fg = rasterize(v, f, cams, 256, backend="zbuffer", device="cuda")
    fp = rasterize(v, f, cams, 256, backend="pytorch3d", device="cuda")
    assert fc.mask.float().mean() > 0.1
    assert (fc.pix_to_face == fg.pix_to_face.cpu()).float().mean() >= 0.999
    assert (fg.pix_to_face == fp.pix_to_face).float().mean() >= 0.99


def test_zbuffer_drops_triangles_reaching_the_near_plane_and_keeps_the_rest():
    from mriface.render import Cameras

    cams = Cameras(torch.eye(3)[None], torch.zeros(1, 3), torch.tensor([60.0]))  # at the origin, looking along +z
    verts = torch.tensor([[-50, -50, 100], [50, -50, 100], [0, 50, 100],  # in front: kept
                          [-50, 10, 0.5], [50, 10, 200], [0, 60, 200]], dtype=torch.float32)  # crosses z = znear
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    fz = rasterize(verts, faces, cams, 32, backend="zbuffer", device="cpu")
    fe = rasterize(verts[:3], faces[:1], cams, 32, backend="embree", device="cpu")
    assert fe.mask.float().mean() > 0.2
    assert (rasterize(verts, faces, cams, 32, backend="embree", device="cpu").pix_to_face == 1).sum() > 20  # visible
    assert torch.equal(fz.pix_to_face, fe.pix_to_face)  # exactly the front triangle, nothing of the other
    assert torch.allclose(fz.depth[fz.mask], torch.full_like(fz.depth[fz.mask], 100.0), atol=1e-3)


# ----------------------------------------------------------------------------- the backend contract
def test_registry_lists_the_built_in_backends_and_explains_unknown_names():
    from mriface.render import Backend, get_backend, register_backend, resolve_backend, unregister_backend

    assert available_backends()[:3] == ["zbuffer", "embree", "pytorch3d"]
    for name in available_backends():
        b = get_backend(name)
        assert isinstance(b, Backend) and b.name == name and isinstance(b.batches_meshes, bool)
    assert get_backend("embree").default_device == "cpu" and not get_backend("embree").batches_meshes
    assert get_backend("zbuffer").batches_meshes
    with pytest.raises(BackendError, match="backend='vtk' is not a renderer backend.*'zbuffer', 'embree', 'pytorch3d'"):
        get_backend("vtk")
    with pytest.raises(BackendError, match="'vtk'"):
        resolve_backend("vtk", torch.device("cpu"))
    with pytest.raises(BackendError, match="already a backend"):
        register_backend("zbuffer", lambda: None)
    with pytest.raises(BackendError, match="'auto'"):
        register_backend("auto", lambda: None)
    register_backend("broken", lambda: object())
    try:
        assert "broken" in available_backends()
        with pytest.raises(BackendError, match="lacks name, default_device, batches_meshes, hits"):
            get_backend("broken")
    finally:
        unregister_backend("broken")
    assert "broken" not in available_backends()


class BruteForceBackend:
    """A toy backend from outside mriface: every pixel ray against every triangle, in plain torch.

    O(pixels x triangles): for tiny images of small meshes only.
    """

    name = "brute-force"
    default_device = "cpu"
    batches_meshes = False

    def hits(self, scene, **options):
        from mriface.render import Hits, ray_triangle_hits

        s, parts = scene.image_size, []
        for view in range(scene.n_images):
            m = int(scene.mesh_index[view])
            verts, faces = scene.verts_list[m], scene.faces_list[m]
            pixel = view * s * s + torch.arange(s * s)
            o, d = scene.pixel_rays(pixel)  # (R, 3): camera-space z = 1, so t is the depth
            tri = verts[faces].to(d.dtype)  # (F, 3, 3)
            e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
            p = torch.linalg.cross(d[:, None], e2[None].expand(len(d), -1, -1))
            det = (e1[None] * p).sum(-1)
            t0 = o[:, None] - tri[None, :, 0]
            u = (t0 * p).sum(-1) / det
            q = torch.linalg.cross(t0, e1[None].expand(len(d), -1, -1))
            v = (d[:, None] * q).sum(-1) / det
            t = (e2[None] * q).sum(-1) / det
            inside = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
            depth, face = torch.where(inside, t, torch.inf).min(dim=1)
            hit = torch.isfinite(depth)
            bary, depth = ray_triangle_hits(verts.to(d.dtype), faces, face[hit], o[hit], d[hit])
            parts.append((pixel[hit], face[hit] + scene.face_offsets[m], bary, depth))
        return Hits(*(torch.cat([p[k] for p in parts]) for k in range(4)), scene.n_images, s)


def test_a_backend_defined_outside_mriface_plugs_in_and_renders_like_zbuffer():
    from mriface.render import get_backend, register_backend, unregister_backend

    heads = {"a": synthetic_head(12, 16), "b": synthetic_head(10, 14, nose=False)}
    prot = RenderProtocol(views=2, image_size=24, seed=4, distance_mm=(300, 320), fov_deg=(40, 45))
    register_backend("brute-force", BruteForceBackend)
    try:
        assert "brute-force" in available_backends() and get_backend("brute-force").name == "brute-force"
        toy = render_views(heads, prot, backend="brute-force")  # device auto -> its default, the CPU
        cams = toy.cameras[:2]
        v, f = torch.tensor(heads["a"].verts), torch.tensor(heads["a"].faces)
        frags_toy = rasterize(v, f, cams, 24, backend="brute-force")
    finally:
        unregister_backend("brute-force")
    ref = render_views(heads, prot, backend="zbuffer", device="cpu")
    frags_ref = rasterize(v, f, cams, 24, backend="zbuffer", device="cpu")
    assert toy.subjects == ref.subjects and toy.images.shape == (4, 24, 24, 3)
    covered = (ref.images - torch.tensor(prot.background)).abs().amax(-1) > 1e-6
    assert covered.float().mean() > 0.2
    # pixel centres on an edge shared by two triangles may go to either; all others are the same pixel for pixel
    same_face = frags_toy.pix_to_face == frags_ref.pix_to_face
    assert same_face.float().mean() >= 0.98 and torch.equal(frags_toy.mask, frags_ref.mask)
    assert torch.allclose(frags_toy.bary[same_face], frags_ref.bary[same_face], atol=1e-6)
    assert ((toy.images - ref.images).abs().amax(-1) <= 1e-5).float().mean() >= 0.98


def test_hits_and_fragments_convert_both_ways_without_changing_a_value():
    from mriface.render import Hits, fragments_to_hits, get_backend, hits_to_fragments
    from mriface.render.rasterize import make_scene

    head = synthetic_head(24, 32)
    cams, lights, mat = _fixed_scene(head.frame, n=2, dtype=torch.float32)
    v, f = torch.tensor(head.verts), torch.tensor(head.faces)
    hits = get_backend("zbuffer").hits(make_scene(v, f, cams, 40))
    assert isinstance(hits, Hits) and len(hits) > 500 and bool((hits.pixel[1:] > hits.pixel[:-1]).all())
    frags = hits_to_fragments(hits)
    assert frags.pix_to_face.shape == (2, 40, 40) and int(frags.mask.sum()) == len(hits)
    assert (frags.depth[~frags.mask] == -1).all() and (frags.bary[~frags.mask] == 0).all()
    back = fragments_to_hits(frags)
    for name in ("pixel", "face", "bary", "depth"):
        assert torch.equal(getattr(back, name), getattr(hits, name)), name
    # the shader takes either, with the same images
    assert torch.equal(shade(hits, v, f, None, cams, lights, mat), shade(frags, v, f, None, cams, lights, mat))


def test_embree_gradient_path_keeps_pixel_order_with_several_meshes():
    a, b = synthetic_head(24, 32), synthetic_head(20, 28, nose=False)
    cams = look_at_face(a.frame, [-10, 0, 10], 0, 0, 420, 40, dtype=torch.float64)
    vs = [torch.tensor(a.verts, dtype=torch.float64, requires_grad=True), torch.tensor(b.verts, dtype=torch.float64)]
    fs = [torch.tensor(a.faces), torch.tensor(b.faces)]
    index = torch.tensor([1, 0, 1])
    plain = rasterize([x.detach() for x in vs], fs, cams, 32, backend="embree", mesh_index=index, device="cpu")
    grad = rasterize(vs, fs, cams, 32, backend="embree", mesh_index=index, device="cpu")
    assert grad.bary.dtype == torch.float64 and grad.bary.requires_grad
    assert torch.equal(plain.pix_to_face, grad.pix_to_face) and plain.mask.float().mean() > 0.2
    assert torch.allclose(plain.bary.double(), grad.bary, atol=1e-4)  # Embree traces in float32
    assert torch.allclose(plain.depth.double(), grad.depth, atol=1e-3)
    grad.depth[1].sum().backward()  # view 1 sees mesh 0
    assert vs[0].grad.abs().sum() > 0


def test_cameras_lights_and_material_share_one_batch_base():
    from mriface.render import Cameras, TensorBatch

    fr = synthetic_head().frame
    c1, c2 = look_at_face(fr, [0, 10], 0, 0, 500, 30), look_at_face(fr, [20], 5, 0, 450, 28)
    both = Cameras.cat([c1, c2])
    assert isinstance(both, TensorBatch) and isinstance(both, Cameras) and len(both) == 3
    assert torch.equal(both.R[2], c2.R[0]) and torch.equal(both.fov_deg, torch.tensor([30.0, 30.0, 28.0]))
    assert len(both[1]) == 1 and torch.equal(both[-1].T, c2.T) and len(both[torch.tensor([0, 2])]) == 2
    assert both.to("cpu", torch.float64).R.dtype == torch.float64 and both.znear == c1.znear
    lights = Lights(torch.eye(3), torch.ones(3, 3), torch.zeros(3, 3))
    mat = Material(torch.ones(2, 3), torch.zeros(2), torch.full((2,), 5.0))
    assert len(Lights.cat([lights, lights[:1]])) == 4 and torch.equal(Material.cat([mat, mat]).shininess, torch.full((4,), 5.0))
    assert torch.equal(lights[1].direction, torch.tensor([[0.0, 1.0, 0.0]]))
    import dataclasses as dc

    with pytest.raises(MRIFaceError, match="znear"):
        Cameras.cat([c1, dc.replace(c2, znear=5.0)])


def test_command_line_help_lists_the_registered_backends(capsys):
    from mriface.cli import main

    with pytest.raises(SystemExit):
        main(["render", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in available_backends())


def test_the_adding_a_backend_example_in_the_docs_runs():
    import doctest
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "render.md"
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
    assert "logged-zbuffer" not in available_backends()  # the example cleans up after itself
