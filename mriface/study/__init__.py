"""The study, end to end: scans and probes in, ranks and a report out.

``run_study`` chains every stage for a cohort::

    manifest / BIDS ─► scans ─► surfaces ─► gallery renders ─► aligned faces ─► embeddings ─┐
    photographs, or renders of probe scans, of another protocol or of transformed scans ─► embeddings ─┴► match ─► tables, report

One job per module:

=====================================  ==================================================
:mod:`~mriface.study.run`              :func:`run_study`, the protocol step by step
:mod:`~mriface.study.probes`           the probe sources, incl. :class:`TransformProbes` (defacing hook)
:mod:`~mriface.study.stages`           :class:`Pipeline`; one scan / one participant's photographs
:mod:`~mriface.study.cache`            cache keys, layout, atomic entries
:mod:`~mriface.study.outputs`          CSV tables, ``summary.json``, the report's data
:mod:`~mriface.study.progress`         log file, progress bars, counts of computed and cached work
=====================================  ==================================================

Work is cached per subject under ``<out>/cache/`` (or ``cache_dir``): the
surface of each scan, and for each (scan, render protocol) the render
parameters, detection results and embeddings. A cache entry's name carries a
hash of everything its content depends on: the scan file's bytes (SHA-256;
a volume's or a mesh's), the render protocol, the renderer backend, the face
model's identity (its weights' SHA-256), a probe transform's code, and the
source of the stages. So a rerun, or a run after one was killed, recomputes
only what is missing, and a changed option or a changed file misses the cache
instead of reusing stale work. Every file is written atomically; an entry's
JSON sidecar is written last and marks it complete. The device is not part
of the key: CPU and CUDA give the same results to within floating-point
rounding.

Failures are results: a scan that cannot be read or shows no face in any
render, a photograph with no face, a bad manifest row, a transform that
raised — each is logged as one line, counted in ``summary.json`` and listed
in the report, and the study goes on with everything else.
"""

from __future__ import annotations

from .cache import CACHE_VERSION
from .outputs import StudyResult
from .probes import PROBE_MODES, OtherProtocol, Photographs, ProbeScans, ProbeSource, TransformProbes
from .run import run_study
from .stages import PhotoResult, Pipeline, ScanResult, process_photos, process_scan

__all__ = ["run_study", "StudyResult", "ScanResult", "PhotoResult", "Pipeline", "process_scan", "process_photos",
           "ProbeSource", "Photographs", "ProbeScans", "OtherProtocol", "TransformProbes", "PROBE_MODES",
           "CACHE_VERSION"]
