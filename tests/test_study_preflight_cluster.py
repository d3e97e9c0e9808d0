"""Pre-flight on a real 2-node cluster started with the ``ray`` command line: data staged on
the head but missing on the worker node (its own mount namespace hides the folder) is refused
by ``plan``, naming the worker node only; with the data on both nodes, plan says ok and counts
the trials that fit on the cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.processes import free_port, kill_processes_under
from tests.test_cluster_recipe import node_ip
from tests.test_data import write_cifar10

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = ROOT / ".venv" / "bin" / "ray"


def test_plan_names_the_node_where_the_data_is_missing(tmp_path: Path) -> None:
    if not RAY.exists() or shutil.which("unshare") is None:
        pytest.skip("needs the project's .venv/bin/ray and unshare")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare -m needs root)")
    data = tmp_path / "data"
    write_cifar10(data)
    study = tmp_path / "staged.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "staged",
                "base": {
                    "data": {"name": "cifar10", "root": str(data)},
                    "model": {"name": "mlp"},
                    "optimizer": {"name": "sgd", "lr": 0.05},
                    "epochs": 1,
                    "device": "cpu",
                },
                "storage_path": str(tmp_path / "ray"),
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"},
            }
        )
    )
    ray_tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["HOME"] = str(tmp_path)  # no token here: a cluster without authentication
    ip, port = node_ip(), free_port("")
    start = [str(RAY), "start", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [*start, "--head", "--port", str(port), "--include-dashboard", "false"],
            env={**env, "RAY_TMPDIR": f"{ray_tmp}/h"}, check=True, capture_output=True,
            timeout=120,
        )  # fmt: skip
        hide = f"mount -t tmpfs tmpfs {data} && exec {' '.join(start)} --address {ip}:{port}"
        subprocess.run(
            ["unshare", "-m", "sh", "-c", hide],
            env={**env, "RAY_TMPDIR": f"{ray_tmp}/w"}, check=True, capture_output=True,
            timeout=120,
        )  # fmt: skip
        plan = [sys.executable, "-m", "samstudy", "plan", str(study)]
        done = subprocess.run(
            plan, cwd=ROOT, env={**env, "RAY_ADDRESS": f"{ip}:{port}"}, capture_output=True,
            text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        (line,) = [x for x in done.stderr.splitlines() if "data: cifar10" in x]
        missing = re.findall(r"\(node (\w+)\)", line)
        assert len(missing) == 1, line  # the worker only: the head has the data
        assert "concurrency: 2 trials at once on the Ray cluster" in done.stdout, done.stdout
        assert "over 2 node(s)" in done.stdout
    finally:
        kill_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
