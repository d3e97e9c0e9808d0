"""The cluster recipe of docs/running.md, run as written: two Ray nodes started with the ``ray``
command line (token authentication on), a driver joining them through ``RAY_ADDRESS`` with
``make study``; and the one-line refusals of a wrong token and of an address where nothing
answers.

The recipe's lines are read from the docs (between the ``cluster-recipe`` markers); the test
replaces only what names a real cluster: ``HEAD_IP`` (this machine's node address), the port,
``scp`` from the head (a copy between the two nodes' home folders), the study, the paths and
the tracking server (a sqlite file).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.processes import free_port, kill_processes_under

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "running.md"
RAY = ROOT / ".venv" / "bin" / "ray"


def recipe_sections() -> dict[str, list[str]]:
    """The recipe's command lines by its numbered comments (``1`` .. ``4``)."""
    text = DOCS.read_text()
    block = text.split("<!-- cluster-recipe -->", 1)[1].split("<!-- /cluster-recipe -->", 1)[0]
    sections: dict[str, list[str]] = {}
    current = ""
    for line in block.splitlines():
        line = line.strip()
        heading = re.match(r"# (\d)\. ", line)
        if heading:
            current = heading.group(1)
            sections[current] = []
        elif line and not line.startswith(("#", "```")):
            sections[current].append(line)
    return sections


def node_ip() -> str:
    """The address Ray gives this machine's nodes (it binds the head's port there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("8.8.8.8", 80))  # no packet is sent: this picks the outgoing interface
        return s.getsockname()[0]


class Machine:
    """One role of the recipe (head, worker, driver): its home folder and Ray temp folder."""

    def __init__(self, tmp: Path, name: str, ray_tmp: str) -> None:
        self.home = tmp / f"home-{name}"
        (self.home / ".ray").mkdir(parents=True)
        self.ray_tmp = ray_tmp

    def env(self, **extra: str) -> dict[str, str]:
        drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(HOME=str(self.home), RAY_TMPDIR=self.ray_tmp, OMP_NUM_THREADS="1", **extra)
        return env

    def run(self, lines: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        script = "set -e\n" + "\n".join(lines)
        return subprocess.run(
            ["bash", "-c", script],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short temp folder for the test's Ray nodes (Ray's socket paths must stay short)."""
    folder = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    try:
        yield folder
    finally:
        kill_processes_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_documented_cluster_recipe_runs_a_study(tmp_path: Path, ray_tmp: str) -> None:
    if not RAY.exists() or shutil.which("make") is None:
        pytest.skip("needs the project's .venv/bin/ray and make")
    sections = recipe_sections()
    assert set(sections) == {"1", "2", "3", "4"}, sections
    ip, port = node_ip(), free_port("")
    study = tmp_path / "recipe.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "recipe",
                "base": {
                    "data": {"name": "digits"},
                    "model": {"name": "mlp"},
                    "optimizer": {"name": "sgd", "lr": 0.05},
                    "epochs": 2,
                    "threads": 1,
                    "device": "cpu",
                },
                "seeds": [0, 1, 2, 3],
                "resources": {"cpus": 1, "gpus": 0},
            }
        )
    )
    storage, uri = tmp_path / "nfs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    head = Machine(tmp_path, "head", f"{ray_tmp}/h")
    worker = Machine(tmp_path, "worker", f"{ray_tmp}/w")

    def concrete(line: str) -> str:
        line = line.replace("HEAD_IP:.ray/auth_token", f"{head.home}/.ray/auth_token")
        line = re.sub(r"^scp ", "cp ", line)
        line = line.replace("HEAD_IP", ip).replace("6379", str(port))
        line = line.replace("NAME=same_checkpoints", f"NAME={study}")
        line = line.replace("/nfs/samstudy", str(storage))
        return line.replace("http://127.0.0.1:5000", uri)

    common = [concrete(line) for line in sections["1"]]
    done = head.run(common + [concrete(line) for line in sections["2"]])
    assert done.returncode == 0, done.stdout + done.stderr
    assert (head.home / ".ray" / "auth_token").is_file()
    done = worker.run(common + [concrete(line) for line in sections["3"]])
    assert done.returncode == 0, done.stdout + done.stderr
    # Both nodes in the cluster, seen by a driver that joins as the recipe says.
    count = [
        sys.executable,
        "-c",
        "import ray; ray.init(logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes())); ray.shutdown()",
    ]
    nodes = subprocess.run(
        count,
        env=worker.env(RAY_AUTH_MODE="token", RAY_ADDRESS=f"{ip}:{port}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nodes.stdout.strip().splitlines()[-1:] == ["2"], nodes.stdout + nodes.stderr

    done = worker.run(common + [concrete(line) for line in sections["4"]], timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "study recipe: complete" in out, out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("recipe")
    runs = client.search_runs([experiment.experiment_id], "tags.`samstudy.role` = 'trial'")
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    assert all(run.data.tags.get("samstudy.node_id") for run in runs)

    # A driver with a wrong token, and an address where nothing answers: one line, exit 2,
    # in seconds (Ray itself would retry for 20 to 40 s and end with a traceback).
    refused = [
        (
            worker.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32, RAY_ADDRESS=f"{ip}:{port}"),
            "refused this driver's authentication",
        ),
        (worker.env(RAY_ADDRESS=f"{ip}:{free_port('')}"), "cannot reach the Ray cluster"),
    ]
    for env, expected in refused:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "samstudy", "study", str(study)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - started
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode == 2, lines
        assert len(lines) == 1 and expected in lines[0], lines
        assert "Traceback" not in lines[0] and took < 20, (took, lines)

    # RAY_AUTH_MODE unset, the cluster's token in ~/.ray: the driver finds that the cluster
    # needs it and uses it (plan joins the cluster for its resource and data checks).
    done = subprocess.run(
        [sys.executable, "-m", "samstudy", "plan", str(study)],
        cwd=ROOT,
        env=worker.env(RAY_ADDRESS=f"{ip}:{port}"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and "pre-flight: ok" in done.stdout, done.stdout + done.stderr
