"""The Kaggle tooling needs no GPU stack: push_kernel.py runs where torch, Unsloth, transformers and TRL cannot be
imported (a machine that only pushes kernels)."""
import subprocess
import sys

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
