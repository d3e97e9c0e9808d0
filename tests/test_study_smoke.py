"""``samstudy smoke``: each trial type of a study runs a few steps on a real local Ray, with its
step time, samples/s and peak memory, or its first error; ``plan`` then shows the measured
cost beside its estimate. The CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def samstudy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "samstudy", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_smoke_measures_each_trial_type_and_plan_shows_it(tmp_path: Path) -> None:
    study = {
        "name": "smk",
        "base": {
            "data": {"name": "digits"},
            "model": {"name": "mlp"},
            "optimizer": {"name": "sam", "lr": 0.05, "rho": 0.05},
            "epochs": 30,
            "threads": 1,
            "device": "cpu",
        },
        # two types: sam on the MLP (two rhos: one type), sam on CIFAR-10 whose files are absent
        "grid": [
            {"optimizer.rho": [0.05, 0.1]},
            {"data.name": ["cifar10"], "data.root": [str(tmp_path / "no-data")]},
        ],
        "seeds": [0, 1],
        "storage_path": str(tmp_path / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "smk.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["SAMSTUDY_SMOKE_DIR"] = str(tmp_path / "smoke")

    plan = samstudy("plan", str(path), "--no-check", env=env)
    assert "no smoke result yet" in plan.stdout, plan.stdout + plan.stderr

    smoke = samstudy("smoke", str(path), "--num-cpus", "2", "--steps", "3", env=env)
    out = smoke.stdout
    assert smoke.returncode == 1, out + smoke.stderr  # one type fails
    assert "smoke of study smk: 2 trial types" in out, out
    assert out.count("ms/step") == 1 and out.count("peak RSS") == 1, out
    assert "mlp / digits / sam / batch 64 / auto  (4 trials" in out, out  # rho: one type
    assert "FAILED on cpu" in out and "no-data" in out, out  # the first error, with the path
    assert "no cost measured" in out, out
    saved = json.loads((tmp_path / "smoke" / "smk.json").read_text())
    (ok,) = [t for t in saved["types"] if t["error"] is None]
    assert ok["step_s"] > 0 and ok["peak_bytes"] > 2**20
    assert abs(ok["samples_per_s"] * ok["step_s"] - 64) < 1e-6
    # nothing was written to the study's storage or tracking
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    plan = samstudy("plan", str(path), "--no-check", env=env)
    assert "the last smoke run" in plan.stdout and "had failures" in plan.stdout, plan.stdout
    study["grid"] = study["grid"][:1]
    path.write_text(yaml.safe_dump(study))
    plan = samstudy("plan", str(path), "--no-check", env=env)
    assert "of another version of the study file" in plan.stdout, plan.stdout


def test_smoke_of_the_quickstart_prices_it_and_plan_shows_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["SAMSTUDY_SMOKE_DIR"] = str(tmp_path)
    smoke = samstudy("smoke", "quickstart", "--num-cpus", "2", "--steps", "2", env=env)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "smoke of study quickstart: 8 trial types" in smoke.stdout, smoke.stdout
    assert smoke.stdout.count("ms/step") == 8, smoke.stdout
    assert "measured cost (smoke " in smoke.stdout and "trials at once" in smoke.stdout
    saved = json.loads((tmp_path / "quickstart.json").read_text())
    assert saved["slots"] == 2 and sum(t["trials"] for t in saved["types"]) == 30
    # 30 trials of 60 epochs: at least the timed steps' share of each (1437 digits / 64)
    per_epoch = min(t["step_s"] for t in saved["types"]) * 23
    assert saved["trial_hours"] * 3600 >= 30 * 60 * per_epoch
    lines = samstudy("plan", "quickstart", "--no-check", env=env).stdout.splitlines()
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimated cost"))
    assert lines[estimate + 1].startswith("measured cost (smoke "), lines
