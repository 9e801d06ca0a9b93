"""Copy notebooks/install_cell.py, the one source of the install cell, into every numbered notebook.

    python scripts/sync_install_cell.py           # rewrite the notebooks' install cells
    python scripts/sync_install_cell.py --check   # exit 1 and name the notebooks that differ (tests run this)

The install cell is the first code cell of each notebook; it cannot import anything from llmft (llmft is not
installed yet when it runs), so its text lives in that one file and is copied, never edited in a notebook.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "notebooks" / "install_cell.py"


def install_cell_text() -> str:
    return SOURCE.read_text().rstrip("\n")


def notebooks() -> list[Path]:
    return sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def install_cell(notebook: dict) -> dict:
    return next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")


def with_install_cell(notebook: dict, text: str) -> dict:
    install_cell(notebook)["source"] = text.splitlines(keepends=True)
    return notebook


def write_notebook(path: Path, notebook: dict) -> None:
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")  # nbformat's own layout


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    text, stale = install_cell_text(), []
    for path in notebooks():
        notebook = json.loads(path.read_text())
        if "".join(install_cell(notebook)["source"]) != text:
            stale.append(path.name)
            if not check:
                write_notebook(path, with_install_cell(notebook, text))
    if check and stale:
        print(f"install cell differs from {SOURCE.relative_to(REPO)} in: {', '.join(stale)}; "
              "run python scripts/sync_install_cell.py", file=sys.stderr)
        return 1
    print(("differ: " if check else "updated: ") + (", ".join(stale) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
