"""The disk a study's checkpoints need: the estimate against real checkpoints, and ``plan``."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from samstudy.models import create_model
from samstudy.optim import create_optimizer
from samstudy.study.disk import OVERHEAD_BYTES, checkpoint_bytes, data_shape, estimate_disk
from samstudy.study.plan import format_plan
from samstudy.study.spec import StudySpec, study_from_mapping


def real_checkpoint_bytes(config: dict) -> int:
    """torch.save of the model and its optimizer after one step (what a checkpoint holds)."""
    in_shape, classes = data_shape(config["data"])
    model = create_model(config["model"]["name"], classes, in_shape)
    opt = config["optimizer"]
    optimizer = create_optimizer(
        model.parameters(), opt["name"], **{k: v for k, v in opt.items() if k != "name"}
    )
    x, y = torch.randn(2, *in_shape), torch.randint(0, classes, (2,))
    optimizer.train_step(model, torch.nn.functional.cross_entropy, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


def test_checkpoint_size_matches_a_real_checkpoint() -> None:
    cases = [
        {
            "data": {"name": "cifar10"},
            "model": {"name": "resnet18"},
            "optimizer": {"name": "sam", "lr": 0.1, "rho": 0.05, "momentum": 0.9},
        },
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "optimizer": {"name": "sam", "base": "adamw", "lr": 0.001, "rho": 0.05},
        },
        {
            "data": {"name": "cifar100"},
            "model": {"name": "resnet18"},
            "optimizer": {"name": "sgd", "lr": 0.1},
        },  # no momentum: the weights alone
    ]
    for config in cases:
        estimate = checkpoint_bytes(config) - OVERHEAD_BYTES
        real = real_checkpoint_bytes(config)
        assert abs(estimate - real) / real < 0.05, (config, estimate, real)


def test_plan_prints_the_disk_at_peak(tmp_path: Path) -> None:
    def spec(keep_final: bool) -> StudySpec:
        return study_from_mapping(
            {
                "name": "disk",
                "base": {
                    "data": {"name": "cifar10"},
                    "model": {"name": "resnet18"},
                    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                },
                "seeds": [0, 1, 2, 3, 4, 5],
                "max_concurrent": 2,
                "resources": {"cpus": 1, "gpus": 0.5},
                "checkpoints": {"keep": 2, "keep_final": keep_final},
            },
            path=tmp_path / "disk.yaml",
        )

    size = checkpoint_bytes(spec(False).expand()[0].config)
    lean, keeping = estimate_disk(spec(False), 2), estimate_disk(spec(True), 2)
    assert lean.peak_bytes == 2 * 3 * size  # 2 running x (the last two + the one being written)
    assert keeping.peak_bytes == 2 * 3 * size + 4 * size  # + the 4 finished trials' last ones
    (line,) = [x for x in format_plan(spec(False)).splitlines() if x.startswith("disk for")]
    assert f"~{lean.peak_bytes / 2**20:.1f} MB" in line
    assert f"{size / 2**20:.1f} MB per checkpoint" in line and "keep none" in line
