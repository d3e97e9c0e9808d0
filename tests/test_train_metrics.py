"""Trainer metrics on a hand-made batch, and the learning-rate schedules."""

import math

import pytest
import torch

from samstudy.train.config import ScheduleConfig
from samstudy.train.metrics import SUM_FIELDS, batch_sums, classification_loss, summarize
from samstudy.train.schedule import build_scheduler, lr_factor

# Six samples, three classes. Predictions are the argmax of 2 * one-hot(pred).
PRED = torch.tensor([0, 2, 2, 0, 0, 0])
Y = torch.tensor([0, 1, 2, 0, 2, 1])  # training (possibly noisy) labels
Y_TRUE = torch.tensor([0, 1, 2, 1, 0, 2])
# 0: clean, right; 1: clean, wrong; 2: clean, right;
# 3: noisy, predicted as its noisy label (memorised); 4: noisy, predicted as its true label
# (recovered); 5: noisy, neither.
NOISY = Y != Y_TRUE
LOGITS = 2.0 * torch.nn.functional.one_hot(PRED, 3).float()

HIT = -math.log(math.exp(2) / (math.exp(2) + 2))  # loss where the label is the predicted class
MISS = -math.log(1 / (math.exp(2) + 2))


def test_hand_made_batch() -> None:
    m = summarize(batch_sums(LOGITS, Y, Y_TRUE, NOISY))
    assert m["train_acc"] == pytest.approx(3 / 6)
    assert m["train_acc_clean"] == pytest.approx(2 / 3)
    assert m["train_acc_noisy"] == pytest.approx(1 / 3)
    assert m["memorization"] == pytest.approx(1 / 3)
    assert m["recovery"] == pytest.approx(1 / 3)
    assert m["train_loss"] == pytest.approx((3 * HIT + 3 * MISS) / 6)
    assert m["train_loss_clean"] == pytest.approx((2 * HIT + MISS) / 3)
    assert m["train_loss_noisy"] == pytest.approx((HIT + 2 * MISS) / 3)


def test_sums_add_over_batches_and_raw_counts() -> None:
    whole = batch_sums(LOGITS, Y, Y_TRUE, NOISY)
    parts = batch_sums(LOGITS[:2], Y[:2], Y_TRUE[:2], NOISY[:2]) + batch_sums(
        LOGITS[2:], Y[2:], Y_TRUE[2:], NOISY[2:]
    )
    assert torch.allclose(whole, parts)
    counts = dict(zip(SUM_FIELDS, whole.tolist(), strict=True))
    assert (counts["n"], counts["n_clean"], counts["n_noisy"]) == (6, 3, 3)
    assert (counts["correct"], counts["correct_clean"]) == (3, 2)
    assert (counts["memorized"], counts["recovered"]) == (1, 1)
    assert whole.dtype == torch.float64


def test_no_noisy_samples_gives_undefined_rates() -> None:
    clean = torch.zeros(6, dtype=torch.bool)
    m = summarize(batch_sums(LOGITS, Y, Y, clean))
    assert m["train_acc"] == m["train_acc_clean"] == pytest.approx(3 / 6)
    assert math.isnan(m["memorization"]) and math.isnan(m["recovery"])
    assert math.isnan(m["train_loss_noisy"])


def test_infinite_loss_on_noisy_side_keeps_clean_loss_finite() -> None:
    logits = LOGITS.clone()
    logits[5] = torch.tensor([float("inf"), 0.0, -float("inf")])  # sample 5 is noisy
    m = summarize(batch_sums(logits, Y, Y_TRUE, NOISY))
    assert math.isfinite(m["train_loss_clean"])
    assert not math.isfinite(m["train_loss"])


def test_binary_single_logit() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])  # (B,) as the linear models' binary_logit
    y = torch.tensor([1, 1, 0, 0])
    y_true = torch.tensor([1, 0, 1, 0])
    m = summarize(batch_sums(logits, y, y_true, y != y_true))
    assert m["train_acc"] == pytest.approx(0.5)  # predictions 1, 0, 1, 0
    assert m["memorization"] == pytest.approx(0.0) and m["recovery"] == pytest.approx(1.0)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    assert m["train_loss"] == pytest.approx(float(expected))
    assert float(classification_loss(logits, y)) == pytest.approx(float(expected))


def test_cosine_with_warmup() -> None:
    f = lr_factor(
        ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.01),
        base_lr=0.1,
        steps_per_epoch=10,
        epochs=5,
    )
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # cosine starts at the top after warmup
    assert f(30) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the 40 decay steps
    assert f(50) == pytest.approx(0.1)  # the floor: min_lr / lr
    assert all(f(s) >= f(s + 1) for s in range(10, 50))


def test_step_and_constant() -> None:
    f = lr_factor(
        ScheduleConfig(name="step", milestones=[2, 4], gamma=0.5),
        base_lr=0.1,
        steps_per_epoch=3,
        epochs=6,
    )
    # 0-based epochs 0, 1 full; from epoch 2 halved; from epoch 4 quartered (MultiStepLR style)
    assert [f(s) for s in (0, 5, 6, 11, 12, 17)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    g = lr_factor(ScheduleConfig(name="constant"), base_lr=0.1, steps_per_epoch=3, epochs=6)
    assert {g(s) for s in range(18)} == {1.0}


def test_scheduler_drives_optimizer_lr_and_state_is_plain() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.2)
    sched = build_scheduler(opt, ScheduleConfig(name="cosine"), steps_per_epoch=2, epochs=2)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None]  # a closure: rebuilt from the config, not pickled
