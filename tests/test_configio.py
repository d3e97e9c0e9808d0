"""One YAML loader and one error format for every command that reads a config.

``train --config/--set``, ``plan``, ``study``, ``export`` and ``report`` read numbers as YAML 1.2
does (``5e-4`` is a number), refuse a key written twice naming both lines, and print problems as
``<file>: <field.path>: <what is wrong and what is allowed>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samstudy.configio import ConfigError, parse_yaml, problems, read_yaml
from samstudy.train.config import TrialConfig

ROOT = Path(__file__).resolve().parents[1]

TRIAL = """\
data: {name: digits}
model: {name: mlp}
optimizer:
  name: sam
  lr: 5e-2
  weight_decay: 5e-4
epochs: 1
max_steps_per_epoch: 2
threads: 1
device: cpu
"""
# The same malformed inputs, as a trial config and as a study's base: a key written twice, and a
# knob value that is no number (and, for the commands that read study files, a misspelt key).
DUPLICATE = TRIAL.replace("  lr: 5e-2\n", "  lr: 5e-2\n  lr: 1e-1\n")
NOT_A_NUMBER = TRIAL.replace("weight_decay: 5e-4", "weight_decay: 5e-4x")
DUPLICATE_MESSAGE = (
    "duplicate key 'lr' at line 6, column 3 (first on line 5); a key may appear once per mapping"
)
NUMBER_MESSAGE = "optimizer.weight_decay: expected a number, got '5e-4x'"


def as_study(trial: str, name: str, tmp: Path) -> str:
    """A one-trial study whose base is ``trial`` (indented under ``base:``)."""
    base = "".join(f"  {line}\n" for line in trial.splitlines())
    return (
        f"name: {name}\nbase:\n{base}"
        f"storage_path: {tmp / 'ray'}\n"
        f"tracking: {{tracking_uri: 'sqlite:///{tmp / 'mlflow.db'}'}}\n"
    )


def samstudy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run(
        [sys.executable, "-m", "samstudy", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# -- the loader ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5e-4", 5e-4),
        ("1e-2", 0.01),
        ("1E3", 1000.0),
        ("-2.5e+1", -25.0),
        (".5", 0.5),
        ("-.5e1", -5.0),
        ("3", 3),
        ("0.1", 0.1),
        ("1e", "1e"),
        ("5e-4x", "5e-4x"),
        ("true", True),
        ("False", False),
        ("null", None),
        # YAML 1.1 (plain PyYAML) reads these as True, 8, 90 and a date
        ("yes", "yes"),
        ("010", 10),
        ("1:30", "1:30"),
        ("2024-01-02", "2024-01-02"),
        ("0x1f", 31),
        ("0o17", 15),
        ("-7", -7),
    ],
)
def test_scalars_are_read_as_yaml_1_2_reads_them(text: str, value: object) -> None:
    got = parse_yaml(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    assert str(info.value) == (
        f"{path}: duplicate key 'c' at line 4, column 3 (first on line 3); a key may appear once "
        "per mapping"
    )


def test_unreadable_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml(tmp_path / "missing.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        read_yaml(binary)
    broken = tmp_path / "s.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{broken}: YAML syntax error at line 2"):
        read_yaml(broken)
    empty = tmp_path / "e.yaml"
    empty.write_text("# nothing\n")
    assert read_yaml(empty) is None


def test_problems_name_the_field_and_what_is_allowed() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        TrialConfig.model_validate(
            {
                "noise": {"rat": 0.4},
                "optimizer": {"name": "saner", "alpha": "x", "ascent": "adaptiv"},
                "schedule": {"name": "cosin"},
                "epochs": 0,
            }
        )
    lines = problems(info.value, TrialConfig)
    assert (
        "noise.rat: unknown key 'rat' (did you mean 'rate'?); allowed: kind, label_file, label_key, rate, seed"
        in lines
    )
    assert any(line.startswith("optimizer.alpha: expected a number, got 'x'") for line in lines)
    assert (
        "optimizer.ascent: unknown 'adaptiv' (did you mean 'adaptive'?); allowed: sam, adaptive, clamp"
        in lines
    )
    assert (
        "schedule.name: unknown 'cosin' (did you mean 'cosine'?); allowed: cosine, step, constant"
        in lines
    )
    assert "epochs: expected a number >= 1, got 0" in lines


# -- every command ---------------------------------------------------------------------------


def test_train_reads_exponents_and_set(tmp_path: Path) -> None:
    from samstudy.train.cli import main

    config = tmp_path / "trial.yaml"
    config.write_text(TRIAL)
    out = tmp_path / "m.json"
    code = main(
        ["--config", str(config), "--set", "optimizer.rho=1e-2", "--out", str(out), "--quiet"]
    )
    assert code == 0
    optimizer = json.loads(out.read_text())["config"]["optimizer"]
    assert (optimizer["rho"], optimizer["weight_decay"], optimizer["lr"]) == (0.01, 5e-4, 0.05)


def test_plan_reads_exponents_and_set(tmp_path: Path) -> None:
    (tmp_path / "expo.yaml").write_text(as_study(TRIAL, "expo", tmp_path))
    done = samstudy(
        "plan", str(tmp_path / "expo.yaml"), "--set", "optimizer.rho=1e-2", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "sam-rho0.01-mlp-s0" in done.stdout  # the --set value, a number, in the run name

    from samstudy.study import load_study

    spec = load_study(tmp_path / "expo.yaml", overrides=["optimizer.rho=1e-2"])
    assert spec.expand()[0].config["optimizer"]["weight_decay"] == 5e-4
    assert spec.overrides == ["optimizer.rho=1e-2"]


BAD_TRACKING = "tracking: {experimnet: x}\n"
TRACKING_MESSAGE = "tracking.experimnet: unknown key 'experimnet' (did you mean 'experiment'?); allowed: experiment, spool_max_mb, tracking_uri"
COMMANDS = ["train", "plan", "study", "export", "report"]


# Every command with every malformed input it reads: export and report read a study's
# description and tracking block, not its base; a trial config has no tracking block.
CASES = [
    (command, case)
    for command in COMMANDS
    for case in ("duplicate key", "not a number", "unknown tracking key")
    if not (command in ("export", "report") and case == "not a number")
    and not (command == "train" and case == "unknown tracking key")
]


@pytest.mark.parametrize(("command", "case"), CASES)
def test_every_command_refuses_the_same_input_the_same_way(
    tmp_path: Path, command: str, case: str
) -> None:
    """Exit status 2, ``samstudy <command>: <file>: <field>: <message>``, nothing started."""
    if command == "train":
        path = tmp_path / "trial.yaml"
        path.write_text(DUPLICATE if case == "duplicate key" else NOT_A_NUMBER)
        done = samstudy(
            "train", "--config", str(path), "--out", str(tmp_path / "m.json"), cwd=tmp_path
        )
        expected = DUPLICATE_MESSAGE if case == "duplicate key" else NUMBER_MESSAGE
    else:
        path = tmp_path / "bad.yaml"
        text = as_study(TRIAL, "bad", tmp_path)
        if case == "duplicate key":
            text = as_study(DUPLICATE, "bad", tmp_path)
            # two more lines above the base in a study file
            expected = DUPLICATE_MESSAGE.replace("line 6, column 3", "line 8, column 5")
            expected = expected.replace("first on line 5", "first on line 7")
        elif case == "not a number":
            text = as_study(NOT_A_NUMBER, "bad", tmp_path)
            expected = f"base.{NUMBER_MESSAGE}"
        else:
            text = text.replace("tracking: {", "tracking: {experimnet: x, ")
            expected = TRACKING_MESSAGE
        path.write_text(text)
        by_name = ["bad", "--studies-dir", str(tmp_path)]
        done = samstudy(
            command, *(by_name if command in ("export", "report") else [str(path)]), cwd=tmp_path
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"samstudy {command}: {path}: {expected}"), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "ray").exists()


def test_report_shows_the_study_description(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study
    from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store

    uri = sqlite_store(tmp_path / "m.db")
    trials = [
        TrialData(
            f"{name}-s{seed}", {"optimizer": {"name": name}, "seed": seed}, {"test_acc": [0.5, 0.6]}
        )
        for name in ("sam", "sgd")
        for seed in (0, 1)
    ]
    log_study(MlflowClient(tracking_uri=uri), "described", trials)
    export_study("described", uri, tmp_path / "results")
    (tmp_path / "described.yaml").write_text(
        "name: described\ndescription: Rho 1e-2 runs, noisy.\n"
    )
    done = samstudy(
        "report",
        "described",
        "--studies-dir",
        str(tmp_path),
        "--root",
        str(tmp_path / "results"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "results" / "reports" / "described" / "report.md").read_text()
    assert "Rho 1e-2 runs, noisy." in text


@pytest.mark.slow
def test_study_runs_with_exponents_and_set(tmp_path: Path) -> None:
    """A real (one-trial, one-epoch) study: the --set number reaches MLflow as a number."""
    from mlflow import MlflowClient

    (tmp_path / "expo.yaml").write_text(as_study(TRIAL, "expo", tmp_path))
    done = samstudy(
        "study",
        str(tmp_path / "expo.yaml"),
        "--set",
        "optimizer.rho=1e-2",
        "--num-cpus",
        "1",
        "--quiet",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("expo").experiment_id],
        filter_string="tags.`samstudy.role` = 'trial'",
    )
    assert len(runs) == 1
    params = runs[0].data.params
    assert (params["optimizer.rho"], params["optimizer.weight_decay"]) == ("0.01", "0.0005")
    assert runs[0].data.tags["samstudy.variant"] == "sam-rho0.01-mlp"
