"""Shared pytest set-up: small thread counts so tests behave on a 2-core machine, and what
``make test`` needs to run the suite on two pytest-xdist workers (``-n 2 --dist loadfile``)."""

import os
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
if "PYTEST_XDIST_WORKER" in os.environ:
    # Each pytest-xdist worker of this run has a Ray temp folder of its own: its session
    # folders, the `session_latest` link and the address file a plain ray.init() would join
    # (tests that run `ray start` give it a folder of their own as well). The controller's pid
    # keeps two runs on one machine apart; a short path, for Ray's sockets.
    worker = os.environ["PYTEST_XDIST_WORKER"]
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{os.getppid()}-{worker}"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# The longest modules, measured alone on a 2-core machine (75-180 s each): started first.
LONGEST = (
    "test_study_run_driver.py",
    "test_analysis_studies.py",
    "test_study_faults.py",
    "test_study_control.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, then the other modules with end-to-end (``slow``) tests, then
    the rest; each module's own order is kept. ``--dist loadfile --no-loadscope-reorder`` hands
    out whole modules in this order, so the long ones start early and the quick ones fill in at
    the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.name in LONGEST:
            return 0, LONGEST.index(item.path.name)
        return (1 if item.path in slow else 2), 0

    items.sort(key=rank)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish() -> None:
    """A worker's Ray temp folder goes when its run ends (about 10 MB each): trylast, after the
    session fixtures have stopped the clusters that wrote there."""
    folder = os.environ.get("RAY_TMPDIR", "")
    if "PYTEST_XDIST_WORKER" in os.environ and folder.startswith("/tmp/ray-"):
        shutil.rmtree(folder, ignore_errors=True)
