"""Defacing methods that run on what pip installs (no FSL, FreeSurfer, AFNI or MATLAB).

``deface(volume, method="mask", **options) -> DefaceResult``; each method is
also ``get_method(name)(volume, **options)``. Built in: ``mask`` (pydeface's
approach), ``plane`` (quickshear's idea), ``blur`` and ``reface``
(mri_reface's idea) and ``adversarial`` (the skin moved a few mm, steered by
the renderer's and a face model's gradients). A user method plugs in with :func:`register_method`.
Every method keeps the brain-protection mask byte-identical and says so
(:attr:`DefaceResult.changed_in_brain`). ``docs/deidentification.md``
describes the methods and what they protect.

Registration is SimpleITK's (similarity, then affine; Mattes mutual
information at 4 mm); the average head is pydeface 2.1.0's, the brain mask
nilearn's ICBM152 2009a (see :mod:`mriface.deface.templates`).
"""

from __future__ import annotations

from ._register import Registration, register_affine
from .core import (
    AlreadyDefacedError,
    DefaceContext,
    DefaceError,
    DefaceMethod,
    DefaceResult,
    RegistrationError,
    UnsupportedScanError,
    available_methods,
    get_method,
    prepare,
    register_method,
    run_method,
)
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from . import adversarial as _adversarial  # noqa: F401  (registers "adversarial")
from .templates import Template, load_template

__all__ = [
    "deface",
    "DefaceResult",
    "DefaceContext",
    "DefaceMethod",
    "DefaceError",
    "RegistrationError",
    "AlreadyDefacedError",
    "UnsupportedScanError",
    "register_method",
    "get_method",
    "available_methods",
    "prepare",
    "run_method",
    "Template",
    "load_template",
    "Registration",
    "register_affine",
]


def deface(volume, method: str = "mask", **options) -> DefaceResult:
    """Deface ``volume`` with the registered ``method``.

    Parameters
    ----------
    volume : Volume
        An MR head scan (:func:`mriface.volume.load_volume`).
    method : str
        ``"mask"``, ``"plane"``, ``"blur"``, ``"reface"`` or a registered name.
    **options
        ``template``, ``margin_mm`` (brain-protection margin, default 4),
        ``seed``, ``context`` (a :func:`prepare` result to reuse), and the
        method's own options.

    Returns
    -------
    DefaceResult
        The defaced volume, the region changed, the brain-protection mask
        and the voxel counts inside and outside it.

    Raises
    ------
    DefaceError
        (and subclasses) naming the scan: CT, failed registration, already defaced.

    Examples
    --------
    >>> from mriface import datasets
    >>> from mriface.volume import load_volume
    >>> vol = load_volume(datasets.fetch("voxface"))  # the 2 mm average head
    >>> result = deface(vol, method="mask")
    >>> result.changed_in_brain, result.changed_outside_brain > 100_000, result.registration.overlap > 0.9
    (0, True, True)
    """
    return run_method(method, volume, **options)
