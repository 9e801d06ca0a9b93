"""The offline test bed: deterministic, cached, and in the real hub shapes."""
import ast
import hashlib
from pathlib import Path

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
