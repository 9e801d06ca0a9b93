"""First contact: the notebooks' install cell, scripts/install.sh's GPU-image path and the Kaggle wheelhouse, run for
real in live Jupyter kernels of fresh virtualenvs that hold only torch (the CPU build torch==2.13.0 stands in for a
Colab/Kaggle image's CUDA torch).

The fresh virtualenv (torch + ipykernel, ~1 GB) is built once and cached in $LLMFT_TEST_VENV_CACHE (default
~/.cache/llmft-tests), then copied per test. The install itself runs every time, from the package index pip is
configured with (PIP_NO_COMPILE=1 to save time; it changes no package). The wheelhouse test is marked `wheelhouse` and
deselected by default (it downloads ~435 MB and takes ~10 minutes): run it with `python -m pytest -m wheelhouse`.
"""
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import image_constraints  # noqa: E402
import sync_install_cell  # noqa: E402

TORCH = "2.13.0"
INSTALL_CELL = (REPO / "notebooks" / "install_cell.py").read_text().rstrip("\n")


# --- one install cell, one repository URL -------------------------------------------------------------------------

def test_every_notebook_has_the_one_install_cell():
    assert sync_install_cell.main(["--check"]) == 0
    for path in sync_install_cell.notebooks():
        notebook = json.loads(path.read_text())
        assert "".join(sync_install_cell.install_cell(notebook)["source"]) == INSTALL_CELL, path.name
        assert path.read_text().count("https://github.com/llmft/llmft") == 1, path.name  # the URL lives in the cell
    assert not re.search(r"^\s*!", INSTALL_CELL, flags=re.M)  # no IPython `!`: its failures do not stop a notebook
    assert '"-e"' not in INSTALL_CELL and "--editable" not in INSTALL_CELL


# --- the constraints that keep the image's torch -------------------------------------------------------------------

@pytest.mark.slow
def test_constraints_file_holds_exactly_the_images_torch_stack(tmp_path):
    out = tmp_path / "image-constraints.txt"
    subprocess.run([sys.executable, str(REPO / "scripts" / "image_constraints.py"), str(out)], check=True)
    installed = {}
    for name in ("torch", "torchvision", "torchaudio", "triton"):
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    assert sorted(out.read_text().splitlines()) == sorted(f"{n}=={v}" for n, v in installed.items())
    import torch

    assert f"torch=={torch.__version__}" in out.read_text().splitlines()
    image = {"triton": "3.2.0", "torch": "2.6.0+cu124", "torchaudio": "2.6.0+cu124", "torchvision": "0.21.0+cu124",
             "numpy": "1.26.4"}
    assert image_constraints.constraints_text(image).splitlines() == [
        "torch==2.6.0+cu124", "torchvision==0.21.0+cu124", "torchaudio==2.6.0+cu124", "triton==3.2.0"]
    with pytest.raises(ValueError, match=r"torch is 2\.15\.0, but the pinned Unsloth needs torch>=2\.4,<2\.15"):
        image_constraints.constraints_text({"torch": "2.15.0"})


def _fake_wheel(folder: Path, name: str, version: str, *requires: str, files: dict | None = None) -> None:
    name = name.replace("-", "_")
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
        for path, text in (files or {}).items():
            wheel.writestr(path, text)


@pytest.mark.slow
def test_xformers_is_never_pinned_to_a_build_that_needs_another_torch(tmp_path):
    """xformers 0.0.35 needs torch>=2.10. Under the image's constraints pip must pick the build made for the image's
    torch (here a fake 2.6.0+cu124 image) with install.sh's own xformers requirement; without them it would take
    0.0.35 and replace torch."""
    assert "xformers" not in re.sub(r"#.*", "", (REPO / "requirements.txt").read_text())
    install_sh = (REPO / "scripts" / "install.sh").read_text()
    floor = re.search(r'XFORMERS_FLOOR="([^"]+)"', install_sh)[1]
    assert re.search(r'pipq "\$\{constrain\[@\]\}" --only-binary=xformers "\$XFORMERS_FLOOR"', install_sh)
    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(index, "torch", "2.6.0+cu124")
    _fake_wheel(index, "torch", "2.13.0")
    _fake_wheel(index, "xformers", "0.0.35", "torch>=2.10")
    _fake_wheel(index, "xformers", "0.0.29.post3", "torch==2.6.0")
    constraints = tmp_path / "image-constraints.txt"
    constraints.write_text(image_constraints.constraints_text({"torch": "2.6.0+cu124"}))

    def resolve(*extra):
        report = subprocess.run(
            [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--no-index", "--find-links", str(index), "--only-binary=xformers", "--report", "-", floor, *extra],
            check=True, capture_output=True, text=True).stdout
        return {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report)["install"]}

    assert resolve("-c", str(constraints)) == {"xformers": "0.0.29.post3", "torch": "2.6.0+cu124"}
    assert resolve() == {"xformers": "0.0.35", "torch": "2.13.0"}  # what an unconstrained install would do


# --- install.sh's order, with real pip on stand-in wheels (offline, ~1 minute) -------------------------------------

def _stand_in_index(folder: Path) -> None:
    """Wheels standing in for the pinned stack: every name of requirements.txt / requirements-unsloth.txt at a version
    its pin allows, empty but for an importable torch (CPU build), unsloth (that fails to import while
    $LLMFT_TEST_UNSLOTH_BROKEN names a file that exists) and llmft; unsloth and unsloth_zoo declare the real
    requirements of the installed releases (torchvision, triton, ... that a CPU install leaves out)."""
    from packaging.requirements import Requirement

    folder.mkdir()
    pins = {}
    for name in ("requirements.txt", "requirements-unsloth.txt"):
        for line in (REPO / name).read_text().splitlines():
            if line.split("#")[0].strip():
                req = Requirement(line.split("#")[0].strip())
                pins[req.name] = next(v for v in [s.version for s in req.specifier if s.operator in ("==", ">=")]
                                      + ["1.0"] if req.specifier.contains(v, prereleases=True))
    files = {
        "torch": {"torch/__init__.py": "__version__ = '2.13.0'\nclass version:\n    cuda = None\nclass cuda:\n"
                                       "    is_available = staticmethod(lambda: False)\n"},
        "unsloth": {"unsloth/__init__.py": "import os\nif os.path.exists(os.environ['LLMFT_TEST_UNSLOTH_BROKEN']):\n"
                                           "    raise ImportError('stand-in: Unsloth does not import with this torch')\n"},
    }
    pins.update(torch="2.13.0")
    for name, version in pins.items():
        requires = metadata.requires(name) or [] if name in ("unsloth", "unsloth_zoo") else []
        _fake_wheel(folder, name, version, *requires, files=files.get(name))
    _fake_wheel(folder, "xformers", "0.0.35", "torch>=2.10")
    _fake_wheel(folder, "llmft", "0.1.0", files={"llmft/__init__.py": ""})


@pytest.mark.slow
def test_a_failed_preflight_leaves_no_llmft_so_the_install_cell_runs_again_and_pip_prints_no_red_error(tmp_path):
    """The install cell, run twice in a fresh virtualenv as a user re-runs it: the first install fails at install.sh's
    preflight (`import unsloth`), the second, after the cause is gone, installs llmft. pip is real (offline, on
    stand-in wheels); the repository's own `pip install <clone>` becomes the stand-in llmft wheel."""
    index, work, log = tmp_path / "index", tmp_path / "work", tmp_path / "pip.log"
    _stand_in_index(index)
    work.mkdir()
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = tmp_path / "pip"
    pip.write_text(f'#!/bin/sh\necho "pip $*" >> {log}\n'
                   f'args=""; for a in "$@"; do if [ -f "$a/scripts/install.sh" ]; then a=llmft; fi; args="$args $a"; done\n'
                   f'exec {venv}/bin/python -m pip $args --no-index --find-links {index}\n')
    nvidia_smi = tmp_path / "bin" / "nvidia-smi"  # no GPU here, whatever the machine has
    nvidia_smi.parent.mkdir()
    nvidia_smi.write_text("#!/bin/sh\nexit 1\n")
    for script in (pip, nvidia_smi):
        script.chmod(0o755)
    broken = tmp_path / "unsloth-broken"
    broken.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS", "VIRTUAL_ENV",
                                                           "LLMFT_INSTALL_GPU_IMAGE")}
    env.update(PIP=str(pip), PIP_CONFIG_FILE=os.devnull, PATH=f"{nvidia_smi.parent}:{env['PATH']}",
               LLMFT_REPO=str(_snapshot_repository(tmp_path)), LLMFT_TEST_UNSLOTH_BROKEN=str(broken))

    def run_install_cell():
        return subprocess.run([str(venv / "bin" / "python"), "-c", INSTALL_CELL], cwd=work, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    first = run_install_cell()
    assert first.returncode != 0, first.stdout[-3000:]
    assert "preflight failed: import unsloth raised ImportError" in first.stdout
    assert "llmft install stopped: step 'install the pinned stack' failed" in first.stdout
    assert not [c for c in log.read_text().splitlines() if c.endswith("/llmft-src")]  # llmft never installed ...
    assert not list((venv / "lib").glob("python*/site-packages/llmft"))  # ... so the cell does not skip next time

    broken.unlink()  # the cause fixed
    second = run_install_cell()
    assert second.returncode == 0, second.stdout[-3000:]
    assert "[llmft install] preflight: import unsloth OK" in second.stdout
    assert "[llmft install] done: llmft installed." in second.stdout
    # pip checks what installed packages declare only when it resolves; unsloth (torchvision, triton: absent on a
    # CPU on purpose) goes in last with --no-deps, so no "ERROR: pip's dependency resolver" in a good install
    for output in (first.stdout, second.stdout):
        assert "dependency resolver" not in output and "requires torchvision" not in output.replace(
            "a later pip saying 'unsloth requires torchvision' is expected", "")
    assert "no torchvision (its PyPI wheel breaks transformers on CPU torch" in second.stdout
    commands = log.read_text().splitlines()
    unsloth = max(i for i, c in enumerate(commands) if "requirements-unsloth.txt" in c)
    resolving = [i for i, c in enumerate(commands) if "--no-deps" not in c]
    assert max(resolving) < unsloth, commands  # every resolving install before unsloth's
    assert commands[-1].endswith("/llmft-src"), commands  # llmft last, after the preflight

    third = run_install_cell()
    assert third.returncode == 0 and "[llmft install] llmft is already installed (" in third.stdout
    assert "nothing to do" in third.stdout and len(log.read_text().splitlines()) == len(commands)

# --- the real install cell in a live kernel of a fresh virtualenv --------------------------------------------------

@pytest.fixture(scope="session")
def torch_venv_template():
    """A virtualenv holding only torch==2.13.0 (CPU build) and ipykernel, as an image holds its torch; built once (under
    a lock: the pytest-xdist workers of one run wait for the first one's build instead of building over it)."""
    from llmft import runtime

    cache = Path(os.environ.get("LLMFT_TEST_VENV_CACHE") or Path.home() / ".cache" / "llmft-tests")

    def build(root):
        subprocess.run(["python3", "-m", "venv", str(root)], check=True)
        subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", f"torch=={TORCH}", "ipykernel"],
                       check=True)

    return runtime.build_atomically(cache / f"torch-{TORCH}-py{sys.version_info.major}{sys.version_info.minor}", build)


@pytest.fixture()
def fresh_python(torch_venv_template, tmp_path):
    venv = tmp_path / "venv"
    shutil.copytree(torch_venv_template, venv, symlinks=True)
    return str(venv / "bin" / "python")


def _torch_version(python: str) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__)"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _snapshot_repository(tmp_path) -> Path:
    """A git repository holding this working tree (tracked and new files), for the install cell to clone."""
    snapshot = tmp_path / "llmft-repo"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, snapshot / name)
    git = ["git", "-C", str(snapshot), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q", str(snapshot)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "snapshot"], check=True)
    return snapshot


def _run_notebook(cells, tmp_path, python, env, *, offline=False) -> dict:
    notebook = tmp_path / "run.ipynb"
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]), str(notebook))
    result = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "tests" / "notebook_worker.py"), str(notebook), str(workdir), python,
               str(result)]
    if offline:  # a network namespace with only a loopback: no index, no hub, no internet at all
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS")}
    subprocess.run(command, check=True, env={**full_env, "PIP_NO_COMPILE": "1", **env}, timeout=1800)
    return json.loads(result.read_text())


@pytest.mark.slow
def test_install_cell_makes_llmft_importable_in_the_same_kernel_and_keeps_torch(fresh_python, tmp_path):
    before = _torch_version(fresh_python)
    check = ("import importlib.metadata as md, torch, llmft\n"
             "print('AFTER|' + '|'.join([torch.__version__, llmft.__file__, md.version('unsloth')]))")
    result = _run_notebook([INSTALL_CELL, check], tmp_path, fresh_python,
                           {"LLMFT_REPO": str(_snapshot_repository(tmp_path)), "LLMFT_INSTALL_GPU_IMAGE": "1"})
    assert result["error"] is None, result["error"][-3000:]
    install, after = result["outputs"]
    assert "--gpu-image: GPU-image path without a GPU" in install
    assert f"keeping the image's torch=={before}" in install
    assert "[llmft install] preflight: import unsloth OK" in install and "cuda available: False" in install
    constraints = (tmp_path / "work" / "llmft-src" / "build" / "image-constraints.txt").read_text()
    assert constraints == f"torch=={before}\n"
    torch_after, llmft_file, unsloth = re.search(r"^AFTER\|(.*)$", after, flags=re.M)[1].split("|")
    assert torch_after == before == _torch_version(fresh_python)
    assert "site-packages" in llmft_file and "llmft-src" not in llmft_file  # installed, not an editable path
    assert unsloth == "2026.10.9"


@pytest.mark.slow
def test_a_failing_install_step_stops_the_notebook_and_says_how_to_retry(fresh_python, tmp_path):
    result = _run_notebook([INSTALL_CELL, "print('the next cell ran')"], tmp_path, fresh_python,
                           {"LLMFT_REPO": str(tmp_path / "no-such-repository")})
    assert "llmft install stopped: step 'clone the repository' failed (exit code 128" in result["error"]
    assert "then re-run this cell" in result["error"]
    assert result["outputs"][1] == ""  # Run All stopped at the install cell


# --- Kaggle with the internet off, end to end ----------------------------------------------------------------------

@pytest.mark.wheelhouse
def test_pushed_kernel_installs_from_the_wheelhouse_offline_and_runs_notebook_05(fresh_python, tmp_path, monkeypatch,
                                                                                 capsys):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs `unshare -n` (root) to cut the network")
    wheelhouse = Path(os.environ.get("LLMFT_TEST_WHEELHOUSE") or tmp_path / "wheelhouse")
    if not (wheelhouse / "BUILT_FOR.txt").exists():
        subprocess.run(["bash", str(REPO / "kaggle" / "build_wheelhouse.sh"), "--torch", TORCH, "--native", "--out",
                        str(wheelhouse)], check=True, env={**os.environ, "PYTHON": sys.executable})
    built_for = (wheelhouse / "BUILT_FOR.txt").read_text()
    assert f"torch {TORCH}\n" in built_for and "triton 3.7.1\n" in built_for  # the triton CUDA torch 2.13.0 pins
    wheels = [p.name for p in wheelhouse.glob("*.whl")]
    assert not [w for w in wheels if re.match(r"(torch|nvidia_|cuda_)", w) and not w.startswith("torchao")], wheels
    for needed in ("tokenizers-", "safetensors-", "pyarrow-", "packaging-", "llmft-0.1.0-", "unsloth-2026.10.9-"):
        assert any(w.startswith(needed) for w in wheels), needed

    monkeypatch.setattr(sys, "argv", ["push_kernel.py", str(REPO / "notebooks" / "05_codemmlu_kaggle.ipynb"),
                                      "--owner", "alice", "--title", "llmft CodeMMLU offline", "--wheelhouse",
                                      "alice/llmft-wheelhouse", "--out", str(tmp_path / "kernel"), "--dry-run"])
    import runpy

    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "kaggle" / "push_kernel.py"), run_name="__main__")
    assert exit_.value.code == 0
    meta = json.loads((tmp_path / "kernel" / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is False and meta["dataset_sources"] == ["alice/llmft-wheelhouse"]
    kernel = nbformat.read(tmp_path / "kernel" / "notebook.ipynb", as_version=4)
    cells = [c.source for c in kernel.cells if c.cell_type == "code"]
    mount = '"/kaggle/input/llmft-wheelhouse"'
    assert cells[0].count(mount) == 1
    cells[0] = cells[0].replace(mount, repr(str(wheelhouse)))  # where Kaggle would mount the dataset

    before = _torch_version(fresh_python)
    result = _run_notebook(cells, tmp_path, fresh_python,
                           {"LLMFT_SMOKE": "1", "PIP_CONFIG_FILE": os.devnull, "HF_HUB_OFFLINE": "1"}, offline=True)
    assert result["error"] is None, result["error"][-3000:]
    assert "install the pinned stack from the wheelhouse" in result["outputs"][0] and "--no-index" in result["outputs"][0]
    assert _torch_version(fresh_python) == before
    submission = (tmp_path / "work" / "outputs" / "submission.csv").read_text().splitlines()
    assert submission[0] == "task_id,answer" and len(submission) == 1 + 12
