"""Kaggle kernels: build and check ``kernel-metadata.json``, assemble a kernel folder from a notebook, and push it
with the official ``kaggle`` CLI (``kaggle kernels push -p DIR``). Everything but the push itself runs offline, so a
broken kernel is caught before Kaggle queues it. The thin command line is ``kaggle/push_kernel.py``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

MACHINE_SHAPES = ("NvidiaTeslaT4", "NvidiaTeslaP100", "NvidiaL4", "Tpu1VmV38")
REQUIRED = ("id", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu", "enable_internet")
_KAGGLE_VARIABLE = r"KAGGLE_(?:KEY|API_TOKEN)"
_LITERAL = r"""[rRbBuU]?["'](?!\$)[^"'\s]+["']"""  # a non-empty literal, not "$VAR" (an empty default is no secret)
SECRET_PATTERNS = {
    # the form it takes -> pattern; searched in every cell's source and in the text of its outputs (first match named)
    "a Hugging Face token (hf_...)": re.compile(r"hf_[A-Za-z0-9]{30,}"),
    "a Kaggle credential given a literal value in code (KAGGLE_KEY = '...', os.environ['KAGGLE_KEY'] = '...', "
    "setdefault('KAGGLE_KEY', '...'); KAGGLE_API_TOKEN alike)":
        re.compile(_KAGGLE_VARIABLE + r"""["']?\s*\]?\s*[=:]\s*""" + _LITERAL + r"""|(?:setdefault|putenv|setenv)\(\s*["']"""
                   + _KAGGLE_VARIABLE + r"""["']\s*,\s*""" + _LITERAL),
    "a Kaggle credential set with the %env magic (%env KAGGLE_KEY=...)":
        re.compile(r"^[ \t]*%(?:set_)?env[ \t]+" + _KAGGLE_VARIABLE + r"(?:[ \t]*=[ \t]*|[ \t]+)(?![$\s])\S",
                   re.MULTILINE),
    "a Kaggle credential set on a shell line (!KAGGLE_KEY=... kaggle ..., export KAGGLE_KEY=...)":
        re.compile(r"^[ \t]*(?:!|export[ \t]).*?\b" + _KAGGLE_VARIABLE + r"""=["']?(?![$\s"'])\S""", re.MULTILINE),
    "a Kaggle API key in kaggle.json form ({'username': ..., 'key': '<32 hex digits>'}, either quotes, or key=...)":
        re.compile(r"""key["']?\s*[:=]\s*[rRbBuU]?["'][0-9a-fA-F]{32}["']""", re.IGNORECASE),
    "an OpenAI-style key (sk-...)": re.compile(r"sk-[A-Za-z0-9]{32,}"),
}
# Printed by a cell, a bare key has nothing around it to recognise it by: in outputs, 32 hex digits on their own count.
OUTPUT_SECRET_PATTERNS = {
    **SECRET_PATTERNS,
    "a Kaggle API key (32 hex digits)": re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32}(?![0-9A-Za-z])"),
}


# The line of the notebooks' install cell (notebooks/install_cell.py) that a wheelhouse kernel sets.
WHEELHOUSE_LINE = 'LLMFT_WHEELHOUSE = os.environ.get("LLMFT_WHEELHOUSE", "")'


class KernelError(ValueError):
    """Kernel metadata or notebook that Kaggle would reject or that would leak a secret; says what and where."""


def slugify(title: str) -> str:
    """Kaggle's rule: a kernel's slug is its title lowercased, spaces to dashes, other characters dropped."""
    slug = re.sub(r"[^a-z0-9\s-]", "", title.lower())
    return re.sub(r"[\s-]+", "-", slug).strip("-")


def kernel_metadata(owner: str, title: str, code_file: str, *, competition_sources=(), dataset_sources=(),
                    kernel_sources=(), model_sources=(), enable_internet: bool = True, is_private: bool = True,
                    enable_gpu: bool = True, machine_shape: str = "NvidiaTeslaT4") -> dict:
    """``kernel-metadata.json`` for a notebook kernel on a T4. ``enable_internet`` is always written explicitly:
    competitions that score offline need ``False`` (install from a wheelhouse dataset then, see kaggle/README.md)."""
    return {
        "id": f"{owner}/{slugify(title)}", "title": title, "code_file": code_file, "language": "python",
        "kernel_type": "notebook", "is_private": is_private, "enable_gpu": enable_gpu,
        "enable_internet": enable_internet, "machine_shape": machine_shape if enable_gpu else None,
        "competition_sources": list(competition_sources), "dataset_sources": list(dataset_sources),
        "kernel_sources": list(kernel_sources), "model_sources": list(model_sources),
    }


def validate_metadata(meta: dict, folder: str | Path | None = None) -> None:
    """Raise :class:`KernelError` naming the field for anything Kaggle would refuse or silently change."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise KernelError(f"kernel-metadata.json: missing {missing} (enable_internet must be set explicitly)")
    owner, _, slug = str(meta["id"]).partition("/")
    if not owner or not slug or "/" in slug:
        raise KernelError(f"kernel-metadata.json, field 'id': expected 'username/kernel-slug', got {meta['id']!r}")
    if len(str(meta["title"])) < 5:
        raise KernelError("kernel-metadata.json, field 'title': Kaggle needs at least 5 characters")
    if slugify(str(meta["title"])) != slug:
        raise KernelError(f"kernel-metadata.json, fields 'id'/'title': the slug {slug!r} must be the title's slug "
                          f"{slugify(str(meta['title']))!r} (Kaggle links the two)")
    for key in ("is_private", "enable_gpu", "enable_internet"):
        if not isinstance(meta[key], bool):
            raise KernelError(f"kernel-metadata.json, field {key!r}: expected true or false, got {meta[key]!r}")
    if meta["language"] != "python" or meta["kernel_type"] != "notebook":
        raise KernelError("kernel-metadata.json: llmft kernels are language 'python', kernel_type 'notebook'")
    if meta["enable_gpu"] and meta.get("machine_shape") not in MACHINE_SHAPES:
        raise KernelError(f"kernel-metadata.json, field 'machine_shape': {meta.get('machine_shape')!r}; use one of "
                          f"{MACHINE_SHAPES} (NvidiaTeslaT4 for llmft's defaults)")
    for key in ("competition_sources", "dataset_sources", "kernel_sources", "model_sources"):
        if not isinstance(meta.get(key, []), list):
            raise KernelError(f"kernel-metadata.json, field {key!r}: expected a list")
    if folder is not None and not (Path(folder) / meta["code_file"]).exists():
        raise KernelError(f"kernel-metadata.json, field 'code_file': {meta['code_file']!r} is not in {folder}")


def validate_notebook(path: str | Path) -> dict:
    """Check a notebook before it leaves the machine: valid nbformat JSON with a Python kernel, and no secrets in any
    cell or output. Returns the notebook."""
    import nbformat

    path = Path(path)
    text = path.read_text()
    try:
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
    except Exception as exc:  # noqa: BLE001 - nbformat raises several types
        raise KernelError(f"{path}: not a valid notebook ({exc})") from exc
    language = notebook.metadata.get("kernelspec", {}).get("language", "python")
    if language != "python":
        raise KernelError(f"{path}: kernel language {language!r}; Kaggle notebook kernels here are Python")
    for index, cell in enumerate(notebook.cells):
        for where, text, patterns in (("source", cell.source, SECRET_PATTERNS),
                                      ("output", _output_text(cell.get("outputs", [])), OUTPUT_SECRET_PATTERNS)):
            what = next((what for what, pattern in patterns.items() if pattern.search(text)), None)
            if what is not None:  # the message names the cell and the form, never the secret itself
                raise KernelError(
                    f"{path}, cell {index} ({cell.cell_type}, in its {where}): contains what looks like {what}. "
                    "Nothing was written or pushed. Read secrets from Kaggle Secrets (Add-ons > Secrets; "
                    "kaggle_secrets.UserSecretsClient().get_secret(...)) or Colab's userdata instead of writing "
                    "them in a cell, clear the outputs (Edit > Clear all outputs), and revoke the key if the "
                    "notebook was ever shared")
    return notebook


def _output_text(outputs) -> str:
    """Every text a cell's outputs hold (streams, results, errors), as it was printed: not JSON-escaped, so a printed
    ``{"key": "..."}`` still reads as one. Images are left out (base64 data)."""
    texts = []

    def collect(value, key=""):
        if key.startswith("image/") and key != "image/svg+xml":
            return
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                collect(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v, key)

    collect(list(outputs))
    return "\n".join(texts)


def wheelhouse_path(dataset: str) -> str:
    """Where Kaggle mounts an attached dataset ``OWNER/SLUG``: ``/kaggle/input/SLUG``."""
    owner, _, slug = dataset.partition("/")
    if not owner or not slug or "/" in slug:
        raise KernelError(f"--wheelhouse {dataset!r}: expected the dataset as OWNER/SLUG (e.g. alice/llmft-wheelhouse)")
    return f"/kaggle/input/{slug}"


def install_cell(notebook) -> dict:
    """The notebook's install cell: its first code cell, which must be llmft's (notebooks/install_cell.py)."""
    cell = next((c for c in notebook["cells"] if c["cell_type"] == "code"), None)
    if cell is None or WHEELHOUSE_LINE not in "".join(cell["source"]):
        raise KernelError("the notebook's first code cell is not llmft's install cell (no line "
                          f"{WHEELHOUSE_LINE!r}); copy notebooks/install_cell.py into it "
                          "(python scripts/sync_install_cell.py does it for the repository's notebooks)")
    return cell


def with_wheelhouse(notebook, dataset: str):
    """The notebook with its install cell pointed at the attached wheelhouse dataset: it installs with
    ``pip install --no-index --find-links /kaggle/input/SLUG`` and never reaches for the internet."""
    cell = install_cell(notebook)
    line = f'LLMFT_WHEELHOUSE = "{wheelhouse_path(dataset)}"   # set by kaggle/push_kernel.py --wheelhouse {dataset}'
    cell["source"] = "".join(cell["source"]).replace(WHEELHOUSE_LINE, line)
    return notebook


def assemble_kernel(notebook: str | Path, out_dir: str | Path, meta: dict, *, wheelhouse: str | None = None) -> Path:
    """A kernel folder: the notebook (as ``meta['code_file']``) and ``kernel-metadata.json``, both checked. With
    ``wheelhouse="OWNER/SLUG"`` (a dataset built by kaggle/build_wheelhouse.sh) the install cell installs from it
    offline; the metadata must then attach it and turn the internet off. With the internet off and no wheelhouse,
    the install cell would try to clone from the internet: refused."""
    nb = validate_notebook(notebook)
    if wheelhouse is not None:
        if meta["enable_internet"] or wheelhouse not in meta["dataset_sources"]:
            raise KernelError(f"wheelhouse {wheelhouse!r}: the metadata must attach it (dataset_sources) and set "
                              "enable_internet false")
        with_wheelhouse(nb, wheelhouse)
    elif meta["enable_internet"] is False and not _preinstalled(nb):
        raise KernelError("enable_internet is false, but the install cell would clone llmft from the internet: "
                          "pass --wheelhouse OWNER/SLUG (a dataset built by kaggle/build_wheelhouse.sh)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if wheelhouse is None:
        shutil.copyfile(notebook, out / meta["code_file"])
    else:
        import nbformat

        nbformat.write(nb, str(out / meta["code_file"]))
    validate_metadata(meta, out)
    (out / "kernel-metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _preinstalled(notebook) -> bool:
    """True unless the notebook's first code cell is llmft's online install cell."""
    try:
        install_cell(notebook)
    except KernelError:
        return True
    return False


def push(folder: str | Path, *, dry_run: bool = False, runner=subprocess.run) -> list[list[str]]:
    """Push the kernel folder with the official CLI and ask for its status. Returns the commands; with
    ``dry_run`` only checks the folder and returns them. Needs ``pip install kaggle`` and credentials
    (``~/.kaggle/kaggle.json`` or ``KAGGLE_USERNAME``/``KAGGLE_KEY``)."""
    folder = Path(folder)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    validate_metadata(meta, folder)
    validate_notebook(folder / meta["code_file"])
    commands = [["kaggle", "kernels", "push", "-p", str(folder)], ["kaggle", "kernels", "status", meta["id"]]]
    if dry_run:
        return commands
    if shutil.which("kaggle") is None:
        raise KernelError("the kaggle CLI is not installed: pip install kaggle, then put your API token in "
                          "~/.kaggle/kaggle.json (or set KAGGLE_USERNAME and KAGGLE_KEY)")
    for command in commands:
        runner(command, check=True)
    print(f"Pushed. Output later with: kaggle kernels output {meta['id']} -p <dir>")
    return commands
