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
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_sft.ipynb", "02_dpo.ipynb", "03_evaluation.ipynb", "04_fibonacci_forgetting_probe.ipynb",
                     "05_codemmlu_kaggle.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    text = path.read_text()
    assert "colab.research.google.com/github/" in text and f"notebooks/{path.name}" in text  # Open-in-Colab badge
    assert "testing.smoke_mode()" in text  # the single smoke switch
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)  # no hub tokens



@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_states_runtime_time_on_a_t4_and_where_outputs_go(path):
    nb = json.loads(path.read_text())
    first = "".join(nb["cells"][0]["source"])
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "**Runtime:** Colab → *Runtime ▸ Change runtime type ▸ T4 GPU*; Kaggle → *Settings ▸ Accelerator ▸ GPU T4 x2*" \
        in first
    assert re.search(r"\*\*Time on a T4:\*\* (not measured yet|about \d+ minutes)", first)
    outputs = first[first.index("**Outputs:**"):]
    for name in re.findall(r"""output_dir\(["']([^"']+)["']""", code):  # each folder the notebook writes, named
        assert f'output_dir("{name}")' in outputs and f"/kaggle/working/{name}" in outputs, name


@pytest.mark.parametrize("name, flag", [("02_dpo.ipynb", "FROM_BASE"), ("03_evaluation.ipynb", "MISSING_OK")])
def test_notebooks_that_continue_another_stop_without_its_adapters_unless_told(name, flag):
    """A notebook runs in its own session: the adapters of the one before are found on Drive or in /kaggle/input
    (llmft.previous_adapters), or it stops with how to bring them; smoke mode goes on without them, so CI runs it
    alone too."""
    code = "".join("".join(c["source"]) for c in json.loads((REPO / "notebooks" / name).read_text())["cells"]
                   if c["cell_type"] == "code")
    assert f"{flag} = SMOKE " in code and f'missing_ok={flag},\n' in code and f'switch="{flag} = True"' in code
    assert "llmft.previous_adapters(" in code and "os.path.isdir(SFT_ADAPTERS)" not in code

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working directory for all notebooks, run in order: 02 continues from 01's adapters as a user would."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(path, workdir, monkeypatch):
    monkeypatch.setenv("LLMFT_SMOKE", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    sft_adapters_exist = (workdir / "outputs" / "01_sft" / "adapters" / "adapter_config.json").exists()
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if path.name == "03_evaluation.ipynb":  # the metrics table shows a Vietnamese example row, scored for real
        shown = "".join(o.get("data", {}).get("text/plain", "") for c in nb.cells if c.cell_type == "code"
                        for o in c.outputs)
        row = next(line for line in shown.splitlines() if line.startswith("example (vi)"))
        assert float(row.split()[3]) == 1.0  # ROUGE-1: the same Vietnamese words (the hub's tokens: scraps)
    if path.name == "05_codemmlu_kaggle.ipynb":  # the results table: no column only the first two rows fill (NaN)
        cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("import gc"))
        table = next(o for o in cell.outputs if o.output_type == "execute_result")["data"]["text/html"]
        assert re.findall(r"<th>([^<]*)</th>", table.split("</thead>")[0]) == ["", "run", "steps", "val accuracy",
                                                                             "submission"]
    if path.name == "02_dpo.ipynb" and sft_adapters_exist:  # after 01 ran here, 02 continues from its adapters
        printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "Policy and reference start from the SFT adapters" in printed
