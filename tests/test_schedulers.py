"""Chebyshev schedules against hand-computed values, and the trainer's logged LR following them."""
import pytest

import llmft
from llmft import schedulers


def test_chebyshev_step_sizes_for_T8():
    # lr_max = 1, lr_min = 0.1: C = 5.5, R = 4.5, eta_k = 1 / (5.5 - 4.5 cos((k + 1/2) pi / 8)), by hand.
    expected = [0.920415, 0.568703, 0.333341, 0.216352, 0.156791, 0.124999, 0.108206, 0.100872]
    assert schedulers.chebyshev_nodes_steps(8, 1.0, 0.1) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="lr_min <= lr_max"):
        schedulers.chebyshev_nodes_steps(8, 0.1, 1.0)


def test_fractal_order():
    assert schedulers.fractal_order(8) == [0, 7, 3, 4, 1, 6, 2, 5]
    assert schedulers.fractal_order(4) == [0, 3, 1, 2]
    six = schedulers.fractal_order(6)
    assert six == [0, 3, 4, 1, 2, 5]  # sigma_8 without 6 and 7


def test_half_range_series_hand_values_and_shape():
    # f(t) = 1/2 + 0.45 cos(pi t / 4) + 0.05 cos(2 pi t / 4) at t = 0..4
    expected = [1.0, 0.818198, 0.45, 0.181802, 0.1]
    assert schedulers.series_multipliers(4) == pytest.approx(expected, abs=1e-6)
    long = schedulers.series_multipliers(100)
    assert all(a >= b for a, b in zip(long, long[1:])) and min(long) > 0  # falls, never negative
    assert sum(long[:50]) > 2.5 * sum(long[50:])  # high LR early (learn the format fast), low late


def test_full_period_series_returns_to_its_start():
    values = schedulers.series_multipliers(16, cos_coeffs=(1.2, 0.3), sin_coeffs=(0.3,), basis="full")
    assert values[0] == pytest.approx(values[16]) and max(values) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="negative .* at step"):
        schedulers.series_multipliers(16, cos_coeffs=(0.2, 0.5), basis="full")
    with pytest.raises(ValueError, match="basis='sine'"):
        schedulers.series_multipliers(4, basis="sine")


def test_warmup_then_schedule():
    curve = schedulers.schedule_curve("chebyshev_steps", 12, peak_lr=2.0, warmup_steps=4, min_ratio=0.1)
    assert curve[:4] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert curve[4:] == pytest.approx([2.0 * e for e in schedulers.chebyshev_nodes_steps(8, 1.0, 0.1)])


def test_unknown_schedule_is_explained():
    with pytest.raises(ValueError, match="chebyshev_fractal"):
        schedulers.resolve_schedule("chebychev")


@pytest.mark.parametrize("name", ["chebyshev", "chebyshev_fractal"])
def test_trainer_logged_learning_rate_follows_the_schedule(lora_model, chat_dataset, tmp_path, name):
    model, tokenizer = lora_model
    trainer = llmft.build_trainer(model, tokenizer, chat_dataset, max_steps=8, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=1, learning_rate=1e-2, warmup_steps=2,
                                  scheduler=name, output_dir=str(tmp_path), verbose=False)
    trainer.train()
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    # the LR logged at step s is the one step s used
    assert logged == pytest.approx(schedulers.schedule_curve(name, 8, 1e-2, warmup_steps=2), rel=1e-6)
