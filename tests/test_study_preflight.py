"""Pre-flight checks of ``plan`` and of the start of ``study``: each refusal names the file, the
field, what was found and the fix, before any trial starts. Real MLflow (sqlite, and a closed
port for a server that is down), real files, the CLI in a subprocess."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from samstudy.study.preflight import (
    Capacity,
    PreflightError,
    data_problems,
    resource_problems,
    static_problems,
)
from samstudy.study.spec import study_from_mapping
from tests.test_data import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "epochs": 2,
    "threads": 1,
    "device": "cpu",
}


def spec_of(tmp: Path, **fields: Any) -> Any:
    base = {**BASE, **fields.pop("base", {})}
    data = {"name": "pre", "base": base, "storage_path": str(tmp / "ray"), **fields}
    return study_from_mapping(data, path=tmp / "pre.yaml")


def test_device_must_be_one_and_agree_with_the_gpus(tmp_path: Path) -> None:
    (gpu,) = static_problems(spec_of(tmp_path, base={"device": "gpu"}))
    assert gpu.startswith("device: 'gpu' is not a device; allowed: auto, cpu, cuda, cuda:N")
    (cuda,) = static_problems(spec_of(tmp_path, base={"device": "cuda"}))
    assert "resources.gpus is 0" in cuda and "device: auto" in cuda
    (cpu,) = static_problems(
        spec_of(tmp_path, base={"device": "cpu"}, resources={"cpus": 1, "gpus": 0.5})
    )
    assert "never uses" in cpu
    assert (
        static_problems(spec_of(tmp_path, base={"device": "cuda:1"}, resources={"gpus": 1})) == []
    )
    assert static_problems(spec_of(tmp_path, base={"device": "auto"})) == []


def test_storage_path_must_be_absolute_or_a_uri(tmp_path: Path) -> None:
    (line,) = static_problems(spec_of(tmp_path, storage_path="results/mine"))
    assert line.startswith("storage_path: 'results/mine' is relative") and "s3://" in line
    assert static_problems(spec_of(tmp_path, storage_path="s3://bucket/x")) == []


def test_resources_against_the_nodes(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, resources={"cpus": 2, "gpus": 0.5}, base={"device": "auto"})
    laptop = Capacity([("this machine", 8.0, 0.0)], "this machine")
    (line,) = resource_problems(spec, laptop)[0]
    assert "asks for 2 CPU and 0.5 GPU" in line and "this machine: 8 CPU, 0 GPU" in line
    cluster = Capacity([("10.0.0.1", 16.0, 2.0), ("10.0.0.2", 8.0, 1.0)], "the Ray cluster")
    problems, note = resource_problems(spec, cluster)
    assert problems == [] and note.startswith("concurrency: 6 trials at once")  # 4 + 2 by GPU
    capped = spec_of(tmp_path, resources={"cpus": 2, "gpus": 0.5}, max_concurrent=3)
    assert "3 trials at once" in resource_problems(capped, cluster)[1]


def test_missing_data_is_found_before_any_trial(tmp_path: Path) -> None:
    root = tmp_path / "data"
    spec = spec_of(tmp_path, base={"data": {"name": "cifar10", "root": str(root)}})
    (line,) = data_problems(spec, on_cluster=False)
    assert line.startswith(f"data: cifar10 in {root} is missing on this machine")
    assert "data.download: true" in line
    write_cifar10(root)
    assert data_problems(spec, on_cluster=False) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plan_refuses_each_problem_naming_file_and_field(tmp_path: Path) -> None:
    study = {
        "name": "bad",
        "base": {**BASE, "device": "gpu", "data": {"name": "cifar10", "root": str(tmp_path)}},
        "storage_path": "relative/ray",
        "tracking": {"tracking_uri": f"http://127.0.0.1:{_closed_port()}"},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-m", "samstudy", "plan", str(path), "--gpus", "4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "1 trials" in done.stdout  # the plan itself is still printed
    err = done.stderr
    assert err.startswith(f"samstudy plan: {path}: the study would fail once launched:"), err
    for field in ("device: 'gpu'", "storage_path: 'relative/ray'", "data: cifar10", "tracking:"):
        assert f"\n  {field}" in err, err
    assert "Traceback" not in err


def test_plan_of_a_sound_study_says_ok_with_its_concurrency(tmp_path: Path) -> None:
    study = {"name": "good", "base": BASE, "storage_path": str(tmp_path / "ray"),
             "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}}  # fmt: skip
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "samstudy", "plan", str(path), "--cpus", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on 64 CPUs: 1 trials at once" in done.stdout
    assert "concurrency: " in done.stdout and "pre-flight: ok" in done.stdout


@pytest.mark.slow
def test_study_refuses_before_starting_a_trial(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from samstudy.study.runner import run_study

    if ray.is_initialized():
        ray.shutdown()
    spec = spec_of(
        tmp_path,
        base={"data": {"name": "cifar10", "root": str(tmp_path / "none")}},
        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
    )
    with pytest.raises(PreflightError, match="data: cifar10 in .* is missing on this machine"):
        run_study(spec, num_cpus=1, out=io.StringIO())
    assert not (tmp_path / "ray").exists()  # nothing started, nothing written
