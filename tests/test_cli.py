"""The command line: help, version, one-line errors with exit status 2, study and demo runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import mriface
from mriface.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_and_help_as_a_program():
    out = subprocess.run([sys.executable, "-m", "mriface", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"mriface {mriface.__version__}"
    out = subprocess.run([sys.executable, "-m", "mriface", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "study" in out.stdout and "demo" in out.stdout


@pytest.mark.parametrize("cmd", ["study", "demo"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--views" in text and "--device" in text and "--include-images" in text


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mriface: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_study_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    err = _one_line_error(capsys, ["study", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")])
    assert "none.csv" in err and "no such file" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("name,where\nA,a.nii\n")
    assert "lacks a subject column" in _one_line_error(capsys, ["study", str(bad), "--out", str(tmp_path / "o")])
    m = tmp_path / "m.csv"
    m.write_text("subject,scan\nA,gone.nii\n")
    assert "gone.nii" in _one_line_error(capsys, ["study", str(m), "--out", str(tmp_path / "o")])
    (tmp_path / "a.nii").write_bytes(b"x")
    m.write_text("subject,scan\nA,a.nii\n")
    err = _one_line_error(capsys, ["study", str(m), "--out", str(tmp_path / "o"), "--device", "nonsense"])
    assert "nonsense" in err
    err = _one_line_error(capsys, ["study", str(m), "--out", str(tmp_path / "o"), "--model", "nonsense"])
    assert "unknown face model 'nonsense'" in err and "facenet" in err
    err = _one_line_error(capsys, ["study", str(m), "--out", str(tmp_path / "o"), "--backend", "nonsense"])
    assert "nonsense" in err and "embree" in err


def test_bad_range_option_is_rejected_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "m.csv", "--out", str(tmp_path), "--probe-azimuth=left"])
    assert e.value.code == 2 and "MIN,MAX" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_the_small_head_prints_its_tables(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "mriface", "demo", "--heads", "voxface,pydeface", "--views", "3",
                          "--size", "160", "--device", "cpu", "--no-progress", "--out", str(out),
                          "--synthetic", "3", "--accept-noncommercial"],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rank 1:" in run.stdout and "top 5:" in run.stdout and "voxface" in run.stdout
    assert "photographs of 3 synthetic participants" in run.stdout and "chance: rank 1 33%" in run.stdout
    photos = pd.read_csv(out / "photographs" / "participants.csv")
    assert sorted(photos["participant"]) == ["syn001", "syn002", "syn003"]
    for study in ("protocol", "resampled"):
        table = pd.read_csv(out / study / "participants.csv")
        assert sorted(table["participant"]) == ["pydeface", "voxface"]
        assert (out / study / "report.html").is_file() and (out / study / "summary.json").is_file()
    # the rotated, resampled copies exist and the gallery was computed once for both studies
    assert len(list((out / "inputs").glob("*_1.2mm.nii.gz"))) == 2
    entries = [p.name for p in (out / "cache" / "renders").glob("*-gallery-*.json")]
    assert len([e for e in entries if not e.startswith("syn")]) == 2 and len(entries) == 2 + 3
    assert not list(out.rglob("*view*.png"))  # no renders written without --include-images


def test_study_options_reach_run_study(tmp_path, monkeypatch):
    """The command line builds the probe protocol from its range options and passes the rest on."""
    import mriface.study as study

    seen = {}

    def fake_run_study(source, **kw):
        seen.update(kw, source=source)
        raise mriface.MRIFaceError("stop here")

    monkeypatch.setattr(study, "run_study", fake_run_study)
    assert main(["study", "m.csv", "--out", str(tmp_path), "--views", "4", "--size", "200", "--seed", "3",
                 "--probe-azimuth=-40,40", "--probe-elevation=0,20", "--k", "7", "--bids-suffix", "FLAIR,T1w",
                 "--random-weights", "--include-images"]) == 2
    pp = seen["probe_protocol"]
    assert (pp.views, pp.image_size, pp.seed) == (4, 200, 4)  # probe seed defaults to seed + 1
    assert pp.azimuth_deg == (-40.0, 40.0) and pp.elevation_deg == (0.0, 20.0)
    assert seen["k"] == 7 and seen["bids_suffixes"] == ["FLAIR", "T1w"]
    assert seen["random_weights"] and seen["include_images"] and seen["source"] == "m.csv"


def test_surface_and_render_take_a_mesh_file_wherever_they_take_a_scan(tmp_path, capsys):
    """`mriface surface` and `mriface render` read OBJ/PLY meshes (face frame estimated) and mriface .npz surfaces."""
    import numpy as np

    from mriface.render._synthetic import synthetic_head
    from mriface.surface import save_surface, save_surface_npz

    head = synthetic_head(24, 32)  # a small made-up head with a nose, looking along +y
    save_surface(head, tmp_path / "head.ply")
    save_surface(head, tmp_path / "head.obj")
    save_surface_npz(head, tmp_path / "head.npz")
    assert main(["surface", str(tmp_path / "head.ply"), str(tmp_path / "head.obj"), "--out", str(tmp_path / "m")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("head.")]
    assert len(lines) == 2
    for line in lines:
        cols = line.split()
        assert cols[1:5] == ["-", "-", "mesh", "-"]  # no voxels, voxel size, threshold: a mesh
        forward = np.array([float(c) for c in cols[7:10]])
        assert forward @ np.asarray(head.frame.forward) > 0.95  # the estimated frame looks where the face does
    assert (tmp_path / "m" / "head.ply").is_file()

    out = tmp_path / "renders"
    assert main(["render", str(tmp_path / "head.obj"), str(tmp_path / "head.npz"), "--out", str(out),
                 "--views", "1", "--size", "32", "--device", "cpu", "--backend", "embree"]) == 0
    assert len(list(out.rglob("*.png"))) == 2 and (out / "renders.csv").is_file()
    assert main(["render", str(tmp_path / "nowhere.ply"), "--out", str(out)]) == 2
    assert "nowhere.ply" in capsys.readouterr().err


def test_demo_asks_before_fetching_the_noncommercial_face_model(tmp_path, monkeypatch):
    from mriface.demo import ACCEPT_ENV, synthetic_consent

    monkeypatch.setenv("MRIFACE_DATA", str(tmp_path / "empty-cache"))  # the face model is not cached here
    monkeypatch.delenv(ACCEPT_ENV, raising=False)
    asked = []
    ok, why = synthetic_consent(False, interactive=False, ask=asked.append)
    assert not ok and "--accept-noncommercial" in why and asked == []  # no prompt, no fetch
    ok, _ = synthetic_consent(False, interactive=True, ask=lambda prompt: asked.append(prompt) or "n")
    assert not ok and "non-commercial" in asked[0]
    assert synthetic_consent(False, interactive=True, ask=lambda prompt: "y")[0]
    assert synthetic_consent(True, interactive=False)[0]
    monkeypatch.setenv(ACCEPT_ENV, "bfm")
    assert synthetic_consent(False, interactive=False)[0]
    assert not (tmp_path / "empty-cache").exists()  # deciding fetched nothing
