"""Kaggle kernel packaging, checked offline."""
import json
import runpy
import sys

import pytest

from llmft import kaggle

from conftest import REPO


def _meta(**changes):
    return {**kaggle.kernel_metadata("alice", "llmft CodeMMLU on a T4", "notebook.ipynb"), **changes}


def test_metadata_and_template_are_valid():
    meta = _meta()
    assert meta["id"] == "alice/llmft-codemmlu-on-a-t4" and meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["enable_internet"] is True and meta["kernel_type"] == "notebook"
    kaggle.validate_metadata(meta)
    kaggle.validate_metadata(json.loads((REPO / "kaggle" / "kernel-metadata.json").read_text()))
    offline = kaggle.kernel_metadata("alice", "Offline run of llmft", "nb.ipynb", competition_sources=["comp"],
                                     enable_internet=False)
    assert offline["enable_internet"] is False and offline["competition_sources"] == ["comp"]


@pytest.mark.parametrize("changes, message", [
    ({"enable_internet": None}, "field 'enable_internet': expected true or false"),
    ({"id": "alice/other-slug"}, "must be the title's slug 'llmft-codemmlu-on-a-t4'"),
    ({"id": "no-owner"}, "expected 'username/kernel-slug'"),
    ({"machine_shape": "NvidiaTeslaK80"}, "field 'machine_shape'"),
    ({"is_private": "true"}, "field 'is_private'"),
    ({"dataset_sources": "x"}, "field 'dataset_sources': expected a list"),
])
def test_bad_metadata_is_named(changes, message):
    with pytest.raises(kaggle.KernelError, match=message):
        kaggle.validate_metadata(_meta(**changes))
    missing = _meta()
    del missing["enable_internet"]
    with pytest.raises(kaggle.KernelError, match="must be set explicitly"):
        kaggle.validate_metadata(missing)


def test_repository_notebooks_are_clean_kernels():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        kaggle.validate_notebook(path)


def test_secrets_and_broken_notebooks_are_refused(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('token = "hf_' + "a" * 34 + '"')])
    path = tmp_path / "leak.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(kaggle.KernelError, match=r"cell 0 \(code, in its source\): contains what looks like a Hugging "
                                                 "Face token"):
        kaggle.validate_notebook(path)
    (tmp_path / "broken.ipynb").write_text("{not json")
    with pytest.raises(kaggle.KernelError, match="not a valid notebook"):
        kaggle.validate_notebook(tmp_path / "broken.ipynb")


def test_assemble_and_push(tmp_path, monkeypatch):
    notebook = REPO / "notebooks" / "01_sft.ipynb"
    folder = kaggle.assemble_kernel(notebook, tmp_path / "kernel", _meta())
    assert (folder / "notebook.ipynb").read_bytes() == notebook.read_bytes()
    assert json.loads((folder / "kernel-metadata.json").read_text())["id"] == "alice/llmft-codemmlu-on-a-t4"
    commands = kaggle.push(folder, dry_run=True)
    assert commands == [["kaggle", "kernels", "push", "-p", str(folder)],
                        ["kaggle", "kernels", "status", "alice/llmft-codemmlu-on-a-t4"]]
    ran = []
    monkeypatch.setattr(kaggle.shutil, "which", lambda name: "/usr/bin/kaggle")
    kaggle.push(folder, runner=lambda cmd, check: ran.append(cmd))
    assert ran == commands
    monkeypatch.setattr(kaggle.shutil, "which", lambda name: None)
    with pytest.raises(kaggle.KernelError, match="pip install kaggle"):
        kaggle.push(folder)


def _push_kernel(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["push_kernel.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "kaggle" / "push_kernel.py"), run_name="__main__")
    return exit_.value.code


def test_command_line_dry_run_with_a_wheelhouse_installs_offline(tmp_path, capsys, monkeypatch):
    import nbformat

    argv = [str(REPO / "notebooks" / "05_codemmlu_kaggle.ipynb"), "--owner", "alice", "--title", "llmft SFT on a T4",
            "--competition", "some-comp", "--wheelhouse", "alice/llmft-wheelhouse", "--out", str(tmp_path / "k"),
            "--dry-run"]
    assert _push_kernel(argv, monkeypatch) == 0
    assert "would run: kaggle kernels push -p" in capsys.readouterr().out
    meta = json.loads((tmp_path / "k" / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is False and meta["competition_sources"] == ["some-comp"]
    assert meta["dataset_sources"] == ["alice/llmft-wheelhouse"] and meta["machine_shape"] == "NvidiaTeslaT4"
    pushed = nbformat.read(tmp_path / "k" / "notebook.ipynb", as_version=4)
    original = nbformat.read(REPO / "notebooks" / "05_codemmlu_kaggle.ipynb", as_version=4)
    cell = pushed.cells[2].source
    assert cell == (REPO / "notebooks" / "install_cell.py").read_text().rstrip("\n").replace(
        kaggle.WHEELHOUSE_LINE, 'LLMFT_WHEELHOUSE = "/kaggle/input/llmft-wheelhouse"   # set by '
        'kaggle/push_kernel.py --wheelhouse alice/llmft-wheelhouse')
    assert '"--no-index", "--find-links", LLMFT_WHEELHOUSE' in cell and "requirements-kaggle.txt" in cell
    assert [c.source for c in pushed.cells[3:]] == [c.source for c in original.cells[3:]]  # only the install cell


def test_internet_off_without_a_wheelhouse_is_refused(tmp_path, capsys, monkeypatch):
    argv = [str(REPO / "notebooks" / "01_sft.ipynb"), "--owner", "alice", "--title", "llmft SFT on a T4",
            "--no-internet", "--out", str(tmp_path / "k"), "--dry-run"]
    assert _push_kernel(argv, monkeypatch) == 2
    assert "would clone llmft from the internet: pass --wheelhouse OWNER/SLUG" in capsys.readouterr().err
    with pytest.raises(kaggle.KernelError, match="expected the dataset as OWNER/SLUG"):
        kaggle.wheelhouse_path("llmft-wheelhouse")


def test_a_notebook_without_the_install_cell_cannot_get_a_wheelhouse(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    with pytest.raises(kaggle.KernelError, match="not llmft's install cell"):
        kaggle.with_wheelhouse(nb, "alice/wh")


KEY = "0123456789abcdef0123456789abcdef"  # the shape of a Kaggle API key (32 hex digits), not a real one


def _stream(text):
    import nbformat

    return nbformat.v4.new_output("stream", name="stdout", text=text)


# (source of cell 1, its outputs, words of the form the error must name)
SECRET_FORMS = {
    "KAGGLE_KEY assigned": (f'KAGGLE_KEY="{KEY}"', [], "literal value in code"),
    "os.environ": (f'import os\nos.environ["KAGGLE_KEY"] = "{KEY}"', [], "literal value in code"),
    "os.environ, any value": ('os.environ["KAGGLE_KEY"] = "my-secret-value"', [], "literal value in code"),
    "setdefault": (f"os.environ.setdefault('KAGGLE_KEY', '{KEY}')", [], "literal value in code"),
    "the new token": ('os.environ["KAGGLE_API_TOKEN"] = "KGAT_my-new-token"', [], "literal value in code"),
    "%env": (f"%env KAGGLE_USERNAME=alice\n%env KAGGLE_KEY={KEY}", [], "%env magic"),
    "shell line": (f"!KAGGLE_KEY={KEY} kaggle kernels list", [], "shell line"),
    "single-quoted kaggle.json": (f"creds = {{'username': 'alice', 'key': '{KEY}'}}", [], "kaggle.json form"),
    "double-quoted kaggle.json": (f'creds = {{"username": "alice", "key": "{KEY}"}}', [], "kaggle.json form"),
    "key printed in an output": ('print(os.environ["KAGGLE_KEY"])', [_stream(KEY + "\n")], "in its output"),
    "kaggle.json printed in an output": ("!cat ~/.kaggle/kaggle.json",
                                         [_stream(f'{{"username":"alice","key":"{KEY}"}}')], "in its output"),
    "hub token in an output": ("print(token)", [_stream("hf_" + "b" * 34)], "Hugging Face token"),
}


@pytest.mark.parametrize("form", SECRET_FORMS)
def test_every_secret_form_stops_the_push_before_anything_is_written(form, tmp_path, capsys, monkeypatch):
    import nbformat

    source, outputs, named = SECRET_FORMS[form]
    cell = nbformat.v4.new_code_cell(source)
    cell.outputs = outputs
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# a kernel"), cell,
                                         nbformat.v4.new_code_cell("print('done')")])
    nbformat.write(nb, tmp_path / "nb.ipynb")
    out = tmp_path / "kernel"
    argv = [str(tmp_path / "nb.ipynb"), "--owner", "alice", "--title", "t is long enough", "--out", str(out),
            "--dry-run"]
    assert _push_kernel(argv, monkeypatch) == 2
    printed = capsys.readouterr()
    assert "cell 1 (code, in its " in printed.err and named in printed.err and "Kaggle Secrets" in printed.err
    assert "would run" not in printed.out and "kernel folder ready" not in printed.out
    for secret in (KEY, "my-secret-value", "KGAT_my-new-token", "hf_" + "b" * 34):
        assert secret not in printed.err + printed.out  # named by its form, never shown
    assert not out.exists()  # nothing copied into the kernel folder


def test_secrets_read_from_kaggle_secrets_are_not_refused(tmp_path):
    import nbformat

    cells = ['from kaggle_secrets import UserSecretsClient\n'
             'os.environ["KAGGLE_KEY"] = UserSecretsClient().get_secret("KAGGLE_KEY")',
             'key = os.environ.get("KAGGLE_KEY", "")', "%env KAGGLE_KEY=$key", '!KAGGLE_KEY="$KEY" kaggle kernels list',
             'print("KAGGLE_KEY", "missing")', "%env KAGGLE_KEY"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.cells[0].outputs = [_stream("task 0123456789abcdef0123456789abcdef0123 done\n")]  # 40 hex: a git hash
    nbformat.write(nb, tmp_path / "nb.ipynb")
    kaggle.validate_notebook(tmp_path / "nb.ipynb")
