"""``samstudy train``: happy path, resume from the checkpoint file, config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from samstudy.train.cli import ConfigError, apply_override, main

CONFIG = {
    "noise": {"kind": "symmetric", "rate": 0.4},
    "model": {"name": "mlp", "kwargs": {"width": 32, "depth": 1}},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "batch_size": 128,
    "epochs": 3,
    "checkpoint_every": 2,
}


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_writes_metrics_and_checkpoint_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg, out, ckpt = _write(tmp_path, CONFIG), tmp_path / "m.json", tmp_path / "ckpt"
    code = main(
        ["--config", str(cfg), "--set", "seed=4", "--out", str(out), "--checkpoint-dir", str(ckpt)]
    )
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and "[completed]" in lines[-1]
    result = json.loads(out.read_text())  # strict JSON: NaN would not load in other tools
    assert result["status"] == "completed"
    assert result["config"]["seed"] == 4 and result["config"]["optimizer"]["lr"] == 0.1
    assert [m["epoch"] for m in result["history"]] == [1, 2, 3]
    assert (ckpt / "last.pt").exists()  # epoch 2's (checkpoint_every: 2)

    out2 = tmp_path / "resumed.json"
    code = main(
        [
            "--config",
            str(cfg),
            "--set",
            "seed=4",
            "--out",
            str(out2),
            "--resume",
            str(ckpt / "last.pt"),
        ]
    )
    assert code == 0
    resumed = json.loads(out2.read_text())
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    timing = {"epoch_time", "samples_per_sec"}
    strip = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert strip(resumed["final"]) == strip(result["final"])


def test_bad_config_names_file_field_and_allowed_values(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _write(tmp_path, {**CONFIG, "schedule": {"name": "linear"}, "epoch": 3})
    code = main(["--config", str(cfg), "--out", str(tmp_path / "m.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{cfg}: schedule.name: unknown 'linear'; allowed: cosine, step, constant" in err
    assert f"{cfg}: epoch: unknown key 'epoch' (did you mean 'epochs'?); allowed:" in err
    assert not (tmp_path / "m.json").exists()


def test_train_command_refuses_bad_config_without_traceback(tmp_path: Path) -> None:
    cfg = _write(tmp_path, {**CONFIG, "noise": {"kind": "symmetric", "rat": 0.4}})
    done = subprocess.run(
        [sys.executable, "-m", "samstudy", "train", "--config", str(cfg), "--out", "m.json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"{cfg}: noise.rat: unknown key 'rat' (did you mean 'rate'?)" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "m.json").exists()


def test_bad_optimizer_and_model_from_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = ["--out", str(tmp_path / "m.json")]
    assert main(["--set", "model.name=resnet7", *out]) == 2
    err = capsys.readouterr().err
    assert "model.name: unknown model 'resnet7'" in err and "resnet18" in err  # allowed names
    assert main(["--set", "optimizer.name=adamm", *out]) == 2
    err = capsys.readouterr().err
    assert "optimizer.name: unknown 'adamm'; allowed: sgd, sam" in err
    assert not (tmp_path / "m.json").exists()


def test_unreadable_or_non_mapping_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert main(["--config", str(listing)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_help_lists_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--config", "--set", "--out", "--resume", "--checkpoint-dir"):
        assert option in out


def test_apply_override_parses_yaml_values() -> None:
    mapping: dict = {"optimizer": {"name": "same"}}
    apply_override(mapping, "optimizer.scales=[1.0, 0, 0, 0]")
    apply_override(mapping, "noise.rate=0.4")
    apply_override(mapping, "data.download=true")
    assert mapping == {
        "optimizer": {"name": "same", "scales": [1.0, 0, 0, 0]},
        "noise": {"rate": 0.4},
        "data": {"download": True},
    }


def test_apply_override_uses_the_study_path_rules() -> None:
    mapping: dict = {"optimizer": {"name": "same", "scales": [1.0, 0, 0, 0]}}
    apply_override(mapping, "optimizer.scales[2]=0.5")  # list index, as in study grids
    apply_override(mapping, "schedule.milestones=[10, 20]")
    apply_override(mapping, "schedule.milestones.1=25")
    apply_override(mapping, "model={name: mlp, kwargs: {width: 8}}")
    apply_override(mapping, "model={kwargs: {depth: 1}}")  # a mapping merges, as in studies
    assert mapping["optimizer"]["scales"] == [1.0, 0, 0.5, 0]
    assert mapping["schedule"] == {"milestones": [10, 25]}
    assert mapping["model"] == {"name": "mlp", "kwargs": {"width": 8, "depth": 1}}
    with pytest.raises(ConfigError, match=r"unknown key 'rat' in noise \(did you mean 'rate'"):
        apply_override(mapping, "noise.rat=0.4")
    with pytest.raises(ConfigError, match="epochs is a value"):
        apply_override(mapping, "epochs.max=3")
    with pytest.raises(ConfigError, match="has no item 7"):
        apply_override(mapping, "optimizer.scales.7=1")
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_override({"noise": 0.4}, "noise.rate=0.4")
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_override(mapping, "noise.rate")
