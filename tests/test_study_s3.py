"""Ray storage on S3: an S3 API server (moto) on 127.0.0.1 and a real two-node Ray cluster started
inside the test, so that the storage is really shared. Long because the server and the cluster
are started once for every scenario here. A study keeps its checkpoints in the
bucket, retries a killed worker from them, resumes after its driver was killed outright, and
``plan`` refuses a missing bucket or an unreachable endpoint. The S3 keys live in the
environment only: the secret key shows up nowhere (driver output, MLflow, the bucket).

Real Ray, real MLflow (sqlite), a real S3 server; no mocks. Skipped with the reason when the S3
server cannot start (``moto[server]``, a dev extra, missing).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from samstudy.devstores import LocalS3, S3Unavailable
from samstudy.study.preflight import static_problems
from samstudy.study.spec import StudyError, study_from_mapping
from samstudy.study.storage import ENDPOINT_ENV, resolve_endpoint
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "optimizer": {"name": "sam", "lr": 0.05, "rho": 0.05},
    "epochs": 6,
    "threads": 1,
    "device": "cpu",
    "checkpoint_every": 1,
}
_AWS = (*ENDPOINT_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")  # fmt: skip


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    """The S3 server, its (made-up) keys in this process's environment, where the Ray nodes
    started after it find them; no endpoint variable (each test sets its own)."""
    server = LocalS3()
    try:
        server.start()
    except S3Unavailable as exc:
        pytest.skip(f"no local S3 API server: {exc}")
    saved = {k: os.environ.pop(k, None) for k in _AWS}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def bucket(s3: LocalS3) -> str:
    """A new bucket; returns its name."""
    name = f"samstudy-{secrets.token_hex(4)}"
    s3.create_bucket(name)
    return name


def objects(s3: LocalS3, prefix: str) -> dict[str, Any]:
    """{key: FileInfo} of everything under ``prefix`` (``bucket/path``)."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True)
    return {info.path: info for info in s3.filesystem().get_file_info(selector)}


def assert_secret_absent(s3: LocalS3, uri: str, experiment: str, prefix: str, *texts: str) -> None:
    """The secret key is in none of ``texts``, the MLflow runs' params, tags and metric names,
    and the objects under ``prefix`` in the bucket (Tune's state, the pickled filesystem...)."""
    for text in texts:
        assert s3.secret not in text
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    assert runs
    for run in runs:
        for mapping in (run.data.params, run.data.tags, run.data.metrics):
            assert not any(s3.secret in f"{k}={v}" for k, v in mapping.items())
    fs = s3.filesystem()
    for key, info in objects(s3, prefix).items():
        if info.size:
            with fs.open_input_stream(key) as stream:
                assert s3.secret.encode() not in stream.read(), key


# -- study files keep no credentials (no server needed) ------------------------------------------


def test_a_study_file_may_not_hold_s3_credentials(tmp_path: Path) -> None:
    base = {"name": "leaky", "base": BASE, "storage_path": "s3://bucket/ray"}
    cases = [
        ({"aws_secret_access_key": "fileSecret123"}, "aws_secret_access_key: looks like a credential"),
        ({"tracking": {"secret_key": "fileSecret123"}}, "tracking.secret_key: looks like a credential"),
        ({"storage_endpoint": "http://AKIA:fileSecret123@127.0.0.1:9000"}, "storage_endpoint: holds credentials"),
    ]  # fmt: skip
    for extra, message in cases:
        with pytest.raises(StudyError) as caught:
            study_from_mapping({**base, **extra}, path=tmp_path / "leaky.yaml")
        text = str(caught.value)
        assert text.startswith(f"{tmp_path / 'leaky.yaml'}: {message}"), text
        assert "AWS_SECRET_ACCESS_KEY" in text and "fileSecret123" not in text, text
    bad = {**base, "storage_endpoint": "127.0.0.1:9000"}
    with pytest.raises(StudyError, match="storage_endpoint: '127.0.0.1:9000' is not an endpoint"):
        study_from_mapping(bad, path=tmp_path / "leaky.yaml")
    local = study_from_mapping(
        {**base, "storage_path": "/srv/ray", "storage_endpoint": "http://127.0.0.1:9000"},
        path=tmp_path / "leaky.yaml",
    )
    assert any(p.startswith("storage_endpoint: ") for p in static_problems(local))


def test_endpoint_from_the_study_file_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    assert resolve_endpoint(None).url is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001/")
    assert resolve_endpoint(None).url == "http://127.0.0.1:9001"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9002")
    assert resolve_endpoint(None).source == "$AWS_ENDPOINT_URL_S3"
    found = resolve_endpoint("http://127.0.0.1:9003")
    assert (found.url, found.source) == (
        "http://127.0.0.1:9003",
        "storage_endpoint in the study file",
    )


# -- plan's pre-flight -----------------------------------------------------------------------------


def write_study(tmp: Path, name: str, **fields: Any) -> Path:
    study = {
        "name": name,
        "base": BASE,
        "grid": {"seed": [0, 1]},
        "checkpoint_min_s": 0,
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        **fields,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_plan_checks_the_bucket_answers_and_takes_writes(
    s3: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import pyarrow.fs

    from samstudy.study.cli import plan_main, stop_main
    from samstudy.study.control import DriverControl, read_driver
    from samstudy.study.preflight import PreflightError
    from samstudy.study.runner import run_study
    from samstudy.study.spec import load_study
    from samstudy.study.state import ExperimentFiles

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    name = bucket(s3)
    # a missing bucket (the endpoint from the study file)
    gone = write_study(
        tmp_path, "gone", storage_path="s3://no-such-bucket/ray", storage_endpoint=s3.endpoint
    )
    assert plan_main([str(gone)]) == 2
    err = capsys.readouterr().err
    assert f"samstudy plan: {gone}: the study would fail once launched:" in err, err
    assert (
        "  storage_path: the bucket 'no-such-bucket' of s3://no-such-bucket/ray does not exist "
        f"at the endpoint {s3.endpoint} (storage_endpoint in the study file); create it"
    ) in err, err
    # ... and `study` refuses it before starting anything
    with pytest.raises(PreflightError, match="bucket 'no-such-bucket'"):
        run_study(load_study(str(gone)), out=io.StringIO())
    import ray

    assert not ray.is_initialized()

    # an endpoint where nothing listens (from the environment)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    away = write_study(tmp_path, "away", storage_path=f"s3://{name}/ray")
    assert plan_main([str(away)]) == 2
    err2 = capsys.readouterr().err
    assert f"  storage_path: cannot reach s3://{name}/ray at the endpoint http://127.0.0.1:" in err2
    assert "($AWS_ENDPOINT_URL)" in err2 and "start the store" in err2, err2

    # the right endpoint: plan says ok and leaves no probe object behind
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert plan_main([str(away)]) == 0
    out = capsys.readouterr().out
    assert "pre-flight: ok" in out and "storage for checkpoints at peak: ~" in out, out
    left = objects(s3, name)
    assert all(i.type == pyarrow.fs.FileType.Directory for i in left.values()), left

    # `samstudy stop` and --fresh's deletion work on the bucket
    files = ExperimentFiles(f"s3://{name}/ray/away")
    control = DriverControl(files)  # the driver's heartbeat, as a running study keeps it
    assert read_driver(files)["pid"] == os.getpid()
    assert stop_main([str(away)]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert files.exists("samstudy_stop")
    control.close()
    files.write_text("samstudy_state.json", "{}")
    files.delete()
    assert not files.exists()
    for text in (err, err2, out):
        assert s3.secret not in text


def test_tune_deletes_a_checkpoint_only_once_the_saved_state_no_longer_names_it(
    s3: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tune deletes a running trial's older checkpoint when it registers a newer one, before its
    state naming the newer one is in the bucket; the pruner holds that deletion until then."""
    import pyarrow.fs
    from ray.train._internal import checkpoint_manager

    from samstudy.study.pruning import CheckpointPruner
    from samstudy.study.state import ExperimentFiles

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    name = bucket(s3)
    files = ExperimentFiles(f"s3://{name}/ray/held")
    folders = [f"{files.base}/t1/checkpoint_{i:06d}" for i in range(3)]
    for folder in folders:
        with files.fs.open_output_stream(f"{folder}/trial.pt") as stream:
            stream.write(b"weights")

    def state(named: str) -> str:  # Tune keeps a trial's checkpoints pickled, in hex
        record = {"checkpoint_manager": {"value": pickle.dumps({"path": named}).hex()}}
        trial = json.dumps({"trial_id": "t1", "status": "RUNNING"})
        return json.dumps({"trial_data": [[trial, json.dumps(record)]]})

    def exists(path: str) -> bool:
        return files.fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    files.write_text("experiment_state-1.json", state(folders[0]))
    other = f"{name}/elsewhere/checkpoint_000000"
    with files.fs.open_output_stream(f"{other}/trial.pt") as stream:
        stream.write(b"weights")
    delete = checkpoint_manager._delete_fs_path
    pruner = CheckpointPruner(files, finished=False)
    with pruner.deferring():
        checkpoint_manager._delete_fs_path(fs=files.fs, fs_path=folders[0])
        checkpoint_manager._delete_fs_path(fs=files.fs, fs_path=other)  # not this study's
    assert checkpoint_manager._delete_fs_path is delete
    assert exists(folders[0]) and not exists(other)
    assert pruner.prune(final=True) == 0 and exists(folders[0])  # the saved state names it
    files.write_text("experiment_state-1.json", state(folders[2]))
    assert pruner.prune(final=True) == 1
    assert not exists(folders[0]) and exists(folders[1]) and exists(folders[2])


# -- studies on a two-node cluster ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(s3: LocalS3) -> Iterator[Any]:
    """Two Ray nodes of one CPU each, started after the S3 keys are in the environment."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # The nodes and every driver (this process included) in one authentication mode: token
    # when this machine has a token, as samstudy's driver then offers it.
    saved = os.environ.get("RAY_AUTH_MODE")
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file()
    auth_mode("token" if token else "disabled")
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()
        auth_mode(saved)


def auth_mode(mode: str | None) -> None:
    """Set ``RAY_AUTH_MODE`` (None: unset) for the nodes started next and for this process, whose
    Ray reads it into its config once (refreshed here, as Ray does when it turns tokens on)."""
    from ray._raylet import Config

    os.environ.pop("RAY_AUTH_MODE", None)
    if mode is not None:
        os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")


def trial_runs(uri: str, experiment: str) -> list[Any]:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], "tags.`samstudy.role` = 'trial'")


def epochs_logged(uri: str, run: Any) -> list[int]:
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "train_loss")
    return sorted(m.step for m in history)


def driver(study: Path, address: str) -> subprocess.Popen:
    """``samstudy study`` in its own process on the cluster (the endpoint from the study file)."""
    drop = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", *ENDPOINT_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_ADDRESS=address, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "samstudy", "study", str(study), "--progress-interval", "0"]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


class Watch:
    """Tune callbacks of the resumed run: the trial folders' checkpoints seen in the bucket,
    the nodes results came from, and a worker SIGKILLed once (the first trial reporting epoch
    ``at``), with the epochs its trial reports from its next worker."""

    def __init__(self, s3: LocalS3, at: int) -> None:
        from ray import tune

        watch = self

        class Callback(tune.Callback):
            def on_trial_result(self, trial: Any, result: dict, **info: Any) -> None:
                watch.result(trial, result)

        self.callback = Callback()
        self.s3, self.at = s3, at
        self.checkpoints: dict[str, set[str]] = {}
        self.nodes: set[str] = set()
        self.killed, self.pid, self.after = "", 0, []

    def result(self, trial: Any, result: dict) -> None:
        self.nodes.add(result["node_id"])
        names = {Path(k).name for k in objects(self.s3, trial.path)}
        self.checkpoints.setdefault(trial.trial_id, set()).update(
            n for n in names if n.startswith("checkpoint_")
        )
        if not self.killed and int(result["epoch"]) == self.at:
            self.killed, self.pid = trial.trial_id, result["pid"]
            os.kill(self.pid, signal.SIGKILL)
        elif trial.trial_id == self.killed and result["pid"] != self.pid:
            self.after.append(int(result["epoch"]))


def recorded_checkpoint(s3: LocalS3, prefix: str, timeout: float = 20.0) -> None:
    """Wait until the newest of Tune's ``experiment_state-*.json`` under ``prefix`` names a
    checkpoint (what a resume restores from)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = sorted(
            k for k in objects(s3, prefix) if Path(k).name.startswith("experiment_state-")
        )
        if states:
            with s3.filesystem().open_input_stream(states[-1]) as stream:
                if b"checkpoint_0" in stream.read():
                    return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in Tune's saved state under {prefix} after {timeout} s")


@pytest.mark.slow
def test_study_on_s3_resumes_after_a_killed_driver_and_retries_a_killed_worker(
    s3: LocalS3, cluster: Any, tmp_path: Path
) -> None:
    """A driver killed outright mid-study, then the study resumed on the cluster from the
    checkpoints in the bucket, a worker of it killed and retried from its last checkpoint (on
    either node): every epoch exactly once per MLflow run, finished trials' checkpoints pruned
    from the bucket, and the secret key nowhere."""
    from samstudy.study.runner import run_study
    from samstudy.study.spec import load_study
    from tests.test_study_run_driver import finish, run_until

    name = bucket(s3)
    study = write_study(
        tmp_path, "ons3", storage_path=f"s3://{name}/ray", storage_endpoint=s3.endpoint,
        base={**BASE, "epochs": 8},
    )  # fmt: skip
    first = driver(study, cluster.address)
    early = "".join(run_until(first, "epoch 3/"))  # a few checkpoints in the bucket
    # killed once Tune's saved state in the bucket records one (before that, a resume rightly
    # starts from epoch 1: under load the kill could come first)
    recorded_checkpoint(s3, f"{name}/ray/ons3")
    first.send_signal(signal.SIGKILL)  # no chance to save anything
    _, rest = finish(first)
    print("first driver (killed):\n" + early + rest)

    watch, out = Watch(s3, at=5), io.StringIO()
    result = run_study(
        load_study(str(study)), address=cluster.address, callbacks=[watch.callback],
        max_failures=2, out=out, progress_interval_s=0,
    )  # fmt: skip
    log = out.getvalue()
    print("resumed:\n" + log)
    assert result.status == "complete", log
    assert log.startswith(f"resuming study ons3: 2 trials (0 done) in s3://{name}/ray/ons3"), log
    assert not (tmp_path / "ray").exists()
    # the trials went on from their checkpoints in the bucket (from the start: epoch 1 first)
    firsts: dict[str, int] = {}
    for epoch, trial in re.findall(r"epoch (\d+)/8  (\w+)", log):
        firsts.setdefault(trial, int(epoch))
    assert len(firsts) == 2 and max(firsts.values()) > 1, firsts
    # the killed worker's trial was retried from its last checkpoint, not from the start
    assert watch.pid and "retry" in log, log
    assert watch.after and min(watch.after) >= 4 and watch.after[-1] == 8, watch.after
    assert len(watch.nodes) == 2  # results from both nodes: the storage is shared for real
    assert all(len(c) >= 2 for c in watch.checkpoints.values()), watch.checkpoints

    runs = trial_runs(result.tracking_uri, "ons3")
    assert len(runs) == 2 and len({r.data.tags["samstudy.trial_id"] for r in runs}) == 2
    for run in runs:
        assert epochs_logged(result.tracking_uri, run) == list(range(1, 9))
        assert run.data.tags["samstudy.status"] == "completed"
        assert run.info.status == "FINISHED"
    assert sum(run.data.tags.get("samstudy.retried") == "true" for run in runs) == 1

    stored = objects(s3, f"{name}/ray/ons3")
    assert f"{name}/ray/ons3/samstudy_state.json" in stored
    assert any(Path(k).name.startswith("experiment_state-") for k in stored)
    assert not [k for k in stored if "checkpoint_" in k]  # finished trials: pruned
    assert_secret_absent(s3, result.tracking_uri, "ons3", f"{name}/ray/ons3", early, rest, log)

    # grown by one seed on the bucket: only the new trial runs, in a Tune experiment of its
    # own beside the first one there; the two finished runs are left as they were
    before = {r.info.run_id for r in runs}
    grown = write_study(
        tmp_path, "ons3", storage_path=f"s3://{name}/ray", storage_endpoint=s3.endpoint,
        base={**BASE, "epochs": 8}, grid={"seed": [0, 1, 2]},
    )  # fmt: skip
    out = io.StringIO()
    again = run_study(load_study(str(grown)), address=cluster.address, out=out)
    assert again.status == "complete", out.getvalue()
    assert "growing study ons3: 1 new trials, 3 in all (2 done)" in out.getvalue(), out.getvalue()
    runs = trial_runs(result.tracking_uri, "ons3")
    assert len(runs) == 3 and before < {r.info.run_id for r in runs}
    assert any(k.startswith(f"{name}/ray/ons3/grow-1/") for k in objects(s3, f"{name}/ray/ons3"))
