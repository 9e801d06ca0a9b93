"""Intruder dimensions of LoRA adapters, and their repair.

Shuttleworth et al. (2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence") find that LoRA fine-tuning puts
*intruder dimensions* into a weight matrix: top singular vectors of the tuned weight W + ΔW that are nearly
orthogonal to every singular vector of the pretrained W (full fine-tuning does not), and that they go with forgetting.
A singular vector u_i of W + ΔW (i among the top ``top_k``) is an intruder when max_j |cos(u_i, u_j(W))| < ``epsilon``;
the paper's defaults are k = 10 and ε = 0.5. Scaling the intruder directions down by a factor λ recovers much of the
pretrained behaviour at a small cost on the task.

PEFT 0.21 implements the repair as ``peft.tuners.lora.intruders.reduce_intruder_dimension``, but it reads
``get_base_layer().weight``, which on a 4-bit (QLoRA) model is bitsandbytes' packed uint8 data: the SVD then runs on
the packed bytes and the subtraction fails with a shape error, after the function has already added its new adapter.
So this module does the same math on the dequantized base weight
(``bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)``), with two changes that do not change the
result: the mitigated update is computed as ΔW + (λ - 1)·(intruder part) instead of (W + ΔW + ...) - W (no
cancellation against W, so λ = 1 gives back the adapter to rounding), and its rank-r refactorisation uses the
low-rank structure (QR of the two factors, then an SVD of an (r + n) x (r + n) core) instead of a full SVD, which
matters for a sweep on a 3B model. ``tests/test_analysis.py`` checks the result against PEFT's function on an
unquantized base.

- :func:`intruder_dimensions`: per adapted module, the count of intruder dimensions, in a tidy DataFrame.
- :func:`plot_intruders`: the counts over layers.
- :func:`reduce_intruders`: the repair at one λ, in place (returns what undoes it).
- :func:`repair_sweep`: the repair over several λ, each scored on a forgetting probe and the task, with a choice.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

TOP_K = 10  # Shuttleworth et al. (2024): the top 10 singular vectors of W + ΔW are examined
EPSILON = 0.5  # ... and one is an intruder when its best |cosine| with the base's singular vectors is below 0.5


def base_weight(layer):
    """The base weight of a LoRA layer as a float32 matrix (out_features x in_features): dequantized when the base
    is a bitsandbytes 4-bit layer (whose ``weight`` holds packed bytes), as is otherwise."""
    import torch

    weight = layer.get_base_layer().weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, quant_state).float()
    if getattr(weight, "SCB", None) is not None or not weight.dtype.is_floating_point:
        raise TypeError(f"base_weight: a {weight.dtype} base weight of shape {tuple(weight.shape)} (8-bit?) cannot be "
                        "dequantized here; load the model in 4-bit (load_in_4bit=True) or 16-bit for this analysis")
    return weight.data.to(torch.float32)


def lora_modules(model, adapter: str = "default") -> list[tuple[str, object]]:
    """``(name, layer)`` of every LoRA-adapted linear layer of ``model`` carrying ``adapter``."""
    from peft.tuners.lora import LoraLayer

    found, names = [], set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            names.update(module.lora_A.keys())
            if adapter in module.lora_A:
                found.append((name, module))
    if not found:
        raise ValueError(f"no LoRA layer carries an adapter named {adapter!r}"
                         + (f"; the model's adapters are {sorted(names)}" if names else
                            "; the model has no LoRA adapters (load it with llmft.load_model, lora_r set)"))
    return found


def _short(name: str) -> str:
    return re.sub(r"^(base_model\.model\.)+", "", name)


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


@dataclass
class _Spectrum:
    """What a module's repair needs from its SVDs, kept small: the intruder directions only."""

    similarity: object  # best |cos| of each of the top-k singular vectors of W + ΔW with the base's
    intruders: list[int]
    u: object  # U[:, intruders] of W + ΔW
    s: object  # S[intruders]
    vh: object  # Vh[intruders]
    relative_delta: float  # ||ΔW||_F / ||W||_F


def _spectrum(layer, adapter: str, top_k: int, epsilon: float) -> _Spectrum:
    import torch

    with torch.no_grad():
        w = base_weight(layer)
        delta = layer.get_delta_weight(adapter).to(device=w.device, dtype=torch.float32)
        u_base = torch.linalg.svd(w, full_matrices=False).U
        u, s, vh = torch.linalg.svd(w + delta, full_matrices=False)
        similarity = (u[:, :top_k].T @ u_base).abs().max(dim=1).values  # as PEFT's reduce_intruder_dimension
        intruders = torch.where(similarity < epsilon)[0].tolist()
        return _Spectrum(similarity.cpu(), intruders, u[:, intruders].clone(), s[intruders].clone(),
                         vh[intruders].clone(), float(delta.norm() / w.norm()))


def _spectra(model, adapter: str, top_k: int, epsilon: float) -> dict[str, tuple[object, _Spectrum]]:
    if top_k < 1 or not 0.0 < epsilon <= 1.0:
        raise ValueError(f"intruder analysis: need top_k >= 1 and 0 < epsilon <= 1, got top_k={top_k}, "
                         f"epsilon={epsilon} (the paper's defaults: top_k=10, epsilon=0.5)")
    return {name: (layer, _spectrum(layer, adapter, top_k, epsilon)) for name, layer in lora_modules(model, adapter)}


def _table(spectra: dict):
    import pandas as pd

    rows = []
    for name, (_, spec) in spectra.items():
        rows.append({"module": _short(name), "layer": _layer_index(name), "projection": name.rsplit(".", 1)[-1],
                     "count": len(spec.intruders), "min_similarity": float(spec.similarity.min()),
                     "intruder_indices": list(spec.intruders),
                     "similarities": [round(float(v), 4) for v in spec.similarity],
                     "relative_delta": spec.relative_delta})
    return pd.DataFrame(rows)


def intruder_dimensions(model, adapter: str = "default", top_k: int = TOP_K, epsilon: float = EPSILON):
    """Intruder dimensions (Shuttleworth et al. 2024) of each module adapted by ``adapter``: one row per module with
    ``module``, ``layer`` (block index), ``projection`` (q_proj, ...), ``count`` (intruders among the top ``top_k``
    singular vectors of W + ΔW), ``min_similarity`` (the lowest best-|cosine| among them), ``intruder_indices`` (their
    ranks, 0 = the largest singular value), ``similarities`` (all top-k best |cosines|) and ``relative_delta``
    (||ΔW|| / ||W||, Frobenius). Works on 4-bit bases (the base weight is dequantized). Two SVDs per module, on the
    weights' device: seconds per module for a 3B model on a T4."""
    return _table(_spectra(model, adapter, top_k, epsilon))


def plot_intruders(table, path: str | os.PathLike | None = None, title: str = "Intruder dimensions by layer"):
    """Intruder counts (from :func:`intruder_dimensions`) over layers, stacked by projection."""
    import matplotlib.pyplot as plt

    counts = table.pivot_table(index="layer", columns="projection", values="count", aggfunc="sum", fill_value=0)
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = None
    for projection in counts.columns:
        values = counts[projection].to_numpy()
        ax.bar(counts.index, values, bottom=bottom, label=projection)
        bottom = values if bottom is None else bottom + values
    k = len(table["similarities"].iloc[0]) if len(table) else TOP_K
    ax.set(xlabel="layer", ylabel=f"intruder dimensions (top {k})", title=title)
    ax.set_xticks(list(counts.index))
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---- repair ----

def lora_factors(model, adapter: str = "default") -> dict[str, tuple]:
    """Copies of ``(lora_A, lora_B)`` weights of every module carrying ``adapter``: an adapter's state in memory."""
    return {name: (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone())
            for name, layer in lora_modules(model, adapter)}


def set_lora_factors(model, factors: dict, adapter: str = "default") -> None:
    """Write ``factors`` (from :func:`lora_factors` or a repair) into ``adapter``, keeping its dtype and device."""
    import torch

    with torch.no_grad():
        for name, layer in lora_modules(model, adapter):
            if name in factors:
                a, b = factors[name]
                for param, value in ((layer.lora_A[adapter].weight, a), (layer.lora_B[adapter].weight, b)):
                    param.copy_(value.to(device=param.device, dtype=param.dtype))


def _mitigated(layer, adapter: str, spec: _Spectrum, mitigation_lambda: float):
    """Rank-r factors (A, B) of ΔW + (λ - 1)·U_i S_i V_iᵀ, divided by the LoRA scaling (PEFT's recipe), or None
    when the module has no intruders (its adapter is kept as is)."""
    import torch

    if not spec.intruders:
        return None
    a = layer.lora_A[adapter].weight.detach().float()
    b = layer.lora_B[adapter].weight.detach().float()
    scaling = layer.scaling[adapter]
    # ΔW / scaling + (λ - 1)/scaling · U_i S_i V_iᵀ = left @ right, inner dimension r + n_intruders
    left = torch.cat([b, (mitigation_lambda - 1.0) / scaling * spec.u.to(b.device) * spec.s.to(b.device)], dim=1)
    right = torch.cat([a, spec.vh.to(a.device)], dim=0)
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    rank = layer.r[adapter]
    root = s[:rank].sqrt()
    new_b = (q_left @ u[:, :rank]) * root  # share the singular values equally between B and A, as PEFT does
    new_a = root[:, None] * (vh[:rank] @ q_right.T)
    return new_a, new_b


def _repaired(model, adapter: str, spectra: dict, mitigation_lambda: float) -> dict[str, tuple]:
    factors = {}
    for name, (layer, spec) in spectra.items():
        new = _mitigated(layer, adapter, spec, mitigation_lambda)
        if new is not None:
            factors[name] = new
    return factors


def reduce_intruders(model, mitigation_lambda: float = 0.75, adapter: str = "default", top_k: int = TOP_K,
                     epsilon: float = EPSILON) -> dict[str, tuple]:
    """Scale the intruder dimensions of ``adapter`` by ``mitigation_lambda`` (Shuttleworth et al. 2024), in place:
    λ = 1 keeps the adapter (refactorised, equal to rounding), λ = 0 removes the intruder directions, values between
    trade task accuracy for retained knowledge. As PEFT's ``reduce_intruder_dimension``, the mitigated update is
    truncated back to the adapter's rank r. Returns the original factors: ``set_lora_factors(model, returned)``
    undoes it."""
    original = lora_factors(model, adapter)
    set_lora_factors(model, _repaired(model, adapter, _spectra(model, adapter, top_k, epsilon), mitigation_lambda),
                     adapter)
    return original


@dataclass
class RepairResult:
    """What :func:`repair_sweep` measured and chose.

    ``table``: one row per λ (``mitigation_lambda``, ``probe``, ``task``, ``modules_changed``, ``chosen``);
    ``chosen_lambda`` and ``factors`` (the chosen adapter's LoRA weights, in memory: :meth:`apply` writes them into a
    model); ``intruders``: the adapter's intruder dimensions as :func:`intruder_dimensions` reports them, from the
    sweep's own SVDs (no need to compute them twice); ``path``: where the chosen adapter was saved (reload with
    ``llmft.load_model(path)``), or None."""

    table: object
    chosen_lambda: float
    factors: dict = field(repr=False)
    adapter: str = "default"
    path: str | None = None
    intruders: object = field(default=None, repr=False)

    def apply(self, model) -> None:
        set_lora_factors(model, self.factors, self.adapter)


def _probe_scorer(probe, max_new_tokens: int, batch_size: int) -> Callable:
    from llmft.probes import Probe, run_probe

    if isinstance(probe, Probe):
        return lambda model, tokenizer: float(run_probe(model, tokenizer, probe, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size, progress=False)["correct"].mean())
    if callable(probe):
        return probe
    raise TypeError(f"repair_sweep(probe=...): pass an llmft.probes.Probe or a callable (model, tokenizer) -> score, "
                    f"got {type(probe).__name__}")


def repair_sweep(model, tokenizer, probe, task: Callable, lambdas: Sequence[float] = (1.0, 0.75, 0.5, 0.25, 0.0), *,
                 adapter: str = "default", top_k: int = TOP_K, epsilon: float = EPSILON, max_task_drop: float = 0.02,
                 save_dir: str | os.PathLike | None = None, max_new_tokens: int = 8, batch_size: int = 32):
    """Repair intruder dimensions at each mitigation strength λ in ``lambdas`` and score each repaired adapter on a
    forgetting ``probe`` (a :class:`llmft.probes.Probe`, scored as greedy accuracy, or a callable
    ``(model, tokenizer) -> score``) and on the ``task`` (a callable ``(model, tokenizer) -> score``, higher better,
    e.g. MCQ accuracy with :func:`llmft.mcq.score_choices`).

    The choice: among the λ whose task score is within ``max_task_drop`` of the unrepaired adapter's (λ = 1, always
    measured), the one with the best probe score; ties go to the larger λ (the smaller change). The SVDs are computed
    once for the whole sweep. The model is left with its original adapter; ``result.apply(model)`` installs the
    chosen one, and ``save_dir`` saves it (with the tokenizer and the table as ``repair_sweep.csv``). The intruder
    table of the adapter comes with the result (``result.intruders``).
    """
    import pandas as pd

    lambdas = [1.0] + [float(x) for x in lambdas if float(x) != 1.0]
    if any(not 0.0 <= x <= 1.0 for x in lambdas):
        raise ValueError(f"repair_sweep(lambdas={list(lambdas)}): λ is the share of each intruder direction kept, "
                         "in [0, 1]")
    if not callable(task):
        raise TypeError("repair_sweep(task=...): pass a callable (model, tokenizer) -> score, higher is better")
    score_probe = _probe_scorer(probe, max_new_tokens, batch_size)
    spectra = _spectra(model, adapter, top_k, epsilon)
    original = lora_factors(model, adapter)
    rows, candidates = [], {}
    try:
        for value in lambdas:
            factors = _repaired(model, adapter, spectra, value) if value != 1.0 else {}
            set_lora_factors(model, original, adapter)
            set_lora_factors(model, factors, adapter)
            candidates[value] = {**original, **factors}
            rows.append({"mitigation_lambda": value, "probe": float(score_probe(model, tokenizer)),
                         "task": float(task(model, tokenizer)), "modules_changed": len(factors)})
    finally:
        set_lora_factors(model, original, adapter)
    table = pd.DataFrame(rows)
    reference = table.loc[table["mitigation_lambda"] == 1.0, "task"].iloc[0]
    allowed = table[table["task"] >= reference - max_task_drop]
    chosen = allowed.sort_values(["probe", "mitigation_lambda"], ascending=False).iloc[0]["mitigation_lambda"]
    table["chosen"] = table["mitigation_lambda"] == chosen
    result = RepairResult(table, float(chosen), {k: (a.cpu(), b.cpu()) for k, (a, b) in candidates[chosen].items()},
                          adapter, intruders=_table(spectra))
    if save_dir is not None:
        from llmft.models import save_adapters

        try:
            result.apply(model)
            result.path = str(save_adapters(model, tokenizer, save_dir))
        finally:
            set_lora_factors(model, original, adapter)
        table.to_csv(Path(save_dir) / "repair_sweep.csv", index=False)
    return result
