"""Growing a finished study: a seed added to its file runs only the new trials, the old MLflow
runs (and their metric histories) stay as they were, and one parent run covers all; a change
that would alter trials that ran is refused with a field-by-field diff; trials taken out of the
file are left alone. Real Ray (local), real sqlite MLflow, the study file edited on disk."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

from samstudy.study.runner import RunnerError, run_study  # noqa: E402
from samstudy.study.spec import load_study  # noqa: E402
from tests.studies import digits_sam_base  # noqa: E402

EPOCHS = 3


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def write(path: Path, **changes: Any) -> Path:
    study: dict[str, Any] = {
        "name": "grow",
        "base": digits_sam_base(EPOCHS),
        "grid": {"optimizer.name": ["sam", "sgd"]},
        "seeds": [0],
        "storage_path": str(path.parent / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{path.parent / 'mlflow.db'}"},
    }
    for key, value in changes.items():
        if key == "epochs":
            study["base"]["epochs"] = value
        else:
            study[key] = value
    path.write_text(yaml.safe_dump(study))
    return path


def trial_runs(client: MlflowClient) -> dict[str, Any]:
    experiment = client.get_experiment_by_name("grow")
    runs = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'trial'")
    return {run.data.tags["samstudy.trial_id"]: run for run in runs}


def history(client: MlflowClient, run_id: str) -> list[tuple[int, float, int]]:
    return sorted(
        (m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train_loss")
    )


def test_a_finished_study_grows_by_one_seed(local_ray: None, tmp_path: Path) -> None:
    path = write(tmp_path / "grow.yaml")
    first = run_study(load_study(path), out=io.StringIO())
    assert first.status == "complete"
    client = MlflowClient(first.tracking_uri)
    before = trial_runs(client)
    assert len(before) == 2
    histories = {i: history(client, run.info.run_id) for i, run in before.items()}

    # one more seed: only the two new trials run
    write(path, seeds=[0, 1])
    out = io.StringIO()
    grown = run_study(load_study(path), out=out)
    text = out.getvalue()
    assert grown.status == "complete", text
    assert "growing study grow: 2 new trials" in text, text
    after = trial_runs(client)
    assert len(after) == 4 and set(before) < set(after)
    for trial_id, run in before.items():  # the old runs untouched
        assert after[trial_id].info.run_id == run.info.run_id
        assert history(client, run.info.run_id) == histories[trial_id]
    for trial_id in set(after) - set(before):  # the new ones whole
        steps = [s for s, _, _ in history(client, after[trial_id].info.run_id)]
        assert steps == list(range(1, EPOCHS + 1))
        assert after[trial_id].data.tags["samstudy.status"] == "completed"
    started = [line for line in text.splitlines() if " start " in f" {line} "]
    assert len(started) == 2, text  # nothing old started again
    experiment = client.get_experiment_by_name("grow")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'parent'")
    assert parent.data.tags["samstudy.trials"] == "4" and parent.info.status == "FINISHED"
    assert run_study(load_study(path), out=io.StringIO()).status == "already_complete"

    # a change to what the trials are is refused, field by field, and nothing runs
    write(path, seeds=[0, 1], epochs=EPOCHS + 2)
    with pytest.raises(RunnerError) as refused:
        run_study(load_study(path), out=io.StringIO())
    message = str(refused.value)
    assert f"base.epochs: {EPOCHS} -> {EPOCHS + 2}" in message, message
    assert "--fresh" in message and "new study name" in message, message
    assert trial_runs(client).keys() == after.keys()

    # taking seed 0 out of the file leaves its runs alone
    write(path, seeds=[1])
    out = io.StringIO()
    shrunk = run_study(load_study(path), out=out)
    assert shrunk.status in ("complete", "already_complete"), out.getvalue()
    assert "2 trials are no longer in the study file" in out.getvalue(), out.getvalue()
    final = trial_runs(client)
    assert {i: r.info.run_id for i, r in final.items()} == {
        i: r.info.run_id for i, r in after.items()
    }
