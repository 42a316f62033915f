"""The defacing contract: :class:`DefaceResult`, the method registry, and the shared steps.

A method is a function ``fn(volume, context, **options) -> numpy.ndarray``
returning the new voxel array (the scan's grid, float32) and, optionally,
the region it meant to change. :func:`run_method` wraps it with what every
method needs: the template registered to the scan (:class:`DefaceContext`),
the checks for inputs that cannot be defaced, and brain protection: after
the method ran, every voxel inside the brain-protection mask is put back to
its input value, and the counts say how many the method tried to change
there (``blocked_in_brain``) and how many differ now (``changed_in_brain``,
always 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import MRIFaceError
from ..volume import Volume
from ._register import Registration, coarse, head_mask, register_affine, warp_grid, warp_to
from .templates import Template, load_template

__all__ = [
    "DefaceError",
    "RegistrationError",
    "AlreadyDefacedError",
    "UnsupportedScanError",
    "DefaceContext",
    "DefaceResult",
    "DefaceMethod",
    "register_method",
    "get_method",
    "available_methods",
    "prepare",
    "run_method",
]


class DefaceError(MRIFaceError):
    """A scan cannot be defaced (the message names the scan and what to do)."""


class RegistrationError(DefaceError):
    """The average head could not be registered to the scan."""


class AlreadyDefacedError(DefaceError):
    """The scan's face region holds (almost) no tissue: it looks defaced already."""


class UnsupportedScanError(DefaceError):
    """A scan the templates do not fit (CT, not a head)."""


@dataclass(frozen=True, eq=False)
class DefaceContext:
    """What a method gets besides the scan: the template registered to it.

    Attributes
    ----------
    template : Template
        The average head, face region and brain mask (template grid).
    registration : Registration
        ``scan_to_template`` maps the scan's world (RAS+ mm) to the template's.
    face : numpy.ndarray
        bool, scan grid: the template's face region warped onto the scan,
        minus the brain-protection mask.
    brain : numpy.ndarray
        bool, scan grid: the brain-protection mask (template brain warped and
        grown by ``margin_mm``). No method may change a voxel inside it.
    tissue_ratio : float
        Tissue in the scan's face region / tissue the template has there
        (about 1 for a whole face; small for a defaced scan).
    seed : int
        For methods with randomness.
    margin_mm : float
        The margin the brain-protection mask was grown by.
    """

    template: Template
    registration: Registration
    face: np.ndarray
    brain: np.ndarray
    tissue_ratio: float
    seed: int = 0
    margin_mm: float = 4.0

    def template_to_scan(self, data: np.ndarray, scan: Volume, *, order: int = 1,
                         box: "tuple[slice, slice, slice] | None" = None) -> np.ndarray:
        """Resample an array on the template's grid onto the scan's grid (or a box of it)."""
        if box is None:
            return warp_to(data, self.template.head.affine, self.registration.scan_to_template, scan, order=order)
        starts = np.array([b.start for b in box], float)
        aff = scan.affine.copy()
        aff[:3, 3] = scan.affine[:3, :3] @ starts + scan.affine[:3, 3]
        return warp_grid(data, self.template.head.affine, self.registration.scan_to_template,
                         tuple(b.stop - b.start for b in box), aff, order=order)


@dataclass(frozen=True, eq=False)
class DefaceResult:
    """The outcome of defacing one scan.

    Attributes
    ----------
    volume : Volume
        The defaced scan (same grid, affine and modality as the input).
    method : str
        The method's registry name.
    face_mask : numpy.ndarray
        bool (X, Y, Z): the region the method changed (its target region).
    brain_mask : numpy.ndarray
        bool (X, Y, Z): the brain-protection mask.
    changed_in_brain : int
        Voxels inside ``brain_mask`` whose value differs from the input (0).
    changed_outside_brain : int
        Voxels outside it whose value differs from the input.
    blocked_in_brain : int
        Voxels inside the mask the method tried to change (put back).
    options : dict
        The options the method ran with (JSON-able).
    registration : Registration or None
    tissue_ratio : float
        See :class:`DefaceContext`.
    seconds : float
        Wall time, registration included.
    info : dict
        What the method itself reports (JSON-able; e.g. ``adversarial``'s largest
        displacement and similarities), empty for most methods.
    """

    volume: Volume
    method: str
    face_mask: np.ndarray
    brain_mask: np.ndarray
    changed_in_brain: int
    changed_outside_brain: int
    blocked_in_brain: int
    options: dict = field(default_factory=dict)
    registration: "Registration | None" = None
    tissue_ratio: float = float("nan")
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able facts for sidecars and tables."""
        reg = self.registration
        return {
            "method": self.method,
            "options": self.options,
            "voxels_changed_inside_brain_mask": self.changed_in_brain,
            "voxels_changed_outside_brain_mask": self.changed_outside_brain,
            "voxels_kept_by_brain_protection": self.blocked_in_brain,
            "brain_mask_voxels": int(self.brain_mask.sum()),
            "face_region_voxels": int(self.face_mask.sum()),
            "face_tissue_ratio": round(float(self.tissue_ratio), 4),
            "registration": None if reg is None else {
                "scan_to_template": np.round(reg.scan_to_template, 6).tolist(),
                "head_overlap_dice": round(reg.overlap, 4),
                "mattes_mi": round(reg.metric, 4),
            },
            "seconds": round(self.seconds, 3),
            **({"method_info": self.info} if self.info else {}),
        }


@dataclass(frozen=True)
class DefaceMethod:
    """A registered defacing method; calling it defaces a volume.

    ``get_method("mask")(volume, **options) -> DefaceResult``.
    """

    name: str
    fn: Callable
    description: str = ""

    def __call__(self, volume: Volume, **options) -> DefaceResult:
        return run_method(self, volume, **options)


_METHODS: dict[str, DefaceMethod] = {}


def register_method(name: str, fn: Callable, *, description: str = "", replace: bool = False) -> DefaceMethod:
    """Register a defacing method under ``name``.

    Parameters
    ----------
    name : str
        Registry key (``mriface deface --method NAME``).
    fn : callable
        ``fn(volume, context, **options) -> numpy.ndarray`` (new voxel
        array, scan grid) or ``-> (array, region)`` with ``region`` the bool
        mask it targeted. It must not modify ``volume.data``. Brain
        protection is applied after it, whatever it returns.
    description : str
        One line for listings and sidecars.
    replace : bool
        Allow replacing an existing name.
    """
    if name in _METHODS and not replace:
        raise DefaceError(f"a defacing method named {name!r} is registered already; pass replace=True")
    method = DefaceMethod(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
    _METHODS[name] = method
    return method


def get_method(name: str) -> DefaceMethod:
    """The registered method ``name``; :class:`DefaceError` naming the choices if unknown."""
    try:
        return _METHODS[name]
    except KeyError:
        raise DefaceError(f"unknown defacing method {name!r}: choose one of {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def prepare(volume: Volume, *, template: "Template | str" = "pydeface", margin_mm: float = 4.0,
            seed: int = 0, min_overlap: float = 0.85, min_tissue: float = 0.3) -> DefaceContext:
    """Register the template to ``volume`` and warp its face region and brain mask onto it.

    Parameters
    ----------
    volume : Volume
        An MR head scan (any orientation, voxel size or field of view).
    template : Template or str
        The average head (:func:`~mriface.deface.templates.load_template`).
    margin_mm : float
        The brain-protection mask is the template's brain grown by this much
        (template mm, about the scan's mm), for registration error.
    seed : int
        Registration's sampling seed.
    min_overlap : float
        Below this Dice of the head masks the registration counts as failed.
    min_tissue : float
        Below this share of the template's face tissue the scan counts as
        defaced already.

    Raises
    ------
    UnsupportedScanError
        A CT scan (the templates are T1-weighted MR).
    RegistrationError
        The registered average head does not overlap the scan's head.
    AlreadyDefacedError
        The face region is (nearly) empty.
    """
    name = volume.name
    if volume.modality == "ct":
        raise UnsupportedScanError(
            f"{name}: a CT scan (Hounsfield units); mriface.deface registers a T1-weighted MR "
            "average head and cannot place it on CT. Deface CT with a threshold-based tool, or "
            "pass modality='mr' if this is MR with negative intensities")
    tpl = load_template(template) if isinstance(template, str) else template
    cs = coarse(volume, 4.0)
    scan_mask = head_mask(cs)
    try:
        reg = register_affine(volume, tpl.head, seed=seed, scan_mask=scan_mask, template_mask=tpl.coarse_mask)
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for an optimiser that cannot run
        raise RegistrationError(f"{name}: registering the average head failed ({exc}); "
                                "is this a head scan with the whole head in view?") from exc
    det = float(np.linalg.det(reg.scan_to_template[:3, :3]))
    if not (reg.overlap >= min_overlap and 0.4 < det < 2.5):
        raise RegistrationError(
            f"{name}: the average head did not register to this scan (head overlap Dice "
            f"{reg.overlap:.2f} < {min_overlap}, or volume scale {det:.2f} implausible); check that it "
            "is a whole-head MR scan, or deface it with another method")
    # tissue in the face region, on the registration's coarse grid
    T = reg.scan_to_template
    face_c = warp_to(tpl.face.astype(np.uint8), tpl.head.affine, T, cs, order=0) > 0.5
    tmpl_head_c = warp_to(tpl.coarse_mask.astype(np.uint8), tpl.coarse_head.affine, T, cs, order=0) > 0.5
    expected = float((face_c & tmpl_head_c).sum())
    tissue = float((face_c & scan_mask).sum()) / max(expected, 1.0)
    if tissue < min_tissue:
        raise AlreadyDefacedError(
            f"{name}: the face region holds {100 * tissue:.0f}% of the tissue an average face has "
            f"there (< {100 * min_tissue:.0f}%): the scan looks defaced already; nothing to do")
    # one warp for both masks: 1 = face, 2 = brain grown by the margin (nearest neighbour keeps labels)
    labels = np.where(tpl.brain_grown(margin_mm), np.uint8(2), tpl.face.astype(np.uint8))
    warped = warp_to(labels, tpl.head.affine, T, volume, order=0)
    brain = warped > 1.5
    face = (warped > 0.5) & ~brain
    return DefaceContext(template=tpl, registration=reg, face=face, brain=brain, tissue_ratio=tissue, seed=seed,
                         margin_mm=float(margin_mm))


def run_method(method: "DefaceMethod | str", volume: Volume, *, template: "Template | str" = "pydeface",
               margin_mm: float = 4.0, seed: int = 0, context: "DefaceContext | None" = None,
               **options) -> DefaceResult:
    """Deface ``volume`` with ``method`` and enforce brain protection.

    Parameters
    ----------
    method : DefaceMethod or str
    volume : Volume
    template, margin_mm, seed
        Passed to :func:`prepare` (ignored when ``context`` is given).
    context : DefaceContext, optional
        A context from :func:`prepare` for this volume, to deface one scan with several methods.
    **options
        The method's own options.

    Returns
    -------
    DefaceResult
    """
    t0 = time.perf_counter()
    m = get_method(method) if isinstance(method, str) else method
    ctx = context if context is not None else prepare(volume, template=template, margin_mm=margin_mm, seed=seed)
    out = m.fn(volume, ctx, **options)
    region, info = ctx.face, {}
    if isinstance(out, tuple):  # (array, region) or (array, region, info)
        out, region, *rest = out
        info = dict(rest[0]) if rest else {}
    out = np.asarray(out, dtype=np.float32)
    if out.shape != volume.shape:
        raise DefaceError(f"method {m.name!r} returned shape {out.shape} for {volume.name} of shape {volume.shape}")
    if out is volume.data or np.shares_memory(out, volume.data):
        out = out.copy()
    brain = ctx.brain
    blocked = int((out[brain] != volume.data[brain]).sum())
    out[brain] = volume.data[brain]  # brain protection: the method's output never reaches the brain
    changed = out != volume.data
    result_vol = Volume(data=out, affine=volume.affine.copy(), modality=volume.modality, path=volume.path)
    opts = {"template": ctx.template.name, "margin_mm": ctx.margin_mm, "seed": ctx.seed, **options}
    return DefaceResult(
        volume=result_vol, method=m.name, face_mask=np.asarray(region, bool), brain_mask=brain,
        changed_in_brain=int(changed[brain].sum()), changed_outside_brain=int(changed[~brain].sum()),
        blocked_in_brain=blocked, options=opts, registration=ctx.registration,
        tissue_ratio=ctx.tissue_ratio, seconds=time.perf_counter() - t0, info=info)
