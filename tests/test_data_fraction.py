"""``data.train_fraction``: a stratified, deterministic share of every data set's training set,
drawn before the label noise; the default keeps every data set and every trial id as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from test_data import checksummed, write_cifar10, write_cifar100

from samstudy.data import TORCHVISION_CLASSES, build_data, stratified_subset
from samstudy.identity import trial_id
from samstudy.train.config import TrialConfig


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # 200 training images per set: 20 per class for CIFAR-10, 2 per class for CIFAR-100
    ten = write_cifar10(tmp_path, per_batch=40)
    hundred = write_cifar100(tmp_path, n_train=200)
    monkeypatch.setitem(
        TORCHVISION_CLASSES, "cifar10", checksummed(torchvision.datasets.CIFAR10, ten)
    )
    monkeypatch.setitem(
        TORCHVISION_CLASSES, "cifar100", checksummed(torchvision.datasets.CIFAR100, hundred)
    )
    return tmp_path


@pytest.mark.parametrize("name", ["digits", "gaussian", "cifar10", "cifar100"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_every_data_set_takes_a_stratified_share(
    name: str, fraction: float, cifar_root: Path
) -> None:
    full = build_data(name, root=cifar_root)
    part = build_data(name, root=cifar_root, train_fraction=fraction)
    counts = torch.bincount(full.train_y_true, minlength=full.num_classes)
    kept = torch.bincount(part.train_y_true, minlength=full.num_classes)
    # each class keeps its share, to within one sample (at least one per class)
    assert ((kept - counts * fraction).abs() <= 1).all(), (kept, counts)
    assert (kept >= 1).all()
    assert abs(part.num_train - fraction * full.num_train) <= full.num_classes
    # the samples kept are samples of the full set, with their labels, in the same order
    keep = stratified_subset(full.train_y_true, fraction, 0)
    assert torch.equal(part.train_x, full.train_x[keep])
    assert torch.equal(part.train_y_true, full.train_y_true[keep])
    # the test set stays whole
    assert torch.equal(part.test_x, full.test_x) and torch.equal(part.test_y, full.test_y)


def test_the_share_is_deterministic_per_split_seed() -> None:
    torch.manual_seed(1)
    a = build_data("digits", train_fraction=0.25)
    torch.manual_seed(2)  # the global random state plays no part
    b = build_data("digits", train_fraction=0.25)
    c = build_data("digits", train_fraction=0.25, split_seed=1)
    assert torch.equal(a.train_x, b.train_x)
    assert a.train_x.shape == c.train_x.shape and not torch.equal(a.train_x, c.train_x)


def test_noise_is_drawn_on_the_share() -> None:
    part = build_data("digits", train_fraction=0.1, noise_kind="symmetric", noise_rate=0.4)
    # exactly round(rate x n) of the subset's labels are flipped: the noise came after the draw
    assert int(part.train_noisy.sum()) == round(0.4 * part.num_train)
    assert torch.equal(part.train_noisy, part.train_y != part.train_y_true)


def test_human_labels_follow_their_samples(cifar_root: Path, tmp_path: Path) -> None:
    import numpy as np

    full = build_data("cifar10", root=cifar_root)
    worse = (full.train_y_true + (torch.arange(full.num_train) % 3 == 0).long()) % 10
    np.save(tmp_path / "human.npy", worse.numpy())
    part = build_data(
        "cifar10", root=cifar_root, train_fraction=0.5, noise_kind="human",
        label_file=tmp_path / "human.npy",
    )  # fmt: skip
    keep = stratified_subset(full.train_y_true, 0.5, 0)
    assert torch.equal(part.train_y, worse[keep])


def test_full_fraction_keeps_data_and_trial_ids() -> None:
    plain = build_data("digits", noise_kind="symmetric", noise_rate=0.4)
    whole = build_data("digits", noise_kind="symmetric", noise_rate=0.4, train_fraction=1.0)
    assert torch.equal(plain.train_x, whole.train_x) and torch.equal(plain.train_y, whole.train_y)
    # the dump (what trial ids hash) leaves the default out, so ids stay what they were
    dumped = TrialConfig.model_validate({"data": {"train_fraction": 1.0}}).model_dump(mode="json")
    assert "train_fraction" not in dumped["data"]
    assert trial_id(dumped) == trial_id(TrialConfig().model_dump(mode="json"))
    quarter = TrialConfig.model_validate({"data": {"train_fraction": 0.25}})
    assert quarter.model_dump(mode="json")["data"]["train_fraction"] == 0.25
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_fraction"):
            TrialConfig.model_validate({"data": {"train_fraction": bad}})


def test_a_trial_trains_on_the_share() -> None:
    from samstudy.train import run_trial

    def train(fraction: float) -> dict:
        seen: list[dict] = []
        config = {
            "data": {"train_fraction": fraction},
            "model": {"name": "mlp", "kwargs": {"width": 16, "depth": 1}},
            "epochs": 1,
            "batch_size": 32,
            "device": "cpu",
            "threads": 1,
            "checkpoint_every": 0,
        }
        run_trial(config, lambda metrics, _checkpoint: seen.append(metrics))
        return seen[-1]

    quarter, whole = train(0.25), train(1.0)
    assert quarter["train_acc"] != whole["train_acc"]
    assert quarter["test_acc"] != whole["test_acc"]
