"""Chebyshev learning-rate schedules, as ``torch.optim.lr_scheduler.LambdaLR`` factories.

Two different things go by "Chebyshev" here:

1. **The CodeMMLU report's series** (CodeMMLU report): lr(t) = c0/2 + Σₙ [cₙ·cos(2πnt/T) + dₙ·sin(2πnt/T)], a
   truncated Fourier/Chebyshev series in time. With this *full-period* basis every term returns to its start value at
   t = T, so the schedule ends where it began. The *half-range* basis cos(πnt/T) (the Chebyshev polynomials Tₙ(x) at
   x = cos(πt/T)) lets it end low: the default coefficients below start at the peak, fall fast early (learn the
   format quickly) and flatten late at 10% (keep old knowledge), and never go negative.
2. **Chebyshev step sizes** (Young 1953; Agarwal, Goel & Zhang, ICML 2021): the T step sizes are the reciprocals of
   the Chebyshev nodes on [1/lr_max, 1/lr_min], ηₖ = 1 / (C − R·cos((k+½)π/T)), C = (1/lr_min + 1/lr_max)/2,
   R = (1/lr_min − 1/lr_max)/2. In natural order they go from lr_max down to lr_min; in the *fractal* order the large
   and small steps interleave ([0, 7, 3, 4, 1, 6, 2, 5] for T = 8), which keeps the iterates stable.

Every factory takes ``(optimizer, num_training_steps)`` plus options and returns a ``LambdaLR`` whose multiplier is
relative to the optimizer's learning rate (the peak). Warmup is linear from 0. The schedule is a pure function of the
step, so a resumed run (which restores the scheduler's step count) continues on the same curve.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

# Half-range defaults: f(0) = 1.0, f(T/2) = 0.45, f(T) = 0.1; monotone, fast early and slow late.
DEFAULT_HALF_RANGE_COEFFS = (1.0, 0.45, 0.05)


def _warmup(step: int, warmup_steps: int) -> float | None:
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    return None


def chebyshev_series(t: float, T: float, cos_coeffs: Sequence[float], sin_coeffs: Sequence[float] = (),
                     basis: str = "half") -> float:
    """The CodeMMLU report's series at time ``t`` of ``T``: c0/2 + Σₙ cₙ·cos(kπnt/T) + dₙ·sin(kπnt/T), k = 2 for
    ``basis="full"`` (period T) and 1 for ``basis="half"`` (half a period over the run, so it can end low).
    ``sin_coeffs[0]`` multiplies n = 1."""
    if basis not in ("half", "full"):
        raise ValueError(f"basis={basis!r}: use 'half' (cos(pi n t/T), can end low) or 'full' (period T)")
    k = 1.0 if basis == "half" else 2.0
    value = cos_coeffs[0] / 2
    for n, c in enumerate(cos_coeffs[1:], start=1):
        value += c * math.cos(k * math.pi * n * t / T)
    for n, d in enumerate(sin_coeffs, start=1):
        value += d * math.sin(k * math.pi * n * t / T)
    return value


def series_multipliers(num_steps: int, cos_coeffs: Sequence[float] = DEFAULT_HALF_RANGE_COEFFS,
                       sin_coeffs: Sequence[float] = (), basis: str = "half") -> list[float]:
    """Multipliers for steps 0..num_steps, normalised so the peak is 1.0 (the optimizer's lr). Raises if the series
    goes negative, naming the first bad step."""
    T = max(1, num_steps)
    raw = [chebyshev_series(t, T, cos_coeffs, sin_coeffs, basis) for t in range(T + 1)]
    peak = max(raw)
    if peak <= 0:
        raise ValueError(f"chebyshev series is never positive (coefficients {list(cos_coeffs)}, "
                         f"{list(sin_coeffs)})")
    for t, value in enumerate(raw):
        if value < -1e-12:
            raise ValueError(f"chebyshev series is negative ({value:.4g}) at step {t} of {T}; adjust the "
                             f"coefficients so c0/2 outweighs the other terms")
    return [max(0.0, v) / peak for v in raw]


def chebyshev_nodes_steps(num_steps: int, lr_max: float, lr_min: float) -> list[float]:
    """Step sizes ηₖ = 1/(C − R·cos((k+½)π/T)) for k = 0..T-1: reciprocals of the Chebyshev nodes on
    [1/lr_max, 1/lr_min], from ≈lr_max (k = 0) down to ≈lr_min."""
    if not 0 < lr_min <= lr_max:
        raise ValueError(f"need 0 < lr_min <= lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    T = max(1, num_steps)
    C = (1 / lr_min + 1 / lr_max) / 2
    R = (1 / lr_min - 1 / lr_max) / 2
    return [1 / (C - R * math.cos((k + 0.5) * math.pi / T)) for k in range(T)]


def fractal_order(n: int) -> list[int]:
    """Agarwal, Goel & Zhang's fractal permutation of 0..n-1: σ₁ = [0], σ₂ₘ interleaves σₘ with 2m−1−σₘ
    (σ₈ = [0, 7, 3, 4, 1, 6, 2, 5]). For n not a power of two, σ of the next power with indices ≥ n removed."""
    if n < 1:
        raise ValueError(f"fractal_order({n}): need n >= 1")
    order = [0]
    while len(order) < n:
        m = len(order)
        order = [x for pair in zip(order, [2 * m - 1 - i for i in order]) for x in pair]
    return [i for i in order if i < n]


def _lambda_series(step: int, *, warmup_steps: int, multipliers: list[float]) -> float:
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    return multipliers[min(step - warmup_steps, len(multipliers) - 1)]


def chebyshev_schedule(optimizer, num_training_steps: int, *, warmup_steps: int = 0,
                       cos_coeffs: Sequence[float] = DEFAULT_HALF_RANGE_COEFFS, sin_coeffs: Sequence[float] = (),
                       basis: str = "half", last_epoch: int = -1):
    """LambdaLR following the CodeMMLU report's Chebyshev series after ``warmup_steps`` of linear warmup."""
    from torch.optim.lr_scheduler import LambdaLR

    multipliers = series_multipliers(num_training_steps - warmup_steps, cos_coeffs, sin_coeffs, basis)
    return LambdaLR(optimizer, partial(_lambda_series, warmup_steps=warmup_steps, multipliers=multipliers),
                    last_epoch)


def chebyshev_step_schedule(optimizer, num_training_steps: int, *, min_ratio: float = 0.1, warmup_steps: int = 0,
                            fractal: bool = False, last_epoch: int = -1):
    """LambdaLR with Chebyshev step sizes between the optimizer's lr (the peak) and ``min_ratio`` × lr, in natural
    order (decreasing) or the fractal order (``fractal=True``), after linear warmup."""
    from torch.optim.lr_scheduler import LambdaLR

    if not 0 < min_ratio <= 1:
        raise ValueError(f"chebyshev_step_schedule(min_ratio={min_ratio}): need 0 < min_ratio <= 1")
    T = max(1, num_training_steps - warmup_steps)
    steps = chebyshev_nodes_steps(T, 1.0, min_ratio)
    if fractal:
        steps = [steps[i] for i in fractal_order(T)]
    return LambdaLR(optimizer, partial(_lambda_series, warmup_steps=warmup_steps, multipliers=steps), last_epoch)


SCHEDULES: dict[str, Callable] = {
    "chebyshev": chebyshev_schedule,
    "chebyshev_full": partial(chebyshev_schedule, basis="full", cos_coeffs=(1.2, 0.3), sin_coeffs=(0.3,)),
    "chebyshev_steps": chebyshev_step_schedule,
    "chebyshev_fractal": partial(chebyshev_step_schedule, fractal=True),
}


def resolve_schedule(scheduler, **options) -> Callable:
    """``scheduler`` as a factory ``(optimizer, num_training_steps) -> LambdaLR``: a name from :data:`SCHEDULES`
    (options bound), or a callable used as is."""
    if callable(scheduler):
        return partial(scheduler, **options) if options else scheduler
    if scheduler not in SCHEDULES:
        raise ValueError(f"scheduler={scheduler!r}: unknown; use one of {sorted(SCHEDULES)} or a callable "
                         "(optimizer, num_training_steps) -> LambdaLR. For transformers' own schedules use "
                         "lr_scheduler_type='cosine' etc.")
    return partial(SCHEDULES[scheduler], **options)


def transformers_schedule(name: str) -> Callable:
    """transformers' schedule ``name`` ("linear", "cosine", ...) as a factory with the same call as :data:`SCHEDULES`
    ``(optimizer, num_training_steps, warmup_steps=0)``, e.g. to draw it beside a Chebyshev one."""
    from transformers import get_scheduler

    def factory(optimizer, num_training_steps: int, warmup_steps: int = 0):
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=num_training_steps)

    factory.__name__ = name
    return factory


def schedule_curve(scheduler, num_training_steps: int, peak_lr: float = 1.0, **options) -> list[float]:
    """The learning rate at each step 0..num_training_steps-1 that ``scheduler`` would give (for plots/tests)."""
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak_lr)
    sched = resolve_schedule(scheduler, **options)(optimizer, num_training_steps)
    curve = []
    for _ in range(num_training_steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return curve
