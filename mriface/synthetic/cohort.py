"""The cohort writer: participants -> NIfTI scans, PNG photographs, manifest and cohort.json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .._io import write_bytes_atomic, write_text_atomic
from ..errors import MRIFaceError
from .config import _PROTOCOLS, Cohort, CohortConfig
from .facemodel import BFM_LICENCE, GENERATOR_VERSION, load_face_model
from .photos import _appearance, _photo_params, _png_bytes, _render_photos
from .scans import _acquire, _face_in_head, _graft, _identity, _nifti_bytes, _occupancy, _rng, _session, _template


# ----------------------------------------------------------------------------- the cohort

def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def subject_id(i: int) -> str:
    """Subject id of participant ``i`` (0-based): ``syn001``, ``syn002``, ..."""
    return f"syn{i + 1:03d}"


def _participant(i: int, seed: int, cfg: CohortConfig, root: Path, sessions: int) -> dict:
    import torch

    # one torch thread: the same float sums (byte-identical photos) for any worker count, and no
    # threads spinning against each other when several workers share the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _make_participant(i, seed, cfg, root, sessions)
    finally:
        torch.set_num_threads(threads)


def _make_participant(i: int, seed: int, cfg: CohortConfig, root: Path, sessions: int) -> dict:
    model = load_face_model()
    ident = _identity(model, cfg, seed, i)
    t = _template(ident["template"])
    face = _face_in_head(model, t, ident)
    head = _graft(t, face, model.faces)
    sid = subject_id(i)
    rec = {"subject": sid, "index": i, **{k: v for k, v in ident.items()},
           "face_scale_to_template": t.face_scale, "sessions": []}
    occ = _occupancy(head)  # where the head is: the same for both sessions
    for s in range(sessions):
        ses = _session(_rng(seed, i, 1 + s), cfg)
        data, affine = _acquire(t, head, face, ident, ses, occ)
        rel = f"scans/{sid}_ses-{s + 1}.nii.gz"
        write_bytes_atomic(root / rel, _nifti_bytes(data, affine))
        rec["sessions"].append({"file": rel, "shape": list(data.shape),
                                "zooms_mm": list(_PROTOCOLS[ses["protocol"]][0]),
                                "modality": _PROTOCOLS[ses["protocol"]][3], **ses})
    if cfg.photos:
        pp = _photo_params(_rng(seed, i, 3), cfg, model.expression.shape[0])
        # the photographed face is the scanned one (same scale per axis), so photo and scan agree
        c = face.mean(0)
        face_photo = (face - c) * np.asarray(ident["head_scale"])[None, :] + c
        app = _appearance(_rng(seed, i, 4))
        rec["appearance"] = app
        imgs = _render_photos(model, face_photo, {**app, "face_scale": t.face_scale}, pp, int(cfg.photo_size))
        for k in range(len(imgs)):
            write_bytes_atomic(root / "photos" / sid / f"{sid}_photo-{k + 1}.png", _png_bytes(imgs[k]))
        rec["photos"] = pp
    return rec


def synthetic_cohort(
    n: int,
    *,
    seed: int = 0,
    out=None,
    config: CohortConfig = CohortConfig(),
    sessions: int = 2,
    workers: int = 1,
    progress: bool = False,
) -> Cohort:
    """Write a synthetic cohort of ``n`` participants that ``mriface study`` reads unchanged.

    Parameters
    ----------
    n : int
        Participants (the reference study: 84).
    seed : int
        Root of every draw. Participant ``i`` depends only on ``seed`` and
        ``i``; the same seed gives byte-identical files.
    out : path-like, optional
        Output folder (default ``./synthetic-cohort``). Existing files of the
        same names are replaced.
    config : CohortConfig
        The ranges participants are drawn from.
    sessions : {1, 2}
        2 writes a second scan per participant (``probe_scan``) for scan-to-scan studies.
    workers : int
        Participants made in parallel processes (files are identical for any value).
    progress : bool
        Show a progress bar.

    Returns
    -------
    Cohort
        Paths of the manifest, photographs and ``cohort.json``.

    Examples
    --------
    >>> from mriface.synthetic import synthetic_cohort
    >>> cohort = synthetic_cohort(3, seed=0, out="cohort3")  # doctest: +SKIP
    >>> # then: mriface study cohort3/manifest.csv --photos cohort3/photos --out study3
    """
    n = int(n)
    if n < 1:
        raise MRIFaceError(f"synthetic_cohort(n={n}): need at least one participant")
    if sessions not in (1, 2):
        raise MRIFaceError(f"synthetic_cohort(sessions={sessions}): give 1 or 2")
    root = Path(out if out is not None else "synthetic-cohort").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    load_face_model()  # fetch once, before any worker starts
    for key in sorted(set(config.templates)):
        _template(key)
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(int(workers), mp_context=mp.get_context("fork")) as pool:
            it = pool.map(_participant, range(n), [seed] * n, [config] * n, [root] * n, [sessions] * n)
            recs = list(_bar(it, n, progress))
    else:
        recs = [_participant(i, seed, config, root, sessions) for i in _bar(range(n), n, progress)]
    lines = ["subject,scan,probe_scan" if sessions == 2 else "subject,scan"]
    for r in recs:
        files = [s["file"] for s in r["sessions"]]
        lines.append(",".join([r["subject"], *files]))
    manifest = write_text_atomic(root / "manifest.csv", "\n".join(lines) + "\n")
    meta = {"generator": f"mriface.synthetic {GENERATOR_VERSION}", "n": n, "seed": int(seed), "sessions": sessions,
            "licence": BFM_LICENCE, "config": asdict(config), "participants": recs}
    params = write_text_atomic(root / "cohort.json", json.dumps(_jsonable(meta), indent=1) + "\n")
    return Cohort(root=root, manifest=manifest, photos=root / "photos", params=params,
                  subjects=tuple(r["subject"] for r in recs))


def finished_cohort(folder, n: int, *, seed: int = 0, config: CohortConfig = CohortConfig(),
                    sessions: int = 2) -> "Cohort | None":
    """The cohort in ``folder`` if :func:`synthetic_cohort` finished it with these arguments, else None.

    ``cohort.json`` (written last) must name this generator version, ``n``,
    ``seed``, ``sessions`` and ``config``; a cohort from another version or
    other settings, or an unfinished one, is not reused.
    """
    root = Path(folder).expanduser()
    meta_path, manifest = root / "cohort.json", root / "manifest.csv"
    try:
        meta = json.loads(meta_path.read_text())
        wanted = {"generator": f"mriface.synthetic {GENERATOR_VERSION}", "n": int(n), "seed": int(seed),
                  "sessions": sessions, "config": json.loads(json.dumps(_jsonable(asdict(config))))}
        if any(meta.get(k) != v for k, v in wanted.items()) or not manifest.is_file():
            return None
        subjects = tuple(p["subject"] for p in meta["participants"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: not a finished cohort
    return Cohort(root=root, manifest=manifest, photos=root / "photos", params=meta_path, subjects=subjects)


def _bar(it, n, progress):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, total=n, unit="participant")
