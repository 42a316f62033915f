"""Synthetic cohort: the face model loads safely, and a small cohort is what `mriface study` reads, reproducibly."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pytest

from mriface import synthetic as S
from mriface.errors import DataUnavailableError

# a cheap cohort: one template, thick slices and CT (small volumes), two small photos each
_CFG = S.CohortConfig(templates=("voxface",), protocols=("t1_1x1x3", "ct"), protocol_weights=(0.5, 0.5),
                      photos=2, photo_size=96)


def _pickle_bytes(obj) -> bytes:
    return pickle.dumps(obj, protocol=4)  # arrays as _reconstruct + raw bytes, like the model file


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_ndarray_unpickler_loads_arrays_and_refuses_any_other_global(tmp_path):
    good = {"u": np.arange(6, dtype=np.float32).reshape(3, 2), "tri": np.array([[0, 1, 2]], np.int32)}
    p = tmp_path / "good.pkl"
    p.write_bytes(_pickle_bytes(good))
    got = S.load_ndarray_pickle(p, hashlib.sha256(p.read_bytes()).hexdigest())
    assert set(got) == {"u", "tri"} and np.array_equal(got["u"], good["u"]) and got["tri"].dtype == np.int32

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(_pickle_bytes({"u": _Evil()}))
    with pytest.raises(DataUnavailableError, match="not allowed"):
        S.load_ndarray_pickle(bad, hashlib.sha256(bad.read_bytes()).hexdigest())
    # the checksum is checked before anything is unpickled
    with pytest.raises(DataUnavailableError, match="SHA-256"):
        S.load_ndarray_pickle(p, "0" * 64)


def test_unpickler_refuses_numpy_globals_other_than_ndarray_reconstruction():
    data = pickle.dumps(np.float64(1.5), protocol=4)  # numpy scalar: numpy.core.multiarray.scalar
    with pytest.raises(pickle.UnpicklingError):
        S._NdarrayUnpickler(io.BytesIO(data)).load()


@pytest.mark.slow
def test_face_model_is_in_mm_ras_and_triangulated():
    m = S.load_face_model()
    assert m.mean.shape == (38365, 3) and m.identity.shape == (40, 38365, 3) and m.expression.shape == (10, 38365, 3)
    lm = m.mean[m.landmarks]
    # RAS+: the subject's right eye (iBUG 36) has the larger x; nose tip in front (+y) of the eyes; brows above the chin
    assert lm[36, 0] > lm[45, 0] + 60
    assert lm[30, 1] > lm[36, 1] + 20 and lm[19, 2] > lm[8, 2] + 100
    # millimetres: outer eye corners ~ 85-100 mm apart
    assert 80 < np.linalg.norm(lm[36] - lm[45]) < 105
    # one connected, oriented sheet covering almost every vertex, normals out of the face
    used = np.zeros(len(m.mean), bool)
    used[m.faces.ravel()] = True
    assert used.mean() > 0.998 and len(m.faces) > 1.9 * len(m.mean)  # 43 vertices inside folds under the nose
    tri = m.mean[m.faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (n[:, 1] > 0).mean() > 0.9
    # one identity sd moves the face by millimetres, not micrometres or metres
    off = np.linalg.norm(m.identity[0], axis=1)
    assert 0.5 < float(np.sqrt((off ** 2).mean())) < 10


@pytest.fixture(scope="module")
def cohort3(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort3")
    return S.synthetic_cohort(3, seed=7, out=out, config=_CFG)


@pytest.mark.slow
def test_cohort_is_what_the_study_reads(cohort3):
    from mriface.inputs import read_manifest, read_photos
    from mriface.surface import extract_head_surface
    from mriface.volume import load_volume

    gallery, probes, problems = read_manifest(cohort3.manifest)
    assert not problems
    assert [s.subject for s in gallery] == list(cohort3.subjects) == ["syn001", "syn002", "syn003"]
    assert len(probes) == 3
    photos, problems = read_photos(cohort3.photos, list(cohort3.subjects))[:2]
    assert not problems
    meta = json.loads(cohort3.params.read_text())
    assert meta["seed"] == 7 and "non-commercial" in meta["licence"] and len(meta["participants"]) == 3
    expected = {s["file"]: s["modality"] for p in meta["participants"] for s in p["sessions"]}
    assert sorted(set(expected.values())) == ["ct", "mr"]  # seed 7 draws both kinds with this config
    for scan in [*gallery, *probes]:
        vol = load_volume(scan.path)
        assert vol.modality == expected[scan.path.relative_to(cohort3.root).as_posix()], scan.path
        surf = extract_head_surface(vol, device="cpu")
        # the face points out of the head, roughly anterior whatever the head's tilt (<= 15 deg pitch)
        assert surf.frame.forward[1] > 0.8, (scan.path, surf.frame.forward)
        assert surf.n_faces > 20_000


def test_a_finished_cohort_is_reused_only_with_the_same_generator_and_arguments(cohort3, tmp_path):
    import shutil

    found = S.finished_cohort(cohort3.root, 3, seed=7, config=_CFG)
    assert found is not None and found.subjects == cohort3.subjects and found.manifest == cohort3.manifest
    assert S.finished_cohort(cohort3.root, 4, seed=7, config=_CFG) is None  # another size
    assert S.finished_cohort(cohort3.root, 3, seed=8, config=_CFG) is None  # another seed
    assert S.finished_cohort(cohort3.root, 3, seed=7) is None  # another configuration
    assert S.finished_cohort(tmp_path / "nothing", 3, seed=7, config=_CFG) is None
    old = tmp_path / "old"  # written by another generator version
    old.mkdir()
    shutil.copy(cohort3.manifest, old / "manifest.csv")
    meta = json.loads(cohort3.params.read_text())
    (old / "cohort.json").write_text(json.dumps({**meta, "generator": "mriface.synthetic 1"}))
    assert S.finished_cohort(old, 3, seed=7, config=_CFG) is None
    (old / "cohort.json").write_text(json.dumps(meta))
    assert S.finished_cohort(old, 3, seed=7, config=_CFG) is not None
    (old / "manifest.csv").unlink()  # unfinished
    assert S.finished_cohort(old, 3, seed=7, config=_CFG) is None


@pytest.mark.slow
def test_same_seed_same_bytes_and_participants_do_not_depend_on_n(cohort3, tmp_path):
    again = S.synthetic_cohort(2, seed=7, out=tmp_path / "again", config=_CFG)
    files = sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file()
                   and p.name not in ("manifest.csv", "cohort.json"))
    assert len(files) == 2 * (2 + _CFG.photos)
    for rel in files:
        assert (again.root / rel).read_bytes() == (cohort3.root / rel).read_bytes(), rel
    # another seed, other people
    a = json.loads(cohort3.params.read_text())["participants"][0]["alpha"]
    other = S._identity(S.load_face_model(), _CFG, 8, 0)["alpha"]
    assert not np.allclose(a, other)


@pytest.mark.slow
def test_photos_show_a_face_on_a_background(cohort3):
    from PIL import Image

    for sid in cohort3.subjects:
        imgs = sorted((cohort3.photos / sid).glob("*.png"))
        assert len(imgs) == _CFG.photos
        im = np.asarray(Image.open(imgs[0]))
        assert im.shape == (96, 96, 3)
        # the face fills the middle, the corners are background of another colour
        centre = im[40:56, 40:56].reshape(-1, 3).mean(0)
        corner = im[:6, :6].reshape(-1, 3).mean(0)
        assert np.abs(centre - corner).max() > 5


def test_resampling_skips_only_air_blocks():
    """The scanner's resampling leaves out blocks that only see air: same result as resampling everything."""
    from scipy import ndimage

    from mriface.synthetic.scans import _occupancy, _resample, _rotation

    rng = np.random.default_rng(0)
    head = np.zeros((90, 100, 80), np.float32)
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in head.shape], indexing="ij"), -1)
    inside = (((g - np.array([45, 50, 40])) / np.array([30, 38, 28])) ** 2).sum(-1) < 1
    head[inside] = rng.uniform(0.5, 1.2, size=int(inside.sum()))
    occ = _occupancy(head)
    assert 0.2 < occ.mean() < 0.95  # some blocks are air, and the head's are kept
    for zooms in ((1.0, 1.0, 1.0), (1.0, 1.0, 3.0), (0.9, 0.9, 2.0)):
        z = np.asarray(zooms)
        mat = np.linalg.inv(_rotation(12.0, -5.0, 7.0) * np.array([1.04, 0.95, 1.0])[None, :]) @ np.diag(z)
        shape = tuple(int(n) for n in np.ceil(np.array(head.shape) * 1.2 / z))
        off0 = np.array(head.shape) / 2 - mat @ (np.array(shape) / 2)
        got = _resample(head, occ, mat, off0, shape, z)
        sub = [max(1, int(round(v))) if v > 1.5 else 1 for v in z]
        offs = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in sub], indexing="ij"), -1).reshape(-1, 3)
        want = sum(ndimage.affine_transform(head, mat, offset=off0 + mat @ o, output_shape=shape, order=1,
                                            mode="constant", cval=0.0, output=np.float32) for o in offs) / len(offs)
        assert got.shape == shape and (want > 0).mean() > 0.1
        np.testing.assert_allclose(got, want, atol=1e-5)
