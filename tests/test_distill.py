"""Distillation loss normalisation: the KL term is scaled like the cross-entropy (token sums over the accumulation
window / num_items_in_batch), so the loss does not depend on how a batch is split into accumulation steps."""
import pytest
import torch

import llmft


def _one_step(tiny_dir, dataset, tmp_path, batch, accumulation, weight=0.5):
    """One optimizer step of distillation on the 4 rows of ``dataset`` from the same moved-away adapter; returns the
    step's log row (loss, kd_loss, grad_norm)."""
    model, tokenizer = llmft.load_model(tiny_dir, max_seq_length=128, lora_r=8, lora_alpha=16)
    with torch.no_grad():  # a student that differs from its teacher (the adapter-disabled base), the same each time
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    trainer = llmft.build_trainer(model, tokenizer, dataset, max_steps=1, per_device_train_batch_size=batch,
                                  gradient_accumulation_steps=accumulation, learning_rate=1e-3,
                                  output_dir=str(tmp_path / f"b{batch}x{accumulation}"), metrics_csv=False,
                                  distill={"weight": weight}, verbose=False)
    trainer.train()
    return next(row for row in trainer.state.log_history if "loss" in row)


@pytest.mark.numeric
def test_kd_loss_is_the_same_for_batch_4x1_and_1x4(tiny_dir, chat_dataset, tmp_path):
    rows = chat_dataset.select(range(4))
    whole = _one_step(tiny_dir, rows, tmp_path, batch=4, accumulation=1)
    split = _one_step(tiny_dir, rows, tmp_path, batch=1, accumulation=4)
    assert whole["kd_loss"] > 1e-3  # the KL term is really there
    assert split["kd_loss"] == pytest.approx(whole["kd_loss"], rel=1e-4)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-4)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-2)  # logged at bf16 precision
    # and the KL weight is what was asked for: loss(weight 0.5) - loss(weight 0) = 0.5 x the logged KL
    no_kd = _one_step(tiny_dir, rows, tmp_path / "w0", batch=1, accumulation=4, weight=0.0)
    assert split["loss"] - no_kd["loss"] == pytest.approx(0.5 * split["kd_loss"], rel=1e-3)


def test_kd_loss_sum_and_mean_share_one_token_count():
    from llmft import trainers

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])  # 5 response positions after the shift
    total = trainers.kd_loss(student, teacher, labels, reduction="sum")
    assert trainers.kd_loss(student, teacher, labels).item() == pytest.approx(total.item() / 5)
    # tokens the teacher gets wrong add 0 but still count, as in the cross-entropy's token count
    right_only = trainers.kd_loss(student, teacher, labels, only_where_teacher_right=True, reduction="sum")
    assert trainers.kd_loss(student, teacher, labels, only_where_teacher_right=True).item() == pytest.approx(
        right_only.item() / 5)
    with pytest.raises(ValueError, match="reduction='none'"):
        trainers.kd_loss(student, teacher, labels, reduction="none")
