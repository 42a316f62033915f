"""Cohort configuration and the returned :class:`Cohort` record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MRIFaceError


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class CohortConfig:
    """The ranges every participant is drawn from (uniform unless stated; mm, degrees).

    Attributes
    ----------
    identity_sd : float
        Identity coefficients are standard normal, truncated at +-2.5, times
        this many standard deviations of the 3DDFA fits' coefficient spread.
        The fits are regularised, so their spread understates people's, and
        FaceNet found photographs of different participants too alike at 1
        (median cosine 0.73 between participants, 0.81 within) and at 2
        (0.66 and 0.82, before the scalp, hair and skin detail of generator
        2). At 2.5 (default) the faces move 4-9 mm rms from the mean face
        (5-95 %; 3-7 mm at 2, 5-11 mm at 3, which looks caricatured at the
        tails); see docs/synthetic.md for the figures.
    feature_mm : float
        SD (mm) of local shape features the model's 40 components do not
        span: smooth bumps (Gaussian, 8-22 mm radius) moving the nose tip and
        bridge, chin, cheekbones, jaw angles, brow ridge, lips and nostril
        wings, paired features mirror-symmetrically (half of it sideways).
    templates : tuple of str
        Average heads (sample keys) a participant's head is drawn from.
    head_scale : (float, float)
        Per-axis scale of the head (and the face on it).
    tilt_deg : (float, float)
        Pitch of the head in the scanner (nodding); roll and yaw get half of it.
    protocols : tuple of str
        Acquisitions drawn per session: ``"t1_1mm"`` (1 mm isotropic),
        ``"t1_1x1x3"`` (3 mm axial slices), ``"flair_1.2mm_sag"`` (1.2 mm,
        sagittal voxel axes), ``"t1_oblique"`` (1 mm, voxel grid turned with
        the head), ``"ct"`` (0.9x0.9x2 mm, Hounsfield-like air and soft tissue).
    protocol_weights : tuple of float
        Relative frequency of each protocol.
    noise : (float, float)
        Noise sd relative to the soft-tissue signal (MR), or HU (CT, x 1000).
    bias : (float, float)
        Peak-to-peak strength of the multiplicative smooth bias field (MR).
    photos : int
        Photographs per participant (the study: 5).
    photo_size : int
        Photograph side, pixels.
    yaw_deg, pitch_deg, roll_deg : (float, float)
        Camera direction relative to the face, as in a casual portrait.
    expression_sd : (float, float)
        Expression strength per photograph, in expression-coefficient sd.
    """

    identity_sd: float = 2.5
    feature_mm: float = 3.0
    templates: tuple = ("pydeface", "voxface")
    head_scale: tuple = (0.93, 1.07)
    tilt_deg: tuple = (-15.0, 15.0)
    protocols: tuple = ("t1_1mm", "t1_1x1x3", "flair_1.2mm_sag", "t1_oblique", "ct")
    protocol_weights: tuple = (0.3, 0.2, 0.2, 0.15, 0.15)
    noise: tuple = (0.01, 0.04)
    bias: tuple = (0.05, 0.3)
    photos: int = 5
    photo_size: int = 256
    yaw_deg: tuple = (-30.0, 30.0)
    pitch_deg: tuple = (-8.0, 12.0)
    roll_deg: tuple = (-8.0, 8.0)
    expression_sd: tuple = (0.3, 1.2)

    def __post_init__(self):
        if len(self.protocols) != len(self.protocol_weights) or not self.protocols:
            raise MRIFaceError("CohortConfig: give one weight per protocol")
        bad = set(self.protocols) - set(_PROTOCOLS)
        if bad:
            raise MRIFaceError(f"CohortConfig: unknown protocols {sorted(bad)}; choose from {sorted(_PROTOCOLS)}")
        if int(self.photos) < 0 or int(self.photo_size) < 32:
            raise MRIFaceError("CohortConfig: photos must be >= 0 and photo_size >= 32")


#: protocol -> (zooms in mm, voxel axis codes, oblique grid, modality)
_PROTOCOLS = {
    "t1_1mm": ((1.0, 1.0, 1.0), "RAS", False, "mr"),
    "t1_1x1x3": ((1.0, 1.0, 3.0), "LAS", False, "mr"),
    "flair_1.2mm_sag": ((1.0, 1.0, 1.2), "PIL", False, "mr"),  # sagittal slices: voxel axes P, I, L
    "t1_oblique": ((1.0, 1.0, 1.0), "RAS", True, "mr"),
    "ct": ((0.9, 0.9, 2.0), "LPS", False, "ct"),
}


@dataclass(frozen=True)
class Cohort:
    """What :func:`synthetic_cohort` wrote.

    Attributes
    ----------
    root : Path
        The output folder.
    manifest : Path
        ``root/manifest.csv``: subject, scan (session 1), probe_scan (session 2).
    photos : Path
        ``root/photos``: one folder of PNGs per subject.
    params : Path
        ``root/cohort.json``: seed, configuration, licence and every participant's parameters.
    subjects : tuple of str
    """

    root: Path
    manifest: Path
    photos: Path
    params: Path
    subjects: tuple = field(default=())
