"""The runner on a real two-node Ray cluster started inside the test (``ray.cluster_utils``)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from samstudy.study.runner import RunnerError, run_study  # noqa: E402
from samstudy.study.spec import StudySpec, study_from_mapping  # noqa: E402

BASE = {
    "data": {"name": "digits"},
    "model": {"name": "mlp"},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "epochs": 3,
    "threads": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


def make_study(tmp: Path, name: str, **fields: Any) -> StudySpec:
    data = {
        "name": name,
        "base": BASE,
        "grid": {"seed": [0, 1, 2, 3]},
        "storage_path": str(tmp / "ray"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        **fields,
    }
    return study_from_mapping(data, path=tmp / f"{name}.yaml")


def test_local_storage_is_refused_on_several_nodes(cluster: Cluster, tmp_path: Path) -> None:
    spec = make_study(tmp_path, "refused")
    with pytest.raises(RunnerError, match="2 nodes.*shared storage"):
        run_study(spec, address=cluster.address, shared_storage=False, out=io.StringIO())
    assert not (tmp_path / "ray").exists()  # nothing launched
    assert not ray.is_initialized()  # the runner disconnected from the cluster it joined


def test_trials_run_on_both_nodes(cluster: Cluster, tmp_path: Path) -> None:
    spec = make_study(tmp_path, "twonodes")
    result = run_study(spec, address=cluster.address, shared_storage=True, out=io.StringIO())
    assert result.status == "complete"
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("twonodes")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`samstudy.role` = 'trial'"
    )
    assert len(runs) == 4
    nodes = {run.data.tags["samstudy.node_id"] for run in runs}
    cluster_nodes = {node["NodeID"] for node in ray_nodes(cluster)}
    assert len(nodes) == 2 and nodes <= cluster_nodes


def ray_nodes(cluster: Cluster) -> list[dict]:
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        return [node for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()
