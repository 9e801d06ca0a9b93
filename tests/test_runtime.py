"""The GPU guard, the preflight line and the output folder (no GPU here: CUDA is faked where a GPU is needed)."""
import os
import sys
import types
from collections import namedtuple

import pytest
import torch

import llmft
from llmft import runtime

from conftest import REPO

HUB_ID = "unsloth/Llama-3.2-3B-Instruct-bnb-4bit"


@pytest.fixture()
def no_opt_in(monkeypatch):
    for name in ("LLMFT_SMOKE", "LLMFT_ALLOW_CPU", "KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "COLAB_RELEASE_TAG",
                 "COLAB_GPU", "LLMFT_DRIVE"):
        monkeypatch.delenv(name, raising=False)
    assert not torch.cuda.is_available()


def test_load_model_of_a_hub_id_without_cuda_stops_with_the_t4_howto(no_opt_in):
    with pytest.raises(runtime.NoGPUError) as err:
        llmft.load_model(HUB_ID)
    message = str(err.value)
    assert f"load_model('{HUB_ID}'): no CUDA GPU" in message
    assert "Runtime > Change runtime type > Hardware accelerator: T4 GPU" in message  # Colab
    assert "Accelerator > GPU T4 x2" in message  # Kaggle
    assert "LLMFT_ALLOW_CPU=1" in message and "CPU-only build" in message  # torch here is the CPU build


@pytest.mark.parametrize("opt_in", ["argument", "env", "smoke"])
def test_the_cpu_opt_in_passes_the_guard(no_opt_in, monkeypatch, opt_in):
    kwargs = {"allow_cpu": True} if opt_in == "argument" else {}
    if opt_in != "argument":
        monkeypatch.setenv("LLMFT_ALLOW_CPU" if opt_in == "env" else "LLMFT_SMOKE", "1")
    # Past the guard, the next check is the offline hub lookup (HF_HUB_OFFLINE=1 in tests): it fails differently.
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1 is set"):
        llmft.load_model(HUB_ID, **kwargs)


def test_local_model_directories_load_on_cpu_without_opt_in(no_opt_in, tiny_dir):
    model, _ = llmft.load_model(tiny_dir, max_seq_length=64, lora_r=None)
    assert model is not None


Props = namedtuple("Props", "name major minor total_memory")


def _fake_gpus(monkeypatch, name, capability, count=1, arch_list=("sm_75", "sm_80", "sm_90")):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=0: Props(name, *capability, int(15.6 * 2**30)))


def test_a_p100_is_refused_and_a_t4_is_not(no_opt_in, monkeypatch):
    _fake_gpus(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    with pytest.raises(runtime.NoGPUError, match=r"Tesla P100-PCIE-16GB \(sm_60\).*no kernel image.*GPU T4 x2"):
        runtime.require_gpu("load_model('x')")
    _fake_gpus(monkeypatch, "Tesla T4", (7, 5))
    runtime.require_gpu("load_model('x')")


def test_preflight_prints_one_line_once_and_notes_two_gpus(no_opt_in, monkeypatch, capsys):
    _fake_gpus(monkeypatch, "Tesla T4", (7, 5), count=2)
    monkeypatch.setattr(runtime, "_preflight_printed", False)
    info = runtime.preflight()
    runtime.preflight()
    out = capsys.readouterr().out
    assert out.count("llmft preflight:") == 1
    assert "Tesla T4 (sm_75, 15.6 GiB) | precision float16 (no bf16 on this GPU) | torch " in out
    assert f"Unsloth {llmft._unsloth.metadata.version('unsloth')}" in out
    assert "2 GPUs visible; Unsloth trains on one" in out and info["gpu_count"] == 2
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    _fake_gpus(monkeypatch, "Tesla T4", (7, 5), count=1)
    assert any("training on GPU 0 only" in note for note in runtime.preflight(force=True)["notes"])



def test_preflight_on_a_cpu_says_which_opt_in_allowed_it_or_that_none_did(no_opt_in, monkeypatch, capsys):
    info = runtime.preflight(force=True)
    out = capsys.readouterr().out
    assert "CPU (no CUDA GPU; neither smoke mode nor LLMFT_ALLOW_CPU=1 is set" in info["line"]
    assert "allowed by" not in out  # it used to claim an opt-in that was not there
    assert "note: no GPU: load_model of a hub model stops here; to get a T4: Colab: Runtime > Change runtime" in out
    monkeypatch.setenv("LLMFT_ALLOW_CPU", "1")
    info = runtime.preflight(force=True)
    assert "CPU (no CUDA GPU; LLMFT_ALLOW_CPU=1 set: on the CPU on purpose)" in info["line"] and not info["notes"]
    monkeypatch.delenv("LLMFT_ALLOW_CPU")
    info = runtime.preflight(force=True, allow_cpu=True)  # what load_model(..., allow_cpu=True) passes on
    assert "CPU (no CUDA GPU; allow_cpu=True: on the CPU on purpose)" in info["line"] and not info["notes"]
    monkeypatch.setenv("LLMFT_SMOKE", "1")
    assert "CPU (no CUDA GPU; smoke mode (LLMFT_SMOKE=1)" in runtime.preflight(force=True)["line"]

def test_output_dir_by_platform(no_opt_in, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert runtime.output_dir("01_sft") == os.path.join("outputs", "01_sft") and (tmp_path / "outputs/01_sft").is_dir()
    assert runtime.output_dir() == "outputs"

    monkeypatch.setattr(runtime, "KAGGLE_WORKING", str(tmp_path / "kaggle-working"))
    (tmp_path / "kaggle-working").mkdir()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert runtime.output_dir("05") == str(tmp_path / "kaggle-working" / "05")
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")

    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-x")
    drive_root = tmp_path / "drive" / "MyDrive" / "llmft"
    monkeypatch.setattr(runtime, "DRIVE_ROOT", str(drive_root))
    assert runtime.output_dir("01_sft") == os.path.join("outputs", "01_sft")  # Drive not mounted, not asked
    assert "lost when Colab recycles the VM" in capsys.readouterr().out
    mounted = []
    fake_drive = types.SimpleNamespace(mount=lambda where: (mounted.append(where), drive_root.parent.mkdir(parents=True)))
    colab = types.ModuleType("google.colab")
    colab.drive = fake_drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", fake_drive)
    assert runtime.output_dir("01_sft", drive=True) == str(drive_root / "01_sft") and mounted == [runtime.DRIVE_MOUNT]
    assert runtime.output_dir("02_dpo") == str(drive_root / "02_dpo") and len(mounted) == 1  # mounted: used as is


def _adapters(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return str(folder)


def test_previous_adapters_are_found_where_each_platform_keeps_them_or_stop_with_how_to_bring_them(
        no_opt_in, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    find = dict(made_by="01_sft.ipynb", switch="FROM_BASE = True")
    with pytest.raises(FileNotFoundError) as err:
        runtime.previous_adapters("01_sft", **find)
    message = str(err.value)
    assert message.startswith("The adapters of 01_sft.ipynb are not here (looked in outputs/01_sft/adapters)")
    assert "- Colab: run 01_sft.ipynb with DRIVE = True (it saves to Google Drive, " in message
    assert "- Kaggle: run 01_sft.ipynb and Save Version; in this notebook, Add Input" in message
    assert message.endswith("Or go on without them: FROM_BASE = True in this notebook's settings.")
    assert runtime.previous_adapters("01_sft", missing_ok=True, **find) is None
    assert "no adapters from 01_sft.ipynb (looked in outputs/01_sft/adapters); going on without them (FROM_BASE = " \
           "True)." in capsys.readouterr().out
    (tmp_path / "outputs" / "01_sft" / "adapters").mkdir()  # a folder without adapters is not taken for them
    with pytest.raises(FileNotFoundError):
        runtime.previous_adapters("01_sft", **find)
    (tmp_path / "outputs" / "01_sft" / "adapters" / "adapter_config.json").write_text("{}")
    assert runtime.previous_adapters("01_sft", **find) == os.path.join("outputs", "01_sft", "adapters")

    # Kaggle: the earlier notebook's saved output, attached to this one as an input
    monkeypatch.setattr(runtime, "KAGGLE_WORKING", str(tmp_path / "kaggle-working"))
    monkeypatch.setattr(runtime, "KAGGLE_INPUT", str(tmp_path / "kaggle-input"))
    (tmp_path / "kaggle-working").mkdir()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    with pytest.raises(FileNotFoundError, match=r"kaggle-input/\*\*/01_sft/adapters\)"):
        runtime.previous_adapters("01_sft", **find)
    attached = _adapters(tmp_path / "kaggle-input" / "llmft-01-sft" / "01_sft" / "adapters")
    assert runtime.previous_adapters("01_sft", **find) == attached
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")

    # Colab: on Google Drive, where notebook 01 saved them with DRIVE = True
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-x")
    drive_root = tmp_path / "drive" / "MyDrive" / "llmft"
    monkeypatch.setattr(runtime, "DRIVE_ROOT", str(drive_root))
    on_drive = _adapters(drive_root / "02_dpo" / "adapters")
    assert runtime.previous_adapters("02_dpo", made_by="02_dpo.ipynb") == on_drive

_CONCURRENT_BUILD = """
import sys, time
from pathlib import Path
from llmft.runtime import build_atomically

def build(tmp):
    with open(sys.argv[2], "a") as log:
        log.write("built\\n")
    (tmp / "config.json").write_text("{}")
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    (tmp / "model.safetensors").write_text("weights")

print(sorted(p.name for p in build_atomically(Path(sys.argv[1]), build).iterdir()))
"""


def test_processes_building_one_folder_at_once_build_it_once(tmp_path):
    """The workers of one torchrun job build the same tiny model at the same moment: one builds, the other waits for
    it and reuses the complete folder (two workers building together once left a folder with a part of the files)."""
    import subprocess

    target, log = tmp_path / "cache" / "model-x", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    workers = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_BUILD, str(target), str(log)], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert all(w.returncode == 0 for w in workers)
    assert outputs == ["['.complete', 'config.json', 'model.safetensors']"] * 3
    assert log.read_text() == "built\n"  # once
    (target / ".complete").unlink()  # a folder left without its marker is built again, not trusted
    assert "model.safetensors" in subprocess.run([sys.executable, "-c", _CONCURRENT_BUILD, str(target), str(log)],
                                                 env=env, capture_output=True, text=True, timeout=120).stdout
    assert log.read_text() == "built\nbuilt\n"
