"""The renderer benchmark's small variant runs end to end and reports what RESULTS.md quotes."""

from __future__ import annotations

import json

import pytest
import torch


def test_small_render_benchmark_runs_and_writes_its_figures(tmp_path):
    from benchmarks.bench_render import main

    out = tmp_path / "render.json"
    assert main(["--small", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    cpu, gal = res["cpu"], res["gallery"]
    assert cpu["embree_median_s"] > 0 and cpu["pytorch3d_small_s"] > 0
    assert cpu["ratio_scaled"] > 1, "embree should beat pytorch3d's CPU rasterizer"
    assert gal["renders"] == gal["subjects"] * gal["views"]
    assert set(gal["stages_s"]) == {"setup", "rasterize", "shade"}
    assert 0.05 < gal["coverage"] < 0.9
    assert res["machine"]["torch"] == torch.__version__


@pytest.mark.gpu
def test_small_gallery_benchmark_runs_on_cuda_and_reports_memory(tmp_path):
    from benchmarks.bench_render import main

    out = tmp_path / "render.json"
    assert main(["--small", "--device", "cuda", "--part", "gallery", "--out", str(out)]) == 0
    gal = json.loads(out.read_text())["gallery"]
    assert gal["backend"] == "auto" and gal["peak_gpu_mem_gib"] > 0 and gal["renders_per_s"] > 0
