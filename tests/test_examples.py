"""The examples users copy: every docstring example in the package, and the walk-through script."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mriface

ROOT = Path(__file__).resolve().parents[1]


def _modules_with_examples():
    names = ["mriface"] + [m.name for m in pkgutil.walk_packages(mriface.__path__, "mriface.")]
    return [n for n in names if ">>> " in (Path(importlib.util.find_spec(n).origin).read_text())]


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "walkthrough.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "mriface-demo" / "walkthrough"
    assert (out / "study" / "summary.json").is_file()
    assert "rank" in proc.stdout.lower()
