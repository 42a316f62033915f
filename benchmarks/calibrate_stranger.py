"""Measure the ``adversarial`` method's stranger constants on scans it is not evaluated on.

    python -m benchmarks.calibrate_stranger GALLERY.csv --subjects syn044,syn045,... [--model facenet]
        [--out benchmarks/out/stranger] [--json benchmarks/out/stranger.json]

The adversarial method aims the gap of its check (each check render's own
similarity minus its similarity to the impostor references, the average
heads) at a stranger's: ``-STRANGER_OFFSET + STRANGER_SD * z``
(:func:`mriface.deface.adversarial.stranger_target`). Both constants are
what a study of defaced scans shows, so this script defaces the given
subjects (``--subjects``, with the method's defaults and ``--offset``),
runs the scan-to-scan study with the GALLERY's original scans
(``subject,scan``, paths relative to the CSV) as the gallery, and, per
defaced participant, compares:

- ``own - strangers``: the participant's score for its own original minus
  the mean of its scores for the other gallery subjects (a score: the mean
  over the probe's renders of the best cosine to the subject's renders);
- the check's final gap, from the method's ``info``.

``offset`` is the mean of ``gap - (own - strangers)`` (how far below the
impostor references a stranger's similarity lies, on the check's scale) and
``sd`` the mean spread of a participant's scores across the strangers. A
defaced face's similarity to strangers is not its original's: the edit
lowers it (FaceNet, the synthetic cohort: 0.53 before, 0.44 after), which is
why the constants come from defaced scans. Pick subjects the method is
evaluated on no further (docs/deidentification.md used syn044-syn060 and
evaluates on syn001-syn043).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import machine_info, write_json


def participant_scores(per_probe, model: str) -> "dict[str, dict[str, float]]":
    """participant -> gallery subject -> score (mean over the probe's renders with a face of the best cosine).

    ``per_probe``: the study's ``probes.csv`` rows (one per probe render and gallery subject; a
    one-model study's rows have no ``model`` column).
    """
    sims = collections.defaultdict(lambda: collections.defaultdict(list))
    for row in per_probe:
        if row.get("model", model) == model and str(row["face_found"]) == "True":
            sims[row["participant"]][row["subject"]].append(float(row["similarity"]))
    return {p: {s: float(np.mean(v)) for s, v in subj.items()} for p, subj in sims.items()}


def constants(scores: "dict[str, dict[str, float]]", gaps: "dict[str, float]") -> dict:
    """The offset and sd from the participants' scores and their checks' final gaps (see the module doc)."""
    per = []
    for p, s in sorted(scores.items()):
        if p not in s or p not in gaps or not np.isfinite(gaps[p]):
            continue
        others = np.array([v for k, v in s.items() if k != p])
        per.append({"participant": p, "own": round(s[p], 4), "strangers_mean": round(float(others.mean()), 4),
                    "strangers_sd": round(float(others.std()), 4), "check_gap": gaps[p],
                    "z": round(float((s[p] - others.mean()) / others.std()), 3)})
    d = np.array([q["check_gap"] - (q["own"] - q["strangers_mean"]) for q in per])
    return {"participants": len(per), "offset": round(float(-d.mean()), 4),
            "offset_se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4) if len(d) > 1 else None,
            "sd": round(float(np.mean([q["strangers_sd"] for q in per])), 4),
            "z_mean": round(float(np.mean([q["z"] for q in per])), 3), "per_participant": per}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gallery", help="CSV with subject,scan of the original scans (the study's gallery)")
    ap.add_argument("--subjects", required=True, help="comma-separated subjects to deface (not the evaluation's)")
    ap.add_argument("--model", default="facenet")
    ap.add_argument("--offset", type=float, default=None,
                    help="the offset the defacing aims with (default: the method's)")
    ap.add_argument("--out", default="benchmarks/out/stranger", help="folder for the study and its cache")
    ap.add_argument("--json", default="benchmarks/out/stranger.json")
    a = ap.parse_args(argv)

    from mriface.deface import prepare, run_method
    from mriface.deface.evaluate import _defaced_probes
    from mriface.inputs import load_inputs
    from mriface.study import Pipeline, run_study
    from mriface.volume import load_volume

    inputs = load_inputs(a.gallery)
    want = [s for s in a.subjects.split(",") if s]
    scans = [s for s in inputs.gallery if s.subject in want]
    if len(scans) < 2:
        raise SystemExit(f"--subjects: {len(scans)} of {want} are in {a.gallery}; give two or more of its subjects")
    pipe = Pipeline(device="cpu", backend="auto", model=a.model)
    opts = {"model": a.model, "device": "cpu"} | ({} if a.offset is None else {"stranger_offset": a.offset})
    t0, c0 = time.perf_counter(), time.process_time()
    vols, gaps, infos = {}, {}, {}
    for i, scan in enumerate(scans):
        vol = load_volume(scan.path)
        res = run_method("adversarial", vol, context=prepare(vol), **opts)
        vols[str(scan.path)] = res.volume
        gaps[scan.subject] = float(res.info["check"].get("gap", float("nan")))
        infos[scan.subject] = {k: res.info.get(k) for k in ("target_gap", "stranger_z", "target_met", "scale_backs",
                                                               "max_displacement_mm", "cpu_seconds")}
        print(f"{i + 1}/{len(scans)} {scan.subject}: check gap {gaps[scan.subject]:.3f} "
              f"(target {res.info['target_gap']:.3f}), {time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(a.out)
    study = out / "scan-to-scan"
    run_study(inputs, out=study, probes=_defaced_probes("adversarial", vols, pipe, set(gaps)), views=10, size=512,
              seed=0, pipeline=pipe, cache_dir=out / "cache", progress=False, executor="sequential",
              random_weights=False, title="stranger calibration")
    with open(study / "probes.csv", newline="") as f:
        result = constants(participant_scores(csv.DictReader(f), a.model), gaps)
    result.update({"machine": machine_info(torch.device("cpu")), "gallery": Path(a.gallery).name, "model": a.model,
                   "subjects": want, "defacing": infos, "wall_s": round(time.perf_counter() - t0, 1),
                   "cpu_s": round(time.process_time() - c0, 1)})
    print(f"{'participants':>12} {'offset':>8} {'(se)':>7} {'sd':>7} {'z mean':>7}")
    print(f"{result['participants']:>12} {result['offset']:>8.4f} {result['offset_se'] or float('nan'):>7.4f} "
          f"{result['sd']:>7.4f} {result['z_mean']:>7.3f}")
    write_json(result, a.json)
    print(json.dumps({k: result[k] for k in ("offset", "sd", "participants")}))
    return result


if __name__ == "__main__":
    main()
