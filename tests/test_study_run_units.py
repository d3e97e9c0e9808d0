"""Runner pieces that need no Ray start: paths, search spaces, resume rules and the CLI's refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from samstudy.study import cli
from samstudy.study.callbacks import final_status
from samstudy.study.runner import RunnerError, run_study
from samstudy.study.searchspace import decode_overrides, param_space, search_space
from samstudy.study.spec import StudySpec, study_from_mapping
from samstudy.study.state import (
    STATE_FILE,
    ExperimentFiles,
    load_state,
    outcome,
    resolve_storage_path,
    study_fingerprint,
)
from samstudy.study.worker import EARLIER_EPOCHS, EpochBatcher, absolute_paths, epoch_results

BASE = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "epochs": 2, "threads": 1}


def grid_study(tmp: Path, name: str = "unit", **fields: Any) -> StudySpec:
    data = {
        "name": name,
        "base": BASE,
        "grid": {"seed": [0, 1]},
        "storage_path": str(tmp / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        **fields,
    }
    return study_from_mapping(data, path=tmp / f"{name}.yaml")


def test_storage_path_is_absolute(tmp_path: Path) -> None:
    assert resolve_storage_path(None, tmp_path) == str(tmp_path / "results" / "ray")
    assert resolve_storage_path("runs/x", tmp_path) == str(tmp_path / "runs" / "x")
    assert resolve_storage_path("/abs/path", tmp_path) == "/abs/path"
    assert resolve_storage_path("s3://bucket/studies/", tmp_path) == "s3://bucket/studies"


def test_relative_data_paths_become_absolute(tmp_path: Path) -> None:
    config = {"data": {"root": "data"}, "noise": {"label_file": "labels/c10n.pt"}, "seed": 1}
    out = absolute_paths(config, tmp_path)
    assert out["data"]["root"] == str(tmp_path / "data")
    assert out["noise"]["label_file"] == str(tmp_path / "labels" / "c10n.pt")
    assert config["data"]["root"] == "data"  # the input is not modified
    assert absolute_paths({"data": {"root": "/x"}}, tmp_path)["data"]["root"] == "/x"


def test_search_space_encodes_list_choices_and_includes_int_high(tmp_path: Path) -> None:
    spec = grid_study(
        tmp_path,
        grid=None,
        base={**BASE, "optimizer": {"name": "same", "scales": [1, 0, 0, 0]}},
        search={
            "num_samples": 2,
            "params": {
                "optimizer.scales": {
                    "type": "categorical",
                    "values": [[1, 0, 0, 0], [0, 1, 0, 0]],
                },
                "batch_size": {"type": "int", "low": 16, "high": 64, "log": True},
                "optimizer.rho": {"type": "float", "low": 0.01, "high": 0.5},
            },
        },
    )
    space = search_space(spec)["overrides"]
    assert space["optimizer.scales"].categories == ["[1, 0, 0, 0]", "[0, 1, 0, 0]"]
    assert (space["batch_size"].lower, space["batch_size"].upper) == (16, 65)
    assert (space["optimizer.rho"].lower, space["optimizer.rho"].upper) == (0.01, 0.5)
    point = {"optimizer.scales": "[0, 1, 0, 0]", "batch_size": 32, "optimizer.rho": 0.1}
    decoded = decode_overrides(spec, point)
    assert decoded["optimizer.scales"] == [0, 1, 0, 0] and decoded["batch_size"] == 32
    trial = spec.trial_from_overrides(decoded)
    assert trial.config["optimizer"]["scales"] == [0, 1, 0, 0]


def test_a_grid_goes_to_tune_longest_trial_first(tmp_path: Path) -> None:
    grid = {"optimizer.name": ["sgd", "sam"], "epochs": [2, 10], "seed": [0, 1]}
    spec = grid_study(tmp_path, grid=grid)
    order = [
        (t["config"]["epochs"], t["config"]["optimizer"]["name"], t["config"]["seed"])
        for t in param_space(spec, spec.expand())["trial"]["grid_search"]
    ]
    # plan's estimate: 10 epochs before 2, SAM's two passes before SGD's one, seeds in order
    assert order == [
        (10, "sam", 0),
        (10, "sam", 1),
        (10, "sgd", 0),
        (10, "sgd", 1),
        (2, "sam", 0),
        (2, "sam", 1),
        (2, "sgd", 0),
        (2, "sgd", 1),
    ]


def test_fingerprint_follows_the_trials_not_the_description(tmp_path: Path) -> None:
    one = grid_study(tmp_path, description="first")
    two = grid_study(tmp_path, description="second")
    three = grid_study(tmp_path, grid={"seed": [0, 1, 2]})
    assert study_fingerprint(one, one.expand()) == study_fingerprint(two, two.expand())
    assert study_fingerprint(one, one.expand()) != study_fingerprint(three, three.expand())


def test_search_study_of_the_previous_version_resumes_or_is_refused_clearly(
    tmp_path: Path,
) -> None:
    """Up to commit 4cb92f8 the optimizer mapping was untyped: its dump, and so a search study's
    fingerprint, kept ``scales: [1, 0, 0, 0]`` as ints. The value below is what that version
    computed for this very study; its experiment must still resume."""
    optimizer = {"name": "same", "scales": [1, 0, 0, 0], "rho": 0.1}
    rho = {"type": "float", "low": 0.01, "high": 0.5}
    search = {"num_samples": 2, "params": {"optimizer.rho": rho}}
    spec = grid_study(tmp_path, grid=None, base={**BASE, "optimizer": optimizer}, search=search)
    files = ExperimentFiles(str(tmp_path / "ray" / "unit"))
    fingerprint = study_fingerprint(spec, [])
    assert fingerprint != "6703ce23f8589e57"  # the typed dump has floats

    def saved(**fields: Any) -> None:
        state = {"study": "unit", "sha256": "0" * 64, "complete": False, "trials": {}}
        files.write_text(STATE_FILE, json.dumps({**state, **fields}))

    saved(fingerprint="6703ce23f8589e57")
    state = load_state(files, spec, [], fingerprint)
    assert state is not None and state["fingerprint"] == fingerprint  # saved anew when it runs

    saved(fingerprint="0123456789abcdef")  # another search
    with pytest.raises(RunnerError, match="trials changed.*Restore the file.*--fresh"):
        load_state(files, spec, [], fingerprint)
    saved(fingerprint="0123456789abcdef", overrides=["epochs=1"])  # another --set
    with pytest.raises(RunnerError, match=r"with --set \['epochs=1'\] and now runs with --set"):
        load_state(files, spec, [], fingerprint)
    saved(fingerprint="0123456789abcdef", sha256=spec.sha256)  # same file, other trials
    with pytest.raises(RunnerError, match="file is unchanged.*samstudy.git_commit.*--fresh"):
        load_state(files, spec, [], fingerprint)


def test_search_study_of_the_previous_version_with_mixed_numbers_resumes(tmp_path: Path) -> None:
    """The previous version hashed the optimizer mapping as written: ints and floats mixed
    (``[1.0, 0, -0.0, 2]``, ``rho: 1``). The value is what commit 4cb92f8 computed for it."""
    optimizer = {"name": "same", "scales": [1.0, 0, -0.0, 2], "rho": 1, "lr": 0.1}
    search = {
        "num_samples": 2,
        "params": {"optimizer.rho": {"type": "float", "low": 0.01, "high": 0.5}},
    }
    spec = grid_study(tmp_path, grid=None, base={**BASE, "optimizer": optimizer}, search=search)
    files = ExperimentFiles(str(tmp_path / "ray" / "unit"))
    state = {"study": "unit", "sha256": "0" * 64, "complete": False, "trials": {}}
    files.write_text(STATE_FILE, json.dumps({**state, "fingerprint": "0ccb8be56cbaf516"}))
    fingerprint = study_fingerprint(spec, [])
    assert fingerprint != "0ccb8be56cbaf516"
    assert load_state(files, spec, [], fingerprint)["fingerprint"] == fingerprint


def test_outcome_and_final_status(tmp_path: Path) -> None:
    spec = grid_study(tmp_path)
    ids = [t.trial_id for t in spec.expand()]
    state = {"trials": {ids[0]: {"status": "completed"}, ids[1]: {"status": "diverged"}}}
    assert outcome(spec, ids, state) == "complete"
    state["trials"][ids[1]] = {"status": "failed"}
    assert outcome(spec, ids, state) == "failed"
    state["trials"][ids[1]] = {"status": "running"}
    assert outcome(spec, ids, state) == "interrupted"
    assert outcome(spec, ids, {"trials": {}}) == "interrupted"
    assert final_status({"status": "diverged"}) == "diverged"
    assert final_status({"status": "running"}) == "stopped"  # ended early by ASHA
    assert final_status(None) == "stopped"


def test_changed_study_is_not_resumed(tmp_path: Path) -> None:
    spec = grid_study(tmp_path)
    experiment = tmp_path / "ray" / "unit"
    experiment.mkdir(parents=True)
    state = {"fingerprint": "something-else", "complete": False, "trials": {}}
    (experiment / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(RunnerError, match="--fresh"):
        run_study(spec)


def test_cli_refuses_bad_study_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase:\n  optimizer: {rho: -1}\n")
    assert cli.study_main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "rho" in err and "Traceback" not in err
    assert cli.plan_main([str(bad)]) == 2
    assert not (tmp_path / "results").exists()


def test_cli_refuses_file_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "filestore.yaml"
    study.write_text(
        "name: filestore\nbase: {epochs: 1}\n"
        f"storage_path: {tmp_path / 'ray'}\ntracking: {{tracking_uri: {tmp_path / 'mlruns'}}}\n"
    )
    assert cli.study_main([str(study)]) == 2
    assert "file store" in capsys.readouterr().err
    assert not (tmp_path / "ray").exists()


def test_cli_plan_prints_the_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = grid_study(tmp_path)
    (tmp_path / "unit.yaml").write_text(
        json.dumps({"name": "unit", "base": BASE, "grid": {"seed": [0, 1]}})
    )
    assert cli.plan_main([str(tmp_path / "unit.yaml")]) == 0
    out = capsys.readouterr().out
    for trial in spec.expand():
        assert trial.trial_id in out


def test_ray_client_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from samstudy.study.runner import init_ray

    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(RunnerError, match="Ray Client"):
        init_ray()
    assert not ray.is_initialized()


def test_runner_import_leaves_torch_to_the_trial() -> None:
    """A Tune worker imports the trainable's module before a trial starts: it must not pay for
    torch there (the trial imports it, inside its own clock), nor MLflow or Ray Tune's callbacks
    (only the driver uses them); nor must the CLI pay for torch for plan/validate."""
    code = (
        "import sys, samstudy.study.worker as w; "
        "print(w.trainable.__module__, *(m in sys.modules for m in ('torch', 'mlflow', "
        "'ray.tune', 'samstudy.study.callbacks'))); "
        "import samstudy.study.runner; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["samstudy.study.worker", *["False"] * 4, "False"]


def test_epoch_results_unpack_batched_epochs() -> None:
    result = {"epoch": 3, EARLIER_EPOCHS: [{"epoch": 1}, {"epoch": 2}]}
    assert [r["epoch"] for r in epoch_results(result)] == [1, 2, 3]
    assert epoch_results({"epoch": 1}) == [{"epoch": 1}]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_epoch_batcher_holds_short_epochs_and_sends_each_once() -> None:
    sent: list[tuple[dict, object]] = []
    clock = _Clock()
    batcher = EpochBatcher(lambda m, s: sent.append((m, s)), batch_s=1.0, clock=clock)

    def epoch(n: int, status: str = "running") -> dict:
        return {"epoch": n, "status": status}

    for n in (1, 2, 3):  # 0.3 s apart: held
        clock.now += 0.3
        batcher(epoch(n))
    assert sent == []
    clock.now += 0.3  # 1.2 s since the start: goes out with the three held
    batcher(epoch(4))
    assert [[e["epoch"] for e in epoch_results(m)] for m, _ in sent] == [[1, 2, 3, 4]]
    batcher(epoch(5))  # held
    batcher(epoch(6), state={"w": 1})  # a checkpoint goes at once, with the held epoch
    batcher(epoch(7))  # held
    batcher(epoch(8, "completed"))  # the last one goes at once
    epochs = [[e["epoch"] for e in epoch_results(m)] for m, _ in sent]
    assert epochs == [[1, 2, 3, 4], [5, 6], [7, 8]]
    assert [s for _, s in sent] == [None, {"w": 1}, None]
    assert all("_wall_time" in e for m, _ in sent for e in epoch_results(m))
    assert all(m[EARLIER_EPOCHS] is not batcher.held for m, _ in sent)


def test_epoch_batcher_keeps_a_checkpoint_at_most_every_checkpoint_min_s() -> None:
    sent: list[tuple[dict, object]] = []
    clock = _Clock()
    batcher = EpochBatcher(
        lambda m, s: sent.append((m, s)), batch_s=1.0, checkpoint_min_s=10.0, clock=clock
    )
    for n in range(1, 25):  # an epoch and a checkpoint every second
        clock.now += 1.0
        batcher({"epoch": n, "status": "running"}, state={"epoch": n})
    batcher({"epoch": 25, "status": "completed"}, state={"epoch": 25})  # the last is kept
    kept = [s["epoch"] for _, s in sent if s is not None]
    assert kept == [10, 20, 25]  # 10 s after the start, then 10 s after the last one kept
    # a dropped checkpoint's epoch still goes out once (here at once: a second has passed)
    assert [e["epoch"] for m, _ in sent for e in epoch_results(m)] == list(range(1, 26))

    every: list[object] = []
    exact = EpochBatcher(lambda m, s: every.append(s), batch_s=1.0, clock=_Clock())
    for n in (1, 2, 3):  # checkpoint_min_s = 0: each checkpoint kept, even at no elapsed time
        exact({"epoch": n, "status": "running"}, state={"epoch": n})
    assert every == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]


def test_epoch_batcher_drops_the_last_checkpoint_unless_kept_or_stopping() -> None:
    """checkpoints.keep_final: false: the last epoch goes out without its checkpoint (the driver
    would delete it on arrival); kept with keep_final, and when the study is being stopped."""

    def last_state(keep_final: bool, stopping: bool = False, status: str = "completed"):
        sent: list[tuple[dict, object]] = []
        batcher = EpochBatcher(
            lambda m, s: sent.append((m, s)), batch_s=0.0, clock=_Clock(), keep_final=keep_final
        )
        batcher({"epoch": 1, "status": "running"}, state={"epoch": 1})
        batcher.keep_checkpoints = stopping
        batcher({"epoch": 2, "status": status}, state={"epoch": 2})
        assert sent[0][1] == {"epoch": 1}  # a running epoch's checkpoint goes out either way
        assert [m["epoch"] for m, _ in sent] == [1, 2]
        return sent[-1][1]

    assert last_state(keep_final=False) is None
    assert last_state(keep_final=False, status="diverged") is None
    assert last_state(keep_final=True) == {"epoch": 2}
    assert last_state(keep_final=False, stopping=True) == {"epoch": 2}


def test_epoch_batcher_flush_after_an_error_and_batch_zero() -> None:
    sent: list[dict] = []
    batcher = EpochBatcher(lambda m, s: sent.append(m), batch_s=60.0)
    for n in (1, 2, 3):
        batcher({"epoch": n, "status": "running"})
    assert sent == []
    batcher.flush()  # what the trainable does when the trainer raises
    assert [[e["epoch"] for e in epoch_results(m)] for m in sent] == [[1, 2, 3]]
    batcher.flush()  # nothing held: nothing sent
    assert len(sent) == 1

    every: list[dict] = []
    unbatched = EpochBatcher(lambda m, s: every.append(m), batch_s=0.0)
    for n in (1, 2, 3):
        unbatched({"epoch": n, "status": "running"})
    assert [m["epoch"] for m in every] == [1, 2, 3]
    assert all(m["_earlier_epochs"] == [] for m in every)


def test_eta_from_measured_epoch_times() -> None:
    from samstudy.study.status import duration, eta_seconds

    # one trial at epoch 10 of 40 at 0.5 s/epoch, two pending trials
    assert eta_seconds([(10, 40, 0.5)], 2, None, 1) == 15 + 2 * 40 * 0.5  # priced as running
    assert eta_seconds([(10, 40, 0.5)], 2, 30.0, 2) == (15 + 60) / 2  # finished trials' mean
    assert eta_seconds([], 3, None, 1) is None  # nothing measured yet: no guess
    assert eta_seconds([], 0, None, 1) == 0.0
    assert [duration(s) for s in (42, 1020, 12600)] == ["42 s", "17 min", "3.5 h"]


def test_a_trial_error_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's error reaches MLflow tags, the console and the state file: a password in a
    URI it quotes, or the value of a secret variable, is hidden before any of them sees it."""
    from samstudy.study.failures import describe

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-token")
    try:
        raise ConnectionError("no answer at postgresql://alice:s3cr3t@db/mlflow (hunter2-token)")
    except ConnectionError as exc:
        failure = describe(exc, epoch=3)
    for text in (failure.message, failure.traceback, failure.summary):
        assert "s3cr3t" not in text and "hunter2-token" not in text
    assert "postgresql://alice:***@db/mlflow" in failure.message


class _ErroredTrial:
    """What the failure book reads of a Tune trial whose worker sent no error record."""

    trial_id = "t1"
    max_failures = 3
    error_file = None

    def __init__(self, path: str) -> None:
        self.path = path

    def get_pickled_error(self) -> None:
        raise FileNotFoundError("no pickled error")

    def get_error(self) -> str:
        return "Traceback (most recent call last):\nRuntimeError: boom"


@pytest.mark.parametrize(
    ("scheme", "path", "shown"),
    [
        ("s3", "bucket/studies/q/trial_1", "s3://bucket/studies/q/trial_1/error.txt"),
        ("", "/data/ray/q/trial_1", "/data/ray/q/trial_1/error.txt"),
    ],
)
def test_the_error_file_is_named_where_a_user_opens_it(scheme: str, path: str, shown: str) -> None:
    """On S3, Tune knows the trial's folder without its scheme; the failure names the URI."""
    from samstudy.study.callbacks import FailureBook

    book = FailureBook(3, scheme)
    trial = _ErroredTrial(path)
    book.on_trial_error(trial)
    failure = book.take(trial)
    assert failure.error_file == shown
    assert failure.summary == "TrialError: RuntimeError: boom"


def test_a_requested_exit_inside_a_gc_callback_prints_no_traceback() -> None:
    # Ray's SIGTERM handler raises SystemExit; landing in a WeakSet callback during a stop,
    # Python printed "Exception ignored ... Traceback" into the driver's terminal. In a fresh
    # process (pytest installs its own unraisable hook): SystemExit is silent, others are not.
    code = """
import gc, weakref
from samstudy.study.worker import quiet_requested_exits
class Box: pass
def raising(kind):
    def callback(_ref):
        raise kind("from a gc callback")
    return callback
quiet_requested_exits(); quiet_requested_exits()
for kind in (SystemExit, ValueError):
    box = Box()
    ref = weakref.ref(box, raising(kind))
    del box
    gc.collect()
print("alive")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out
    assert "SystemExit" not in out.stderr, out.stderr
    assert "ValueError: from a gc callback" in out.stderr, out.stderr
