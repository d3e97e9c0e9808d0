"""The target table's arithmetic in ``benchmarks/bench_optim.py``, on a clock the test drives:
blocks shorter than the default statistics cycle are weighed as that cycle for every row of plain
``sam`` at its default statistics, and the block's own figure stays beside it as information."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import bench_optim
from samstudy.optim.config import DEFAULT_STATS_EVERY


class Clock:
    """Process and wall time that advance only when a fake step says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def runner(clock: Clock, first: float, rest: float) -> bench_optim.Runner:
    """A step costing ``first`` seconds at a block's first position (the measured step) and
    ``rest`` elsewhere; the block's end resets the position."""
    position = [0]

    def step(x: object, y: object) -> None:
        clock.now += first if position[0] == 0 else rest
        position[0] += 1

    def end() -> None:
        position[0] = 0

    return step, end


def ratios(lines: list[str]) -> dict[str, tuple[float, str]]:
    """label -> (ratio by CPU time, verdict) of the printed rows."""
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = (float(cells[3]), cells[-1])
    return out


def test_rows_of_sam_at_its_default_statistics_are_weighed_as_the_default_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    # the module's own name for time: other threads of this process keep the real clock
    monkeypatch.setattr(
        bench_optim, "time", SimpleNamespace(process_time=clock, perf_counter=clock)
    )
    block = 4

    def sam() -> bench_optim.Runner:  # its statistics at position 0
        return runner(clock, 0.008, 0.002)

    def plain() -> bench_optim.Runner:
        return runner(clock, 0.002, 0.002)

    rows = [
        (bench_optim.PORT_ROW, sam, plain, 1.00),
        (bench_optim.STATS_ROW, sam, plain, 1.02),
        ("same vs sam, statistics off", sam, plain, 1.05),  # not at the default: its blocks
    ]
    verdicts: list = []
    got = ratios(bench_optim._run_rows("m", rows, [(0, 0)] * block, 2, verdicts, epoch=False))

    cycle = (0.008 + (DEFAULT_STATS_EVERY - 1) * 0.002) / DEFAULT_STATS_EVERY / 0.002
    assert got[bench_optim.PORT_ROW] == (pytest.approx(cycle, abs=5e-4), "MISS")
    assert got[bench_optim.STATS_ROW] == (pytest.approx(cycle, abs=5e-4), "MISS")
    # the blocks' own figure, one measured step in 4: information, no verdict
    upper = (0.008 + 3 * 0.002) / 4 / 0.002
    upper = pytest.approx(upper, abs=5e-4)
    assert got[f"{bench_optim.PORT_ROW}, statistics on one step in 4"] == (upper, "information")
    assert got["statistics on one step in 4 vs off"] == (upper, "information")
    assert got["same vs sam, statistics off"] == (upper, "MISS")
    assert [label for _, label, _, _ in verdicts] == [
        bench_optim.PORT_ROW,
        bench_optim.STATS_ROW,
        "same vs sam, statistics off",
    ]


def test_a_block_of_a_whole_epoch_is_not_reweighed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    # the module's own name for time: other threads of this process keep the real clock
    monkeypatch.setattr(
        bench_optim, "time", SimpleNamespace(process_time=clock, perf_counter=clock)
    )
    rows = [
        (
            bench_optim.BARE_ROW,
            lambda: runner(clock, 0.004, 0.002),
            lambda: runner(clock, 0.002, 0.002),
            1.10,
        )
    ]
    got = ratios(bench_optim._run_rows("m", rows, [(0, 0)] * 4, 2, [], epoch=True))
    assert got == {bench_optim.BARE_ROW: (pytest.approx(1.25), "MISS")}
