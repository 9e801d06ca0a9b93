"""The offline test bed: deterministic, cached, and in the real hub shapes."""
import ast
import hashlib
import json
from pathlib import Path

import pytest

from llmft import testing


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.suffix in {".json", ".safetensors"}}


def test_tiny_assets_are_deterministic_across_caches(tmp_path, monkeypatch):
    first = testing.tiny_model_dir("llama")
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path))
    second = testing.tiny_model_dir("llama")
    assert first != second and str(second).startswith(str(tmp_path))
    assert _digest(first) == _digest(second)
    assert (second / "model.safetensors").exists() and (second / "tokenizer.json").exists()


def test_a_tiny_model_built_by_a_worker_that_is_not_rank_0_is_whole(tmp_path, monkeypatch):
    """Under torchrun, once torch.distributed is initialized, transformers' save_pretrained writes nothing on ranks
    other than 0: the tiny model a rank-1 worker built was a folder with only the tokenizer (and the two-process
    tests failed whole, now and then)."""
    from transformers.distributed import mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path))
    path = testing.tiny_model_dir("llama")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"


def test_cache_is_reused_and_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path))
    path = testing.tiny_model_dir("qwen2")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert testing.tiny_model_dir("qwen2") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert (path / ".complete").exists()
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]  # no half-written build left behind


def test_tokenizer_chat_template_marks_assistant_tokens():
    tok = testing.tiny_tokenizer()
    chat = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "2 plus 3 is 5.<|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    # digits are single tokens so number sequences stay learnable
    assert tok.tokenize("1358") == ["1", "3", "5", "8"]


def test_finetome_shape():
    ds = testing.tiny_finetome(20)
    assert set(ds.column_names) == {"conversations", "source", "score"}
    for row in ds:
        assert all(set(turn) == {"from", "value"} for turn in row["conversations"])
        assert {t["from"] for t in row["conversations"]} <= {"system", "human", "gpt"}
    assert any(len(r["conversations"]) > 3 for r in ds) and any(r["conversations"][0]["from"] == "system" for r in ds)


def test_oasst1_shape_is_a_consistent_forest():
    rows = testing.oasst1_rows(8)
    ids = {r["message_id"] for r in rows}
    assert {"message_id", "parent_id", "role", "text", "lang", "rank", "message_tree_id"} <= set(rows[0])
    for r in rows:
        assert r["role"] in {"prompter", "assistant"}
        if r["parent_id"] is None:
            assert r["role"] == "prompter" and r["message_tree_id"] == r["message_id"] and r["rank"] is None
        else:
            assert r["parent_id"] in ids
    for root in (r for r in rows if r["parent_id"] is None):
        ranks = sorted(r["rank"] for r in rows if r["parent_id"] == root["message_id"])
        assert ranks == list(range(len(ranks))) and len(ranks) >= 2
    assert {r["lang"] for r in rows} == {"en", "es"}


def test_orca_and_codemmlu_shapes():
    orca = testing.tiny_orca_dpo(9)
    assert orca.column_names == ["system", "question", "chosen", "rejected"]
    assert any(r["system"] == "" for r in orca) and all(r["chosen"] != r["rejected"] for r in orca)
    listed, stringified = testing.codemmlu_rows(5), testing.codemmlu_rows(5, stringified_choices=True)
    for a, b in zip(listed, stringified):
        assert isinstance(a["choices"], list) and ast.literal_eval(b["choices"]) == a["choices"]
        assert a["answer"] in "ABCD" and a["task_id"] == b["task_id"]


def test_smoke_mode_switch(monkeypatch):
    monkeypatch.setenv("LLMFT_SMOKE", "1")
    assert testing.smoke_mode()
    monkeypatch.setenv("LLMFT_SMOKE", "0")
    assert not testing.smoke_mode()


def test_shipped_base_is_the_recipe_and_knows_fibonacci():
    """The demo's base ships with the package; the digest it records is the recipe's as the code defines it now."""
    import llmft
    from llmft import probes

    recorded = json.loads((testing.SHIPPED_BASE / "pretraining.json").read_text())
    assert testing.pretrained_base() == testing.SHIPPED_BASE
    assert recorded["recipe_digest"] == testing.base_recipe_digest(600, 0), (
        "the tiny base's recipe changed: rebuild it with testing.pretrained_base on a fresh cache and copy it to "
        "llmft/assets/fibonacci_base")
    size = sum(f.stat().st_size for f in testing.SHIPPED_BASE.iterdir())
    assert size < 4_000_000
    model, tokenizer = llmft.load_model(str(testing.SHIPPED_BASE), max_seq_length=256, lora_r=None,
                                        load_in_4bit=False)
    table = probes.run_probe(model, tokenizer, probes.fibonacci_probe(max_items=24), progress=False)
    assert table["correct"].mean() >= 0.95 and table.loc[0, "answer"].strip().startswith("13")


def test_base_recipe_builds_and_records_its_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFT_CACHE", str(tmp_path))
    built = testing.pretrained_base(steps=2, verbose=False)
    assert built != testing.SHIPPED_BASE and (built / "model.safetensors").exists()
    assert json.loads((built / "pretraining.json").read_text())["recipe_digest"] == testing.base_recipe_digest(2, 0)
    assert testing.base_recipe_digest(2, 0) != testing.base_recipe_digest(600, 0)


def test_sequence_questions_split_without_overlap_and_answer_by_range():
    train, val = testing.sequence_mcq_rows("train"), testing.sequence_mcq_rows("val")
    assert len(train) + len(val) == 29 * 9 * 4 and len(val) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in val}  # held-out never seen in training
    for row in train[:50] + val:
        terms = [int(t) for t in row["question"].removeprefix("What is the next term of ").rstrip("?").split(", ")]
        following = 2 * terms[-1] - terms[-2]
        low, high = map(int, testing.SEQUENCE_RANGES["ABCD".index(row["answer"])].split("-"))
        assert row["choices"] == list(testing.SEQUENCE_RANGES) and low <= following <= high
    assert testing.sequence_mcq_rows("train", 5) == train[:5]
    with pytest.raises(ValueError, match="'train' or 'val'"):
        testing.sequence_mcq_rows("test")
