"""``CheckpointPruner.sweep`` before a resume, on a local experiment folder whose saved state is
written as Tune writes it (each trial's checkpoint manager pickled, hex, inside the JSON):
what a killed driver left goes (held deletions, finished trials not pruned yet), what the state
names or may still need stays. ``test_study_run_driver`` runs it on a state Tune wrote."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from samstudy.study.pruning import CheckpointPruner
from samstudy.study.state import ExperimentFiles

STATE = "experiment_state-2026-12-04_10-00-00.json"


def tune_state(folder: Path, trials: dict[str, tuple[str, list[Path]]]) -> str:
    """An ``experiment_state-*.json``: trial folder name -> (Tune status, the checkpoints its
    checkpoint manager names). Returns its text."""
    data = []
    for i, (name, (status, named)) in enumerate(trials.items()):
        manager = {"checkpoints": [{"path": str(p), "filesystem": "local"} for p in named]}
        runtime = {
            "num_failures": 0,
            "checkpoint_manager": {
                "_type": "CLOUDPICKLE_FALLBACK",
                "value": pickle.dumps(manager).hex(),
            },
        }
        record = {"trial_id": f"a_{i:05d}", "status": status, "relative_logdir": name}
        data.append([json.dumps(record), json.dumps(runtime)])
    text = json.dumps({"trial_data": data, "runner_data": {}})
    (folder / STATE).write_text(text)
    return text


def checkpoints(folder: Path, *indices: int) -> list[Path]:
    made = []
    for i in indices:
        path = folder / f"checkpoint_{i:06d}"
        path.mkdir(parents=True)
        (path / "state.pt").write_bytes(b"x")
        made.append(path)
    return made


def test_sweep_removes_held_deletions_and_finished_trials_only(tmp_path: Path) -> None:
    exp = tmp_path / "ray" / "study"
    held, named, newer = checkpoints(exp / "t0", 0, 1, 2)  # 0: a deletion held at the kill
    gap_old, named_a, gap, named_b = checkpoints(exp / "t1", 3, 4, 5, 6)
    unknown = checkpoints(exp / "t2", 0, 1)  # a trial the state names nothing of
    done = checkpoints(exp / "t3", 7, 8)  # finished, its pruning not done when the driver died
    trials = {
        "t0": ("RUNNING", [named]),
        "t1": ("RUNNING", [named_a, named_b]),
        "t3": ("TERMINATED", [done[-1]]),
    }
    tune_state(exp, trials)
    files = ExperimentFiles(str(exp))

    # checkpoints.keep_final: true (finished=False): a finished trial keeps what the state names
    assert CheckpointPruner(files, finished=False).sweep() == 4
    gone = {held, gap_old, gap, done[0]}
    for path in [held, named, newer, gap_old, named_a, gap, named_b, *unknown, *done]:
        assert path.exists() == (path not in gone), path

    # keep_final: false, the default: a finished trial's checkpoints all go
    assert CheckpointPruner(files).sweep() == 1
    assert not done[-1].exists() and all(path.exists() for path in [named, newer, *unknown])


def test_sweep_leaves_everything_without_a_whole_state(tmp_path: Path) -> None:
    exp = tmp_path / "study"
    older, newer = checkpoints(exp / "t0", 0, 1)
    files = ExperimentFiles(str(exp))
    assert CheckpointPruner(files).sweep() == 0  # no state at all
    text = tune_state(exp, {"t0": ("RUNNING", [newer])})
    # cut short (written while the storage filled up) after the part that names `newer`
    (exp / STATE).write_text(text[: text.index('"runner_data"')])
    assert CheckpointPruner(files).sweep() == 0
    assert older.exists() and newer.exists()
    (exp / STATE).write_text(text)  # whole, it would have gone
    assert CheckpointPruner(files).sweep() == 1 and not older.exists()
