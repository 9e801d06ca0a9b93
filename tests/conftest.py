"""Test setup: no hub (lookups would hang 24-76 s each), tiny assets in a per-run cache, Unsloth's scratch files out of
the repository."""
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SCRATCH = Path(tempfile.mkdtemp(prefix="llmft-tests-"))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("LLMFT_CACHE", str(_SCRATCH / "cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO))

import pytest  # noqa: E402

import llmft  # noqa: E402,F401  (imports Unsloth before anything else imports trl/transformers)
from llmft import models, testing  # noqa: E402

# Unsloth's CPU mode computes in bf16 where the CPU has native bf16 (AMX / AVX512-BF16) and in fp32 elsewhere;
# UNSLOTH_CPU_BF16=0/1 forces either, and CI runs the suite both ways. Tests comparing two computations use TOL.
BF16 = models.cpu_compute_dtype() == "bfloat16"
TOL = {"rel": 5e-3, "abs": 3e-2} if BF16 else {"rel": 1e-5, "abs": 1e-5}


def pytest_collection_modifyitems(config, items):
    """Tests that neither train nor compare numbers (installs, packaging) run once, in the fp32 pass."""
    if os.environ.get("UNSLOTH_CPU_BF16", "").strip() == "1":
        skip = pytest.mark.skip(reason="precision-independent: runs in the UNSLOTH_CPU_BF16=0 pass")
        for item in items:
            if "precision_independent" in item.keywords:
                item.add_marker(skip)


def pytest_report_header(config):
    return f"llmft: Unsloth CPU compute dtype = {models.cpu_compute_dtype()} (UNSLOTH_CPU_BF16=" \
           f"{os.environ.get('UNSLOTH_CPU_BF16', '<unset>')})"


@pytest.fixture(scope="session", autouse=True)
def _work_in_scratch_dir():
    """Unsloth writes _unsloth_sentencepiece_temp/ and compiled caches into the cwd: keep them out of the repo."""
    previous = os.getcwd()
    os.chdir(_SCRATCH)
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def tiny_dir():
    return str(testing.tiny_model_dir("llama"))


@pytest.fixture()
def lora_model(tiny_dir):
    """A fresh 4-bit tiny Llama with LoRA r=8 and its tokenizer (training mutates it, so one per test)."""
    return llmft.load_model(tiny_dir, max_seq_length=128, lora_r=8, lora_alpha=16)


@pytest.fixture(scope="session")
def chat_dataset():
    return llmft.sharegpt_to_messages(testing.tiny_finetome(64), verbose=False)


CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "user", "content": "Explain LoRA in one sentence."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a short poem about the color blue."}],
]
