"""The surface stage's torch engine (issue 11): masks and face frame on the device, checked against numpy.

``engine="torch"`` is the default on CUDA; here it runs on the CPU
(``device="cpu", engine="torch"``) against the numpy engine on the same
inputs. A CUDA twin skips without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from mriface import extract_head_surface, load_volume
from mriface.surface import mesh_topology
from mriface.surface.frame import estimate_face_frame
from mriface.surface.frame_torch import estimate_face_frame_torch
from mriface.surface.masks import _block_factors, _block_mean, _fill_holes, _head_masks, estimate_threshold
from mriface.surface.masks_torch import (
    _block_mean_torch,
    _dilate,
    _erode,
    _fill_holes as _fill_holes_torch,
    _head_masks_torch,
    _label,
    _largest,
    estimate_threshold_torch,
)

from phantoms import head_phantom  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture(scope="module")
def voxface(sample_path):
    return load_volume(sample_path("voxface"))


@pytest.fixture(scope="module")
def voxface_surface(voxface):
    return extract_head_surface(voxface, device="cpu", engine="numpy")


def _blobs(seed: int, shape=(23, 29, 31), frac: float = 0.55) -> np.ndarray:
    """A random mask with many components, holes and tunnels (smoothed noise, thresholded)."""
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), 1.2) > np.quantile(ndi.gaussian_filter(rng.random(shape), 1.2), frac)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label arrays split the voxels into the same groups (label values aside)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_morphology_matches_scipy(seed):
    m = _blobs(seed)
    t = torch.from_numpy(m)
    cap = _blobs(seed + 10, frac=0.3)
    assert np.array_equal(_dilate(t, 3).numpy(), ndi.binary_dilation(m, iterations=3))
    assert np.array_equal(_dilate(t & torch.from_numpy(cap), 4, mask=torch.from_numpy(cap)).numpy(),
                          ndi.binary_dilation(m & cap, iterations=4, mask=cap))
    for border in (0, 1):
        assert np.array_equal(_erode(t, 2, border_value=border).numpy(),
                              ndi.binary_erosion(m, iterations=2, border_value=border))
    assert np.array_equal(_dilate(_erode(t, 1), 1).numpy(), ndi.binary_opening(m, iterations=1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_and_hole_filling_match_scipy(seed):
    m = _blobs(seed)
    t = torch.from_numpy(m)
    lab, n = ndi.label(m)
    assert n > 3  # the fixture has several pieces, or the test shows nothing
    assert _same_partition(_label(t).numpy(), lab)
    for axis in range(3):  # 2D components within slices across `axis`
        st = np.zeros((3, 3, 3), bool)
        sl = [slice(None)] * 3
        sl[axis] = 1
        st[tuple(sl)] = ndi.generate_binary_structure(2, 1)
        assert _same_partition(_label(t, tuple(a for a in range(3) if a != axis)).numpy(), ndi.label(m, st)[0])
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    assert np.array_equal(_largest(t).numpy(), lab == np.argmax(sizes))
    for axis in (None, 0, 1, 2):
        assert np.array_equal(_fill_holes_torch(t, axis).numpy(), _fill_holes(m, axis))


def _mask_check(vol):
    k = _block_factors(vol.zooms, 2.0)
    coarse = _block_mean(vol.data, k)
    coarse_t = _block_mean_torch(torch.from_numpy(np.ascontiguousarray(vol.data, np.float32)), k)
    # the same float32 additions in the same order: the same bits
    assert np.array_equal(coarse_t.numpy(), coarse)
    est = estimate_threshold(vol, _coarse=(coarse, k))
    est_t = estimate_threshold_torch(vol, coarse_t, k)
    span = est.skin - est.air
    for f in ("threshold", "air", "skin"):
        assert abs(getattr(est_t, f) - getattr(est, f)) < 1e-6 * span
    assert est_t.contrast == pytest.approx(est.contrast, rel=1e-5)
    m, mt = _head_masks(vol, est, 2.0, coarse), _head_masks_torch(vol, est, 2.0, coarse_t)
    for name in ("head", "interior", "exterior"):
        # equal on every input tried; allowed: one voxel in 10^5 (a block mean within rounding of a level)
        diff = np.count_nonzero(getattr(mt, name).numpy() != getattr(m, name))
        assert diff <= getattr(m, name).size // 100_000, (name, diff)
    assert (mt.rest is None) == (m.rest is None)


def test_torch_masks_match_numpy_on_voxface(voxface):
    _mask_check(voxface)


def test_torch_masks_match_numpy_on_phantom():
    vol, _ = head_phantom((1.25, 1.25, 2.5))  # block factors (2, 2, 1): a 2.5 mm coarse grid
    _mask_check(vol)


def test_torch_masks_match_numpy_with_a_head_rest():
    """A CT head in a plastic cradle on a table: the torch engine finds the rest too (its check runs on the host)."""
    from phantoms import HeadRest, ct_head_phantom

    vol, _ = ct_head_phantom((1.2, 1.2, 1.5), rest=HeadRest())
    k = _block_factors(vol.zooms, 2.0)
    coarse = _block_mean(vol.data, k)
    est = estimate_threshold(vol, _coarse=(coarse, k))
    m = _head_masks(vol, est, 2.0, coarse)
    mt = _head_masks_torch(vol, est, 2.0, _block_mean_torch(torch.from_numpy(vol.data), k))
    assert m.rest is not None and mt.rest is not None
    assert np.array_equal(mt.rest.rest, m.rest.rest) and np.array_equal(mt.rest.zone, m.rest.zone)
    for name in ("head", "interior", "exterior"):
        assert np.array_equal(getattr(mt, name).numpy(), getattr(m, name)), name


def test_torch_frame_matches_numpy_on_the_same_mesh(voxface_surface):
    s = voxface_surface
    a = estimate_face_frame(s.verts, s.faces)
    b = estimate_face_frame_torch(torch.from_numpy(s.verts), torch.from_numpy(s.faces))
    # the same random draws; brute-force nearest neighbours instead of a k-d tree
    assert np.linalg.norm(a.center - b.center) < 0.5
    for f in ("forward", "up"):
        assert np.degrees(np.arccos(np.clip(getattr(a, f) @ getattr(b, f), -1, 1))) < 0.5


def test_brute_force_nearest_neighbours_match_kdtree():
    """The GPU's nearest-neighbour search (a distance matrix), run on the CPU against scipy's k-d tree."""
    from scipy.spatial import cKDTree

    import mriface.surface.frame_torch as ft

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(3000, 3)) * 60.0
    q = rng.normal(size=(2, 700, 3)) * 60.0
    _, want = cKDTree(pts).query(q.reshape(-1, 3))
    brute = ft._nearest_fn(torch.from_numpy(pts), brute=True)
    got = brute(torch.from_numpy(q)).numpy().reshape(-1)
    # equal but for near ties (float32 distances): then the distances agree to rounding
    d_got = np.linalg.norm(q.reshape(-1, 3) - pts[got], axis=1)
    d_want = np.linalg.norm(q.reshape(-1, 3) - pts[want], axis=1)
    assert np.mean(got == want) > 0.999 and np.allclose(d_got, d_want, atol=1e-3)


def _pieces():
    """A marching-cubes mesh in several pieces: two balls of different size and a speck."""
    from skimage.measure import marching_cubes

    g = np.mgrid[:40, :30, :30].astype(np.float32)
    d = np.minimum.reduce([np.linalg.norm(g - np.array(c, np.float32)[:, None, None, None], axis=0) - r
                           for c, r in (((10, 15, 15), 7.0), ((29, 15, 15), 5.5), ((36, 4, 4), 1.2))])
    v, f, _, _ = marching_cubes(-d, 0.0)
    return v.astype(np.float32), f.astype(np.int64)


def test_mesh_steps_match_numpy():
    from mriface.surface.mesh import _largest_component, _outward, vertex_normals_np
    from mriface.surface.mesh_torch import _largest_component_torch, _outward_torch, vertex_normals_torch_f64

    v, f = _pieces()
    assert mesh_topology(f)["components"] == 3
    want_v, want_f = _largest_component(v, f)
    got_v, got_f = _largest_component_torch(torch.from_numpy(v), torch.from_numpy(f))
    # the same faces and vertices in the same order
    assert np.array_equal(got_v.numpy(), want_v) and np.array_equal(got_f.numpy(), want_f)
    for faces in (want_f, want_f[:, ::-1].copy()):
        assert _outward_torch(torch.from_numpy(want_v), torch.from_numpy(faces)) == _outward(want_v, faces)
    n_np = vertex_normals_np(want_v, want_f)
    n_t = vertex_normals_torch_f64(torch.from_numpy(want_v), torch.from_numpy(want_f)).numpy()
    assert n_t.dtype == np.float32 and np.abs(n_t - n_np).max() < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU twin: the tests above)")
def test_cuda_masks_and_frame_match_numpy(voxface, voxface_surface):
    k = _block_factors(voxface.zooms, 2.0)
    coarse = _block_mean(voxface.data, k)
    coarse_t = _block_mean_torch(torch.from_numpy(np.ascontiguousarray(voxface.data, np.float32)).cuda(), k)
    assert np.array_equal(coarse_t.cpu().numpy(), coarse)
    est = estimate_threshold(voxface, _coarse=(coarse, k))
    m, mt = _head_masks(voxface, est, 2.0, coarse), _head_masks_torch(voxface, est, 2.0, coarse_t)
    assert mt.interior.is_cuda
    for name in ("head", "interior", "exterior"):
        assert np.count_nonzero(getattr(mt, name).cpu().numpy() != getattr(m, name)) <= 10
    s = voxface_surface
    a = estimate_face_frame(s.verts, s.faces)
    b = estimate_face_frame_torch(torch.from_numpy(s.verts).cuda(), torch.from_numpy(s.faces).cuda())
    assert np.linalg.norm(a.center - b.center) < 0.5
    assert a.forward @ b.forward > np.cos(np.deg2rad(0.5))
