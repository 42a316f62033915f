"""The average head, its face region and a brain mask in its space.

All three come from files that ship in packages on the index, fetched with
:func:`mriface.datasets.fetch` (pinned by SHA-256, cached):

* ``"pydeface"``: pydeface 2.1.0's average head ``mean_reg2mean.nii.gz`` (1 mm)
  and ``"pydeface-facemask"``, its face mask in the same grid (0 on the face);
* ``"mni-t1"``, ``"mni-gm"``, ``"mni-wm"``: nilearn 0.14.1's ICBM152 2009a
  skull-stripped T1 and grey/white-matter probability maps (1 mm).

The brain mask is grey + white matter >= 50% with its holes (ventricles)
filled, carried into the average head's space by one affine transform
(:data:`PYDEFACE_TO_MNI`). That transform was found once by registering the
average head onto the skull-stripped T1 with the metric counted only inside
the brain (:func:`derive_brain_transform`; its output was checked by eye on
slices of the average head and is pinned here, because Mattes mutual
information over a skull-stripped image has a second minimum on the skull
that a rerun with other thread timings can fall into. The tests check the
pinned mask's volume and that it stays clear of the scalp).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..volume import Volume, load_volume
from ._register import register_affine, warp_to, coarse

__all__ = ["Template", "load_template", "derive_brain_transform", "PYDEFACE_TO_MNI", "TEMPLATES"]

#: pydeface average head world (RAS+ mm) -> ICBM152 2009a world, from :func:`derive_brain_transform`
PYDEFACE_TO_MNI = np.array([
    [1.1474, -0.0758, -0.0300, 6.1284],
    [0.0750, 1.1229, 0.1515, -16.3793],
    [0.0081, -0.1456, 1.2325, 5.2983],
    [0.0, 0.0, 0.0, 1.0],
])

#: the templates :func:`load_template` knows: the average head with pydeface's face mask
#: extended up over the eyes and brows (default), or with pydeface's mask as shipped
TEMPLATES = ("pydeface", "pydeface-facemask")

#: top of the band in front of the brain added to the face region (MNI z, mm): about 3 cm above the orbits' roof
BROW_TOP_MNI_Z = 30.0


def _front_band(head: Volume, brain: np.ndarray, face: np.ndarray, margin_mm: float = 4.0,
                behind_mm: float = 20.0) -> np.ndarray:
    """Voxels in front of the (grown) brain and below :data:`BROW_TOP_MNI_Z`: eyes, brows, lower forehead.

    pydeface's mask leaves the eyes and brows, and MTCNN finds a face in
    renders of heads defaced with it alone. For every left-right / up-down
    column of the template grid that meets the brain, everything anterior to
    the brain's front (plus ``margin_mm``) is added; columns that miss the
    brain are left alone (the sides of the head, the ears). Nothing deeper
    than ``behind_mm`` behind the back of pydeface's face region is added
    (under the frontal lobe the brain's front is the brainstem: the sinuses
    and the skull base stay).
    """
    from scipy import ndimage as ndi

    z = head.zooms
    grown = ndi.binary_dilation(brain, iterations=max(1, int(round(margin_mm / float(z.min())))))
    ny = brain.shape[1]
    has = grown.any(axis=1)  # (X, Z)
    front = np.where(has, ny - 1 - np.argmax(grown[:, ::-1, :], axis=1), ny)  # last brain y index
    yy = np.arange(ny)[None, :, None]
    deepest = np.argwhere(face.any(axis=(0, 2)))[0, 0] - behind_mm / float(z[1])
    band = yy > np.maximum(front, deepest)[:, None, :]
    # world z of every voxel (the template's axes are close to the world's)
    kk = np.arange(brain.shape[2])
    zw = head.affine[2, 2] * kk + head.affine[2, 3] + head.affine[2, 1] * (ny / 2)
    mni_to_head = np.linalg.inv(PYDEFACE_TO_MNI)
    top = (mni_to_head @ np.array([0.0, 60.0, BROW_TOP_MNI_Z, 1.0]))[2]
    return band & (zw < top)[None, None, :]


@dataclass(frozen=True, eq=False)
class Template:
    """An average head with a face region and a brain mask on its grid.

    Attributes
    ----------
    name : str
        ``"pydeface"``.
    head : Volume
        The average head (RAS+, mm).
    face : numpy.ndarray
        bool, ``head.shape``: the face region to deface (pydeface's mask == 0).
    brain : numpy.ndarray
        bool, ``head.shape``: the brain (ICBM152 grey + white matter, filled).
    coarse_head, coarse_mask : Volume, numpy.ndarray
        The head block-averaged to 4 mm and its head mask (registration input).
    face_direction : numpy.ndarray
        (3,) unit vector, template world: from the brain's centroid to the
        centroid of the face's tissue (which way "the face" lies).
    sources : dict
        Sample key -> SHA-256 of every file used, for sidecars.
    """

    name: str
    head: Volume
    face: np.ndarray
    brain: np.ndarray
    face_direction: np.ndarray
    coarse_head: Volume
    coarse_mask: np.ndarray
    sources: dict = field(default_factory=dict)

    def brain_grown(self, margin_mm: float) -> np.ndarray:
        """The brain mask grown by ``margin_mm`` (template mm), computed once per margin."""
        return _grown(self, float(margin_mm))


def _brain_mni() -> Volume:
    from scipy import ndimage as ndi

    from .. import datasets

    gm = load_volume(datasets.fetch("mni-gm"))
    wm = load_volume(datasets.fetch("mni-wm"))
    # the maps are probabilities scaled to 0..255
    brain = (gm.data + wm.data) >= 127.5
    brain = ndi.binary_fill_holes(ndi.binary_closing(brain, iterations=3))
    return Volume(brain.astype(np.float32), gm.affine, "mr")


def derive_brain_transform(*, seed: int = 0) -> np.ndarray:
    """Register pydeface's average head onto the ICBM152 T1 brain; return the 4x4 head -> MNI map.

    The MNI T1 is skull-stripped, so the metric counts only samples inside
    its brain mask (SimpleITK's fixed-image mask); similarity then affine at
    2 mm. :data:`PYDEFACE_TO_MNI` holds the result.
    """
    from .. import datasets

    t1 = load_volume(datasets.fetch("mni-t1"))
    head = load_volume(datasets.fetch("pydeface"))
    mask = coarse(_brain_mni(), 2.0).data > 0.5
    reg = register_affine(t1, head, voxel_mm=2.0, scan_mask=mask, scan_only_mask=True,
                          iterations=200, samples=60_000, seed=seed)
    return np.linalg.inv(reg.scan_to_template)


def load_template(name: str = "pydeface") -> Template:
    """Load a template (average head, face region, brain mask) from the cached samples.

    Parameters
    ----------
    name : str
        One of :data:`TEMPLATES`.

    Returns
    -------
    Template
        Treat the arrays as read-only (the object is shared between calls).
    """
    from ..errors import DataUnavailableError

    if name not in TEMPLATES:
        raise DataUnavailableError(f"unknown defacing template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return _load(name)


@lru_cache(maxsize=2)  # pinned, read-only files: one copy per process is enough
def _load(name: str) -> Template:
    from .. import datasets
    from ._register import head_mask

    head = load_volume(datasets.fetch("pydeface"))
    fm = load_volume(datasets.fetch("pydeface-facemask"))
    face = fm.data < 0.5
    brain_mni = _brain_mni()
    brain = warp_to(brain_mni.data, brain_mni.affine, PYDEFACE_TO_MNI, head, order=1) > 0.5
    if name == "pydeface":
        face = face | _front_band(head, brain, face)
    for a in (head, fm, brain_mni):
        a.data.setflags(write=False)
    face.setflags(write=False)
    brain.setflags(write=False)
    ch = coarse(head, 4.0)
    cmask = head_mask(ch)
    tissue = face & (warp_to(cmask.astype(np.uint8), ch.affine, np.eye(4), head, order=0) > 0.5)

    def centroid(mask):
        return np.argwhere(mask).mean(axis=0) @ head.affine[:3, :3].T + head.affine[:3, 3]

    d = centroid(tissue) - centroid(brain)
    sources = {k: datasets.SAMPLES[k].sha256 for k in ("pydeface", "pydeface-facemask", "mni-gm", "mni-wm")}
    tpl = Template(name=name, head=head, face=face, brain=brain, face_direction=d / np.linalg.norm(d),
                   coarse_head=ch, coarse_mask=cmask, sources=sources)
    tpl.brain_grown(4.0)  # the default margin, so that a scan's defacing time excludes this one-off
    return tpl


@lru_cache(maxsize=8)
def _grown(template: Template, margin_mm: float) -> np.ndarray:
    from scipy import ndimage as ndi

    brain = template.brain
    if margin_mm <= 0:
        return brain
    z = template.head.zooms
    pad = np.ceil(margin_mm / z).astype(int) + 1
    idx = np.argwhere(brain)
    lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, brain.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out = brain.copy()
    out[box] = ndi.distance_transform_edt(~brain[box], sampling=z) <= margin_mm
    out.setflags(write=False)
    return out
