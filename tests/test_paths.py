"""samstudy.paths (one rule: relative means the project root) and its users: the trainer's data
paths and ``samstudy export`` following the study file's tracking settings."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from samstudy import paths

REPO = Path(__file__).resolve().parents[1]


def test_project_root_is_the_checkout_whatever_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert paths.project_root() == REPO
    assert paths.results_root() == REPO / "results"
    assert paths.default_tracking_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    assert paths.absolute_path("data") == REPO / "data"
    assert paths.absolute_path("data", base=tmp_path) == tmp_path / "data"
    assert paths.absolute_path("/abs/x") == Path("/abs/x")
    assert paths.absolute_path("~/x") == Path.home() / "x"


def test_sqlite_uris_are_made_absolute_against_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert paths.absolute_sqlite_uri("sqlite:///x.db") == f"sqlite:///{REPO / 'x.db'}"
    assert paths.absolute_sqlite_uri("sqlite:///x.db", tmp_path) == f"sqlite:///{tmp_path}/x.db"
    assert paths.absolute_sqlite_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert paths.absolute_sqlite_uri("http://h:5000") == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert paths.resolve_tracking_uri(None) == f"sqlite:///{REPO / 'env.db'}"
    assert paths.resolve_tracking_uri("http://h:5000") == "http://h:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert paths.resolve_tracking_uri(None) == paths.default_tracking_uri()


def test_all_callers_share_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from samstudy.analysis.schema import DEFAULT_ROOT
    from samstudy.data.sources import resolve_root
    from samstudy.settings import resolve_tracking_uri
    from samstudy.study.runner import absolute_paths, resolve_storage_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_ROOT == REPO / "results"
    assert resolve_root("data") == REPO / "data"
    assert resolve_storage_path("runs") == str(REPO / "runs")
    config = absolute_paths({"data": {"root": "d"}, "noise": {"label_file": "l.pt"}}, REPO)
    assert config == {
        "data": {"root": str(REPO / "d")},
        "noise": {"label_file": str(REPO / "l.pt")},
    }
    assert resolve_tracking_uri(None, "sqlite:///s.db") == f"sqlite:///{REPO / 's.db'}"
    assert resolve_tracking_uri(None) == paths.default_tracking_uri()


def test_trainer_takes_relative_data_paths_from_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``samstudy train`` from another directory looks where ``make study`` looks."""
    from samstudy.data import DataNotFoundError
    from samstudy.train import loop

    monkeypatch.chdir(tmp_path)
    missing = "no-such-data-folder/cifar"
    config = {"data": {"name": "cifar10", "root": missing}, "model": {"name": "mlp"}, "epochs": 1}
    with pytest.raises(DataNotFoundError) as error:
        loop.run_trial({**config, "device": "cpu"}, lambda metrics, checkpoint: None)
    assert str(REPO / missing) in str(error.value)
    assert not (tmp_path / missing).exists() and not (REPO / missing).exists()
    labels = "no-such-labels/CIFAR-10_human.pt"
    human = {"noise": {"kind": "human", "label_file": labels}, "model": {"name": "mlp"}}
    with pytest.raises(Exception) as error:  # noqa: B017 - the message is what is checked
        loop.run_trial({**human, "epochs": 1, "device": "cpu"}, lambda m, c: None)
    assert str(REPO / labels) in str(error.value)


# ---------------------------------------------------------------------------------------------
# samstudy export follows the study file


def _write_study(folder: Path, name: str, tracking: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    study = {
        "name": name,
        "base": {"data": {"name": "digits"}, "model": {"name": "mlp"}, "epochs": 2},
        "seeds": [0],
        "tracking": tracking,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(study))


def _log(uri: str, experiment: str) -> None:
    from mlflow import MlflowClient

    from samstudy.analysis.synthetic import TrialData, log_study

    trials = [
        TrialData(f"sgd-s{s}", {"optimizer": {"name": "sgd"}, "seed": s}, {"test_acc": [0.5, 0.6]})
        for s in (0, 1)
    ]
    log_study(MlflowClient(tracking_uri=uri), experiment, trials)


def test_export_source_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from samstudy.analysis.cli import export_source

    studies = tmp_path / "studies"
    _write_study(studies, "tracked", {"tracking_uri": "sqlite:///rel.db", "experiment": "exp-x"})
    _write_study(studies, "plain", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    # the study file wins over the environment; a relative sqlite path is from the project root
    assert export_source("tracked", studies_dir=studies) == (
        f"sqlite:///{REPO / 'rel.db'}",
        "exp-x",
    )
    # the command line wins over the study file
    assert export_source("tracked", "http://cli:5000", "e2", studies) == ("http://cli:5000", "e2")
    # no tracking settings in the file: the environment, and the study name as experiment
    assert export_source("plain", studies_dir=studies) == ("http://env:5000", "plain")
    # no study file at all
    assert export_source("gone", studies_dir=studies) == ("http://env:5000", "gone")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert export_source("plain", studies_dir=studies) == (paths.default_tracking_uri(), "plain")


def test_export_main_reads_the_store_and_experiment_of_the_study_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samstudy.analysis.cli import export_main
    from samstudy.analysis.schema import partition_dir
    from samstudy.analysis.synthetic import sqlite_store

    uri = sqlite_store(tmp_path / "store.db")
    _log(uri, "custom-experiment")
    studies = tmp_path / "studies"
    _write_study(studies, "mystudy", {"tracking_uri": uri, "experiment": "custom-experiment"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "results"
    argv = ["mystudy", "--studies-dir", str(studies), "--root", str(root)]
    assert export_main(argv) == 0
    runs = pq.read_table(partition_dir(root, "runs", "mystudy")).to_pandas()
    assert len(runs) == 2 and set(runs["status"]) == {"completed"}
    assert set(runs["study"].astype(str)) == {"mystudy"}
    # --experiment overrides the study file: a wrong name is reported, not silently empty
    assert export_main([*argv, "--experiment", "nope"]) == 1
