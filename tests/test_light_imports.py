"""Light entry points: the Kaggle tooling, the configs and the command line's help need no GPU stack. They run where
torch, Unsloth, transformers and TRL cannot be imported (a machine that only pushes kernels), and `import llmft`
imports none of them until a name that needs them is used, while still putting Unsloth before transformers."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

BLOCK_HEAVY = ("import sys\n"
               "for name in ('torch', 'unsloth', 'unsloth_zoo', 'transformers', 'trl', 'peft', 'datasets'):\n"
               "    sys.modules[name] = None  # `import name` now raises ImportError\n"
               "import runpy\n"
               "sys.argv = ['push_kernel.py'] + sys.argv[1:]\n"
               "runpy.run_path({script!r}, run_name='__main__')\n")


def _push_kernel(*args, cwd):
    code = BLOCK_HEAVY.format(script=str(REPO / "kaggle" / "push_kernel.py"))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_push_kernel_help_and_checks_without_torch(tmp_path):
    help_ = _push_kernel("--help", cwd=tmp_path)
    assert help_.returncode == 0 and "--dry-run" in help_.stdout, help_.stderr
    ok = _push_kernel(str(REPO / "notebooks" / "05_codemmlu_kaggle.ipynb"), "--owner", "alice", "--title",
                      "llmft CodeMMLU", "--out", str(tmp_path / "k"), "--dry-run", cwd=tmp_path)
    assert ok.returncode == 0 and "would run: kaggle kernels push -p" in ok.stdout, ok.stderr
    assert (tmp_path / "k" / "kernel-metadata.json").exists()
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    failed = _push_kernel(str(bad), "--owner", "alice", "--title", "x", "--out", str(tmp_path / "k2"), "--dry-run",
                          cwd=tmp_path)
    assert failed.returncode == 2 and "error:" in failed.stderr and "Traceback" not in failed.stderr


def test_package_configs_and_cli_help_without_torch(tmp_path):
    code = BLOCK_HEAVY.split("import runpy")[0] + (
        "import llmft, llmft.configs, llmft.kaggle\n"
        "print(sorted(llmft.configs.SFTOptions.__dataclass_fields__)[:1], llmft.kaggle.KernelError.__name__)\n"
        "sys.argv = ['llmft', '--help']\n"
        "import runpy\n"
        "runpy.run_module('llmft', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "KernelError" in out.stdout and "usage: python -m llmft" in out.stdout, out.stderr


@pytest.mark.parametrize("override, message", [
    (("--learning_rate", "abc"), "[training]: learning_rate='abc': not a number"),
    (("--model.lora_r", "abc"), "[model]: lora_r='abc': not a number"),
    (("--per_device_train_batch_size", "0"), "[training]: per_device_train_batch_size=0"),
])
def test_a_bad_recipe_value_is_refused_before_torch_is_imported(tmp_path, override, message):
    """llmft's own fields are checked with the light configs before TRL (and so torch and Unsloth) is imported: the
    refusal takes a moment, not the seconds of the GPU stack's import."""
    code = BLOCK_HEAVY.split("import runpy")[0] + (
        f"sys.argv = ['llmft', 'train', {str(REPO / 'recipes' / '01_sft.yaml')!r}, '--smoke', *{override!r}]\n"
        "import runpy\n"
        "runpy.run_module('llmft', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


_ORDER_PROBE = """
import builtins, sys
seen = []
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("unsloth", "trl", "transformers", "peft", "torch") and name not in seen:
            seen.append(name)
        return None
sys.meta_path.insert(0, Recorder())
import llmft
print("LIGHT=" + ",".join(m for m in ("unsloth", "trl", "transformers", "peft", "torch") if m in sys.modules))
from transformers import AutoTokenizer  # what a notebook does next
print("ORDER=" + ",".join(seen))
print("RESTORED=" + str(builtins.__import__ is __import__))
import os
print("CVD=" + os.environ["CUDA_VISIBLE_DEVICES"])
"""


@pytest.mark.slow
def test_import_llmft_is_light_puts_unsloth_first_and_pins_kaggles_gpu(tmp_path):
    """`import llmft` loads nothing heavy, yet Unsloth comes before trl/transformers/peft whoever imports them, and on
    Kaggle's 2xT4 GPU 0 is pinned before torch starts."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(KAGGLE_KERNEL_RUN_TYPE="Interactive", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _ORDER_PROBE], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and line[0].isupper())
    assert lines["LIGHT"] == ""  # nothing heavy on `import llmft`
    order = [name.split(".")[0] for name in lines["ORDER"].split(",")]
    assert order.index("unsloth") < order.index("transformers") and "trl" in order and "peft" in order
    assert lines["RESTORED"] == "True"  # the import wrapper stepped aside once Unsloth was in
    assert lines["CVD"] == "0" and "Kaggle detected" in out.stdout
