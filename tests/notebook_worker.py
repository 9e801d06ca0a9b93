"""Execute a notebook in a Jupyter kernel of ANOTHER Python (a fresh virtualenv), as a user's runtime would; used by
test_install.py, in a subprocess so that it can run inside a network namespace with no network (`unshare -n`).

    python tests/notebook_worker.py NOTEBOOK WORKDIR KERNEL_PYTHON RESULT_JSON

Writes {"error": <the failing cell's error or null>, "outputs": [text printed by each code cell]} to RESULT_JSON.
"""
import json
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(notebook: str, workdir: str, kernel_python: str, result_json: str) -> int:
    kernels = Path(tempfile.mkdtemp(prefix="llmft-kernelspec-"))
    spec = kernels / "kernels" / "fresh-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    import os

    os.environ["JUPYTER_PATH"] = str(kernels)
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=1200, kernel_name="fresh-venv", resources={"metadata": {"path": workdir}})
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc)
    outputs = ["".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                       for o in cell.get("outputs", [])) for cell in nb.cells if cell.cell_type == "code"]
    Path(result_json).write_text(json.dumps({"error": error, "outputs": outputs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
