"""Fractional GPUs without a GPU: a real two-node Ray cluster whose nodes declare two logical
GPUs each runs a study with ``resources.gpus: 0.5`` and ``device: auto``. Ray packs at most
four trials per node, each trial's GPU ids are recorded as a tag, and the trainer takes the CPU
where CUDA is absent instead of failing."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from samstudy.study.runner import run_study  # noqa: E402
from samstudy.study.spec import study_from_mapping  # noqa: E402
from samstudy.study.worker import TRIAL_CLOCK, TRIAL_START  # noqa: E402

EPOCHS = 5


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    # 4 CPUs (logical: this machine has 2 cores) and 2 GPUs each: 4 trials of 0.5 GPU fit a node
    head = {"num_cpus": 4, "num_gpus": 2, "include_dashboard": False}
    nodes = Cluster(initialize_head=True, head_node_args=head)
    nodes.add_node(num_cpus=4, num_gpus=2)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


def test_half_gpu_trials_pack_four_per_node(gpu_cluster: Cluster, tmp_path: Path) -> None:
    spec = study_from_mapping(
        {
            "name": "halves",
            "base": {
                "data": {"name": "digits"},
                "model": {"name": "mlp"},
                "optimizer": {"name": "sgd", "lr": 0.05},
                "epochs": EPOCHS,
                "threads": 1,
                "device": "auto",
            },
            "seeds": list(range(10)),  # more than the 8 that fit at once
            "resources": {"cpus": 1, "gpus": 0.5},
            "storage_path": str(tmp_path / "ray"),
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        },
        path=tmp_path / "halves.yaml",
    )
    result = run_study(spec, address=gpu_cluster.address, shared_storage=True, out=io.StringIO())
    assert result.status == "complete", result.failures
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("halves")
    runs = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'trial'")
    assert len(runs) == 10
    for run in runs:
        tags = run.data.tags
        assert tags["samstudy.device"] == "cpu"  # auto without CUDA: the CPU, no failure
        ids = tags["samstudy.gpu_ids"].split(",")
        assert len(ids) == 1 and ids[0] in ("0", "1"), tags["samstudy.gpu_ids"]  # half a GPU
    # each trial's span on its node, from the worker's own clocks in Tune's result.json
    spans: dict[str, list[tuple[float, float]]] = {}
    for results in (tmp_path / "ray" / "halves").glob("*/result.json"):
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        start, last = lines[0][TRIAL_START], lines[-1]
        spans.setdefault(last["node_id"], []).append((start, start + last[TRIAL_CLOCK]))
    assert sum(map(len, spans.values())) == 10 and len(spans) == 2  # both nodes took trials
    for node, intervals in spans.items():
        assert _most_at_once(intervals) <= 4, (node, intervals)
    assert max(_most_at_once(i) for i in spans.values()) >= 2  # the GPUs were shared


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = running = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most
