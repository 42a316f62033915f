"""deface-eval: the follow-up study's table for two methods and an outside tool on a 2-head cohort (small renders)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mriface import cli, datasets
from mriface.deface import RegistrationError
from mriface.deface import core as deface_core
from mriface.volume import load_volume, rotate_resample


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """voxface ("average") and a turned copy whose registration is made to fail; mask and plane; an outside
    tool ("ext") that defaced only "average" and also wrote into its brain; a photograph for "average"."""
    from PIL import Image

    from mriface.deface.evaluate import evaluate_methods

    d = tmp_path_factory.mktemp("deface-eval")
    head = datasets.fetch("voxface")
    rotate_resample(head, d / "turned.nii.gz", axis=(0, 0, 1), degrees=10, voxel_mm=2.0)
    (d / "cohort.csv").write_text(f"subject,scan\naverage,{head}\nturned,turned.nii.gz\n")
    # the outside tool: the front half of the head zeroed, and one brain voxel changed (the check must see it)
    img = nib.load(str(head))
    data = np.asarray(img.dataobj, np.float32).copy()
    vol = load_volume(head)
    data[:, int(data.shape[1] * 0.62):, :] = 0  # voxface is stored RAS: +y is anterior
    centre = tuple(int(round(c)) for c in np.linalg.inv(img.affine)[:3] @ np.append([0.0, -10.0, 20.0], 1.0))
    data[centre] += 50.0
    nib.save(nib.Nifti1Image(data, img.affine), str(d / "ext_defaced.nii.gz"))
    (d / "ext.csv").write_text("subject,scan\naverage,ext_defaced.nii.gz\n")
    photos = d / "photos" / "average"
    photos.mkdir(parents=True)
    Image.open(datasets.fetch("obama")).save(photos / "portrait.png")

    real_prepare = deface_core.prepare

    def prepare(volume, **kw):  # the turned copy plays a scan whose registration fails
        if "turned" in str(volume.path):
            raise RegistrationError(f"{volume.name}: the average head did not register (test)")
        return real_prepare(volume, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(deface_core, "prepare", prepare)
    try:
        res = evaluate_methods(d / "cohort.csv", out=d / "out", methods=["mask", "plane"],
                               defaced={"ext": d / "ext.csv"}, photos=d / "photos", views=2, size=160,
                               device="cpu", progress=False)
    finally:
        mp.undo()
    return res


def test_one_row_per_method_with_exact_rates(evaluation):
    t = evaluation.table.set_index("method")
    assert list(t.index) == ["original", "mask", "plane", "ext"]
    # the turned copy was not defaced by the built-in methods: not a probe, counted as a failure
    for m in ("mask", "plane"):
        assert t.loc[m, "defaced"] == 1 and t.loc[m, "registration_failed"] == 1 and t.loc[m, "failed"] == 1
        assert t.loc[m, "rank1_n"] == 1 and t.loc[m, "rank1_ci95_high"] == pytest.approx(0.975, abs=1e-3)
    assert t.loc["original", "rank1_n"] == 2 and t.loc["original", "renders"] == 4
    assert t.loc["ext", "defaced"] == 1 and "not_in_manifest: 1" in t.loc["ext", "failures"]
    # photographs: before defacing against the original gallery, then against each defaced gallery
    assert (t["photo_rank1_n"] == 1).all()


def test_brain_protection_and_face_region_are_measured(evaluation):
    t = evaluation.table.set_index("method")
    for m in ("mask", "plane"):
        assert t.loc[m, "brain_voxels_changed"] == 0 and t.loc[m, "brain_mask_voxels"] > 100_000
        assert t.loc[m, "face_region_changed_pct"] > 50 and t.loc[m, "face_left_intact"] == 0
        assert t.loc[m, "seconds_per_scan"] > 0
        assert t.loc[m, "face_detected_pct"] < t.loc["original", "face_detected_pct"]
    assert t.loc["ext", "brain_voxels_changed"] >= 1  # the outside tool wrote into the brain: it shows
    assert np.isnan(t.loc["ext", "seconds_per_scan"])


def test_problems_recorded_and_outputs_written(evaluation):
    kinds = {p.kind for p in evaluation.problems}
    assert {"registration_failed", "not_in_manifest"} <= kinds
    out = evaluation.out
    for name in ("deface_eval.csv", "deface_eval.json", "problems.csv", "report.md", "report.html",
                 "cmc.png", "cmc_photos.png", "studies/mask/scan-to-scan/summary.json"):
        assert (out / name).is_file(), name
    text = (out / "deface_eval.json").read_text()
    summary = json.loads(text)
    assert [r["method"] for r in summary["rows"]] == ["original", "mask", "plane", "ext"]
    # shareable like a study's summary: no absolute path (problems.csv, private, keeps them)
    assert str(out.parent) not in text and str(Path.home()) not in text
    assert any(str(out.parent) in line for line in (out / "problems.csv").read_text().splitlines())
    assert summary["published"][0]["before"] == "97% matched"
    report = (out / "report.md").read_text()
    assert "Schwarz" in report and "| mask |" in report
    assert not (out / "images").exists()  # renders show faces: only with include_images


def test_cli_passes_methods_outside_tools_and_options(monkeypatch, tmp_path, capsys):
    import pandas as pd

    from mriface.deface import evaluate

    seen = {}

    def fake(cohort, **kw):
        seen.update(kw, cohort=cohort)
        table = pd.DataFrame([{"method": "mask", "rank1": 0, "rank1_n": 1, "face_detected_pct": 0.0,
                               "brain_voxels_changed": 0, "failures": ""}])
        return evaluate.DefaceEvalResult(tmp_path, table, {}, [], files={"table": "t.csv", "html": "r.html"})

    monkeypatch.setattr(evaluate, "evaluate_methods", fake)
    rc = cli.main(["deface-eval", "c.csv", "--out", str(tmp_path), "--methods", "mask,plane", "--defaced",
                   "fsl=pd.csv", "--option", "adversarial.steps=3", "--option", "blur.sigma_mm=4.5",
                   "--views", "2", "--no-baseline", "--no-progress"])
    assert rc == 0 and "rank 1 0/1" in capsys.readouterr().out
    assert seen["methods"] == ["mask", "plane"] and seen["defaced"] == {"fsl": "pd.csv"}
    assert seen["method_options"] == {"adversarial": {"steps": 3}, "blur": {"sigma_mm": 4.5}}
    assert seen["views"] == 2 and seen["baseline"] is False
    assert cli.main(["deface-eval", "c.csv", "--out", str(tmp_path), "--option", "steps=3"]) == 2
    assert "METHOD.KEY=VALUE" in capsys.readouterr().err


def test_unknown_method_or_option_stops_before_any_work(tmp_path):
    from mriface.deface import DefaceError
    from mriface.deface.evaluate import evaluate_methods
    from mriface.errors import MRIFaceError

    with pytest.raises(DefaceError, match="unknown defacing method 'nope'"):
        evaluate_methods(tmp_path / "c.csv", out=tmp_path / "o", methods=["nope"])
    with pytest.raises(MRIFaceError, match="options for blur"):
        evaluate_methods(tmp_path / "c.csv", out=tmp_path / "o", methods=["mask"], method_options={"blur": {}})
