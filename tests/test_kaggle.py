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
    with pytest.raises(kaggle.KernelError, match="cell 0: contains what looks like a Hugging Face token"):
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
