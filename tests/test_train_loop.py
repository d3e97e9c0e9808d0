"""run_trial end to end on the embedded digits data (CPU, seconds)."""

import io
import math

import pytest
import torch

from samstudy.optim import STAT_KEYS
from samstudy.train import run_trial
from samstudy.train.loop import train_epoch

# Small and fast: a narrow MLP, 12 batches per epoch.
SMALL = {
    "data": {"name": "digits"},
    "noise": {"kind": "symmetric", "rate": 0.4, "seed": 3},
    "model": {"name": "mlp", "kwargs": {"width": 32, "depth": 1}},
    "batch_size": 128,
    "epochs": 3,
    "seed": 5,
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
}
TIMING = {"epoch_time", "samples_per_sec"}


class Recorder:
    """A ``report`` callable that keeps every call."""

    def __init__(self) -> None:
        self.metrics: list[dict] = []
        self.checkpoints: list[dict | None] = []

    def __call__(self, metrics: dict, checkpoint: dict | None) -> None:
        self.metrics.append(metrics)
        self.checkpoints.append(checkpoint)


def _roundtrip(checkpoint: dict) -> dict:
    """What Ray or the CLI does: torch.save, then a weights-only load."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def _differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (NaN equals NaN: undefined in both runs)."""
    return [
        k
        for k in sorted(set(a) | set(b))
        if not (
            a.get(k) == b.get(k)
            or (isinstance(a.get(k), float) and math.isnan(a[k]) and math.isnan(b.get(k, 0.0)))
        )
    ]


@pytest.mark.parametrize(
    "optimizer",
    [{"name": "sgd", "lr": 0.1}, {"name": "sam", "lr": 0.1, "rho": 0.1}],
    ids=["sgd", "sam"],
)
def test_resume_after_any_epoch_is_exact(optimizer: dict) -> None:
    config = {**SMALL, "optimizer": optimizer, "sharpness": {"every": 2, "batch_size": 32}}
    full = Recorder()
    final = run_trial(config, full)
    assert [m["status"] for m in full.metrics] == ["running", "running", "completed"]
    assert final == full.metrics[-1]
    assert all(c is not None for c in full.checkpoints)  # checkpoint_every defaults to 1

    for k in (1, 2):
        resumed = Recorder()
        run_trial(config, resumed, resume=_roundtrip(full.checkpoints[k - 1]))
        assert [m["epoch"] for m in resumed.metrics] == list(range(k + 1, 4))
        for got, want in zip(resumed.metrics, full.metrics[k:], strict=True):
            assert _differences(_without_timing(got), _without_timing(want)) == []
        # The final weights and optimizer state are bit-identical as well.
        end, want_end = resumed.checkpoints[-1], full.checkpoints[-1]
        for name, tensor in want_end["model"].items():
            assert torch.equal(end["model"][name], tensor), name
        assert end["history"][0]["epoch"] == 1  # the history travels with the checkpoint
        assert len(end["history"]) == 3


def test_checkpoint_holds_plain_values_and_does_not_alias_the_model() -> None:
    rec = Recorder()
    run_trial({**SMALL, "epochs": 2, "optimizer": {"name": "sgd"}}, rec)
    first, second = rec.checkpoints
    loaded = _roundtrip(first)  # would raise on numpy arrays or other non-weights values
    assert loaded["epoch"] == 1 and loaded["best_epoch"] in (0, 1)
    assert set(loaded) >= {"model", "optimizer", "scheduler", "rng", "history", "config"}
    # The epoch-1 checkpoint kept its values while epoch 2 trained on.
    name = next(iter(first["model"]))
    assert not torch.equal(first["model"][name], second["model"][name])


def test_a_checkpoint_on_request_resumes_exactly_and_placement_may_differ() -> None:
    """``checkpoint_now`` (a study being stopped) adds a checkpoint after an epoch that
    ``checkpoint_every`` would skip; resuming from it, with other placement fields, continues
    the same trajectory."""
    config = {**SMALL, "optimizer": {"name": "sam", "rho": 0.05}, "checkpoint_every": 0}
    full = Recorder()
    run_trial(config, full, checkpoint_now=lambda: len(full.metrics) == 1)
    assert [c is not None for c in full.checkpoints] == [False, True, False]
    moved = {**config, "data": {**config["data"], "root": "/elsewhere", "num_workers": 0}}
    moved["optimizer"] = {**config["optimizer"], "stats_every": 3}  # measured, not trained on
    resumed = Recorder()
    run_trial(moved, resumed, resume=_roundtrip(full.checkpoints[1]))
    assert [m["epoch"] for m in resumed.metrics] == [3]
    differ = _differences(_without_timing(resumed.metrics[0]), _without_timing(full.metrics[2]))
    assert differ and set(differ) <= set(STAT_KEYS)  # statistics sampled on other steps only


def test_resume_refuses_another_config() -> None:
    rec = Recorder()
    run_trial({**SMALL, "epochs": 1, "optimizer": {"name": "sgd"}}, rec)
    with pytest.raises(ValueError, match=r"optimizer"):
        run_trial(
            {**SMALL, "optimizer": {"name": "sgd", "lr": 0.3}}, Recorder(), rec.checkpoints[0]
        )


def test_digits_with_40_percent_noise_beats_chance() -> None:
    config = {
        **SMALL,
        "model": {"name": "mlp", "kwargs": {"width": 128, "depth": 2}},
        "batch_size": 64,
        "epochs": 6,
        "optimizer": {"name": "sam", "lr": 0.05, "rho": 0.1},
        "checkpoint_every": 0,
    }
    rec = Recorder()
    final = run_trial(config, rec)
    assert final["status"] == "completed"
    assert all(c is None for c in rec.checkpoints)
    assert final["test_acc"] > 0.6  # chance is 0.1 (the test labels are clean)
    assert final["best_test_acc"] == max(m["test_acc"] for m in rec.metrics)
    assert rec.metrics[final["best_epoch"] - 1]["test_acc"] == final["best_test_acc"]
    # Early in training the clean labels are fitted, the noisy ones mostly are not.
    assert final["train_acc_clean"] > final["train_acc_noisy"]
    assert final["recovery"] > final["memorization"]
    assert final["memorization"] == final["train_acc_noisy"]
    names = {
        "epoch", "lr", "train_loss", "train_acc", "train_acc_clean", "train_acc_noisy",
        "train_loss_clean", "train_loss_noisy", "memorization", "recovery", "test_loss",
        "test_acc", "best_test_acc", "best_epoch", "epoch_time", "samples_per_sec", "status",
    }  # fmt: skip
    assert names <= set(final)
    assert final["lr"] < 0.05 * 0.1  # cosine has nearly reached zero at the last step


def test_non_finite_loss_ends_the_trial_as_diverged() -> None:
    rec = Recorder()
    final = run_trial({**SMALL, "epochs": 5, "optimizer": {"name": "sgd", "lr": 1e6}}, rec)
    assert final["status"] == "diverged"
    assert rec.metrics[-1] == final and len(rec.metrics) < 5
    assert [m["status"] for m in rec.metrics[:-1]] == ["running"] * (len(rec.metrics) - 1)
    assert rec.checkpoints[-1] is None  # no checkpoint of a diverged state
    assert not math.isfinite(final["train_loss"])


def test_max_steps_per_epoch_caps_the_batches() -> None:
    rec = Recorder()
    run_trial({**SMALL, "epochs": 1, "batch_size": 8, "max_steps_per_epoch": 1}, rec)
    acc = rec.metrics[0]["train_acc"]
    assert acc * 8 == pytest.approx(round(acc * 8))  # one batch of 8 samples was seen


def test_train_epoch_accepts_any_batches() -> None:
    # The loop function alone, as the benchmark uses it: hand-made batches, plain SGD protocol.
    from samstudy.optim import create_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    opt = create_optimizer(model.named_parameters(), name="sgd", lr=0.1)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    batches = [(x, y, y, torch.zeros(10, dtype=torch.bool), torch.arange(10))] * 3
    sums, lr = train_epoch(model, opt, None, batches)
    assert sums[0].item() == 30 and sums[2].item() == 0  # 30 samples, none noisy
    assert lr == pytest.approx(0.1)


def test_sharpness_is_reported_and_leaves_the_trajectory_alone() -> None:
    base = {**SMALL, "epochs": 2, "optimizer": {"name": "sam"}, "checkpoint_every": 0}
    plain, measured = Recorder(), Recorder()
    run_trial(base, plain)
    run_trial({**base, "sharpness": {"every": 2, "batch_size": 64, "power_iters": 5}}, measured)
    assert "sharpness_lambda_max" not in measured.metrics[0]
    assert measured.metrics[1]["sharpness_lambda_max"] > 0
    assert measured.metrics[1]["sharpness_trace"] > 0  # cross-entropy at a trained point
    for a, b in zip(plain.metrics, measured.metrics, strict=True):
        b = {k: v for k, v in b.items() if not k.startswith("sharpness_")}
        assert _differences(_without_timing(a), _without_timing(b)) == []


def test_binary_logit_model_on_gaussian_data_with_bf16_autocast() -> None:
    config = {
        "data": {"name": "gaussian", "synthetic": {"n_train": 256, "n_test": 256, "dim": 8}},
        "noise": {"kind": "symmetric", "rate": 0.3},
        "model": {"name": "linear2", "kwargs": {"binary_logit": True, "hidden": 16}},
        "optimizer": {"name": "sam", "rho": 0.05},
        "precision": "bf16",  # the CUDA default; on the CPU it exercises the autocast path
        "epochs": 3,
    }
    final = run_trial(config, Recorder())
    assert final["status"] == "completed"
    assert final["test_acc"] > 0.6  # two classes: chance is 0.5
    # Two classes: a noisy sample is predicted either as its noisy label or as its true one.
    assert final["memorization"] + final["recovery"] == pytest.approx(1.0)


def test_rng_states_survive_a_weights_only_roundtrip() -> None:
    import random

    import numpy as np

    from samstudy.train.checkpoint import rng_state, seed_everything, set_rng_state

    seed_everything(11)
    state = _roundtrip({"rng": rng_state()})["rng"]
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(draws[0], again[0])
    assert np.array_equal(draws[1], again[1])
    assert draws[2] == again[2]
