"""Intruder dimensions (Shuttleworth et al. 2024) on a 4-bit base and their repair, on the tiny model through Unsloth."""
import math
import re

import matplotlib
import pandas as pd
import pytest
import torch

import llmft
from llmft import analysis, probes
from llmft.generation import generate_batch

from conftest import BF16, TOL

pytestmark = pytest.mark.numeric  # SVDs and scores of weights trained in Unsloth's CPU precision

matplotlib.use("Agg")
PLANTED = "base_model.model.model.layers.0.self_attn.q_proj"
PROMPTS = ["Continue: 1, 1, 2, 3, 5, 8", "What is 3 plus 4?"]


def _modules(model):
    return dict(analysis.lora_modules(model))


def _plant(layer, delta):
    """Set lora_A / lora_B by hand so that the adapter's update scaling * B @ A is ``delta`` (rank <= r)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r, scaling = layer.r["default"], layer.scaling["default"]
    root = (s[:r] / scaling).sqrt()
    with torch.no_grad():
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        b.copy_((u[:, :r] * root).to(b.dtype))
        a.copy_((root[:, None] * vh[:r]).to(a.dtype))


def _plant_intruder(layer, strength=3.0):
    """An update along a direction with |cosine| 1/sqrt(n) with every left singular vector of the (square) base,
    stronger than the base's top singular value: it becomes the top singular vector of W + ΔW, an intruder."""
    w = analysis.base_weight(layer)
    assert w.shape[0] == w.shape[1]
    u_base, s_base, vh_base = torch.linalg.svd(w)
    off_base = u_base.sum(dim=1) / math.sqrt(w.shape[0])
    _plant(layer, strength * s_base[0] * torch.outer(off_base, vh_base[-1]))  # from the weakest input direction


def _logits(model, tokenizer):
    model.eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_base_weight_is_the_dequantized_4bit_weight(lora_model):
    model, _ = lora_model
    layer = _modules(model)[PLANTED]
    packed = layer.get_base_layer().weight
    assert packed.dtype == torch.uint8  # a real bitsandbytes 4-bit layer: the raw weight is packed bytes
    w = analysis.base_weight(layer)
    assert w.dtype == torch.float32 and w.shape == (layer.out_features, layer.in_features)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(packed.quant_state.dtype)
    with torch.no_grad():
        assert layer.get_base_layer()(x).float() == pytest.approx((x.float() @ w.T), **TOL)


def test_planted_off_base_direction_is_the_one_intruder(lora_model, tmp_path):
    model, _ = lora_model
    _plant_intruder(_modules(model)[PLANTED])
    table = analysis.intruder_dimensions(model)
    assert list(table.columns[:4]) == ["module", "layer", "projection", "count"]
    assert len(table) == 14 and sorted(table["layer"].unique()) == [0, 1]  # 7 projections x 2 blocks
    planted = table.set_index("module").loc["model.layers.0.self_attn.q_proj"]
    assert planted["count"] == 1 and planted["intruder_indices"] == [0]  # the top singular vector
    assert planted["min_similarity"] < 0.3 and planted["layer"] == 0 and planted["projection"] == "q_proj"
    assert table["count"].sum() == 1  # every other module is untouched (B = 0): W + ΔW = W
    fig = analysis.plot_intruders(table, tmp_path / "intruders.png")
    assert (tmp_path / "intruders.png").exists()
    assert sum(p.get_height() for p in fig.axes[0].patches) == 1


def test_update_along_the_base_top_singular_vectors_has_no_intruders(lora_model):
    model, _ = lora_model
    for layer in _modules(model).values():  # every module: scale the base's top-r singular values by 1.5
        u, s, vh = torch.linalg.svd(analysis.base_weight(layer), full_matrices=False)
        r = layer.r["default"]
        _plant(layer, 0.5 * (u[:, :r] * s[:r]) @ vh[:r])
    table = analysis.intruder_dimensions(model)
    assert (table["relative_delta"] > 0.2).all()  # a large update ...
    assert (table["count"] == 0).all() and (table["min_similarity"] > 0.9).all()  # ... along the base's directions
    # the same update turned by the off-base construction is found: the count is not blind
    _plant_intruder(_modules(model)[PLANTED])
    assert analysis.intruder_dimensions(model)["count"].sum() == 1


def test_lambda_one_reproduces_the_adapter_and_lambda_zero_removes_the_intruder(lora_model):
    model, tokenizer = lora_model
    _plant_intruder(_modules(model)[PLANTED], strength=1.5)  # above the base's top singular value: a clean intruder
    assert analysis.intruder_dimensions(model)["count"].sum() == 1
    before = _logits(model, tokenizer)
    text_before = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False)
    a_before = _modules(model)[PLANTED].lora_A["default"].weight.detach().clone()
    original = analysis.reduce_intruders(model, 1.0)
    assert not torch.equal(_modules(model)[PLANTED].lora_A["default"].weight, a_before)  # refactorised...
    assert _logits(model, tokenizer) == pytest.approx(before, **TOL)  # ... to the same outputs
    assert generate_batch(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False) == text_before
    analysis.set_lora_factors(model, original)
    analysis.reduce_intruders(model, 0.0)
    removed = analysis.intruder_dimensions(model)
    assert removed["count"].sum() == 0
    assert (_logits(model, tokenizer) - before).abs().max() > 1e-2  # λ = 0 really changed the model
    analysis.set_lora_factors(model, original)
    assert _logits(model, tokenizer) == pytest.approx(before, **TOL)


def test_repair_sweep_table_choice_and_saved_adapter(lora_model, tmp_path):
    model, tokenizer = lora_model
    _plant_intruder(_modules(model)[PLANTED], strength=1.5)
    original = analysis.lora_factors(model)
    before = _logits(model, tokenizer)
    reference = tokenizer(["1, 1, 2, 3, 5, 8, 13, 21"], return_tensors="pt")

    def task(m, tok):  # mean log-probability of a reference continuation: higher is better
        m.eval()
        with torch.no_grad():
            return -m(**reference, labels=reference["input_ids"]).loss.item()

    result = analysis.repair_sweep(model, tokenizer, probes.fibonacci_probe(max_items=2), task,
                                   lambdas=(0.0, 0.5), max_task_drop=0.05, save_dir=tmp_path / "repaired",
                                   max_new_tokens=4)
    table = result.table
    assert list(table["mitigation_lambda"]) == [1.0, 0.0, 0.5]
    assert list(table["modules_changed"]) == [0, 1, 1]
    allowed = table[table["task"] >= table["task"].iloc[0] - 0.05]
    best = allowed.sort_values(["probe", "mitigation_lambda"], ascending=False).iloc[0]["mitigation_lambda"]
    assert result.chosen_lambda == best and table["chosen"].sum() == 1
    for name, (a, b) in analysis.lora_factors(model).items():  # the model keeps its original adapter
        assert torch.equal(a, original[name][0]) and torch.equal(b, original[name][1])
    assert _logits(model, tokenizer) == pytest.approx(before, **TOL)
    intruders = analysis.intruder_dimensions(model)  # the sweep's own table: the same SVDs, the original adapter
    assert intruders["count"].sum() >= 1
    pd.testing.assert_frame_equal(result.intruders, intruders)
    assert (tmp_path / "repaired" / "repair_sweep.csv").exists()
    reloaded, tok2 = llmft.load_model(result.path, max_seq_length=128)
    result.apply(model)
    assert _logits(reloaded, tok2) == pytest.approx(_logits(model, tokenizer), **TOL)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        analysis.repair_sweep(model, tokenizer, probes.fibonacci_probe(max_items=1), task, lambdas=(2.0,))
    with pytest.raises(ValueError, match=r"adapters are \['default'\]"):
        analysis.intruder_dimensions(model, adapter="sft")


def test_same_math_as_peft_on_an_unquantized_base(tiny_dir):
    """PEFT's reduce_intruder_dimension cannot read a 4-bit base; on a 16/32-bit one it runs, and agrees with ours."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model, _ = llmft.load_model(tiny_dir, max_seq_length=128, load_in_4bit=False, lora_r=8, lora_alpha=16)
    modules = _modules(model)
    _plant_intruder(modules[PLANTED], strength=1.5)
    _plant_intruder(modules[PLANTED.replace("layers.0", "layers.1").replace("q_proj", "o_proj")], strength=2.0)
    counts = analysis.intruder_dimensions(model).set_index("module")["count"]
    original = analysis.reduce_intruders(model, 0.5)
    ours = {name: layer.get_delta_weight("default").detach().float().clone() for name, layer in modules.items()}
    analysis.set_lora_factors(model, original)
    logged = []
    reduce_intruder_dimension(model, mitigation_lambda=0.5, logging_sink=logged.append)
    peft_counts = {}
    for line in logged:
        match = re.match(r"(.+): (?:Intruders: (\d+)|No intruders)", line)
        if match:
            peft_counts[analysis._short(match.group(1))] = int(match.group(2) or 0)
    assert peft_counts == counts.to_dict() and sum(peft_counts.values()) == 2
    for name, layer in modules.items():
        theirs = layer.get_delta_weight("intruder_reduced").detach().float()
        # PEFT casts its new factors to the base's dtype (bf16 under UNSLOTH_CPU_BF16=1); ours keep the adapter's
        close = 1e-2 * float(theirs.abs().max()) if BF16 else 1e-4
        assert ours[name] == pytest.approx(theirs, rel=1e-3, abs=close), name
