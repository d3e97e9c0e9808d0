"""The slot-time accounting of benchmarks/bench_ray.py, on a timeline written by hand.

The bench itself (real Ray, real studies) runs in ``make bench``; here only its arithmetic:
every slot-second lands in exactly one part, and the parts add up to the study's wall time.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_ray import FLOOR_IMPORTS, _Timeline, account, worker_floor


def test_account_splits_every_slot_second() -> None:
    timeline = _Timeline()
    begin, wall = 100.0, 20.0
    # worker 1: trial a (starts 102, epochs of 2 s from 104 to 108), trial b (starts 108.5,
    # first epoch from 108.6; one epoch ends at 111.6, the next 0.4 s later)
    # worker 2: trial c (starts 103, epochs from 106 to 117)
    timeline.started.update({"a": 102.0, "b": 108.5, "c": 103.0})
    timeline.pid.update({"a": 1, "b": 1, "c": 2})
    timeline.epochs["a"] = [(106.0, 2.0), (108.0, 2.0)]
    timeline.epochs["b"] = [(111.6, 3.0), (114.0, 2.0)]
    timeline.epochs["c"] = [(117.0, 11.0)]
    parts = account(timeline, begin, wall, slots=2)

    expect = {
        "training": (4.0 + 5.0 + 11.0) / 2,
        "start": (2.0 + 3.0) / 2,
        "first_setup": (2.0 + 3.0) / 2,  # a: 102 -> 104, c: 103 -> 106
        "setup": 0.1 / 2,  # b: 108.5 -> 108.6
        "between_epochs": 0.4 / 2,  # b: 111.6 -> 112.0
        "between_trials": 0.5 / 2,  # a's last epoch 108 -> b starts 108.5
        "tail": (120.0 - 114.0 + 120.0 - 117.0) / 2,
        "idle": 0.0,
    }
    assert parts == pytest.approx(expect)
    assert sum(parts.values()) == pytest.approx(wall)


def test_account_counts_a_slot_that_never_ran() -> None:
    timeline = _Timeline()
    timeline.started["a"] = 1.0
    timeline.pid["a"] = 7
    timeline.epochs["a"] = [(3.0, 2.0)]
    parts = account(timeline, begin=0.0, wall=4.0, slots=2)
    assert parts["idle"] == pytest.approx(2.0)  # the second slot, all 4 s, halved per slot
    assert sum(parts.values()) == pytest.approx(4.0)


def test_worker_floor_times_each_import_in_a_fresh_process() -> None:
    floor = worker_floor(repeats=1)
    assert list(floor) == list(FLOOR_IMPORTS)
    # imported for real in a new process (here they are loaded already): each takes a
    # measurable time, torch the most (about a second on this machine)
    assert all(seconds > 0 for seconds in floor.values()), floor
    assert floor["torch"] > 0.1 and floor["torch"] == max(floor.values()), floor
