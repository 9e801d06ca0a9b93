"""Every numbered notebook runs top to bottom in smoke mode (tiny offline assets) and is committed clean."""
import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_numbered_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_sft.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    text = path.read_text()
    assert f"colab.research.google.com/github/" in text and f"notebooks/{path.name}" in text  # Open-in-Colab badge
    assert "testing.smoke_mode()" in text  # the single smoke switch
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)  # no hub tokens


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFT_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
