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


#: documentation pages whose examples need the sample data or take more than a few seconds
_SLOW_DOCS = {"extending.md"}


def _docs_with_examples():
    pages = sorted(p for p in (ROOT / "docs").glob("*.md") if ">>> " in p.read_text())
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in _SLOW_DOCS else [])
            for p in pages]


@pytest.mark.parametrize("page", _docs_with_examples())
def test_documentation_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    result = doctest.testfile(str(page), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} example(s) in docs/{page.name} failed"


def test_extending_guide_covers_the_three_seams():
    text = (ROOT / "docs" / "extending.md").read_text()
    code = "\n".join(ln for ln in text.splitlines() if ln.startswith((">>> ", "... ")))
    for call in ("register_backend(", "render_views(", "register_model(", "get_model(", "TransformProbes(",
                 "run_study("):
        assert call in code, f"docs/extending.md has no running example of {call}"
    assert "extending.md" in {p.values[0].name for p in _docs_with_examples()}


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "walkthrough.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "mriface-demo" / "walkthrough"
    assert (out / "study" / "summary.json").is_file()
    assert "rank" in proc.stdout.lower()
