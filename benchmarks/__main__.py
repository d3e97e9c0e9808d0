"""Run every ``benchmarks/bench_*.py`` and write its markdown table to ``benchmarks/results/``.

Each benchmark module exposes ``run(quick: bool) -> str | None`` returning a markdown section
(None: nothing to measure on this machine, e.g. ``bench_gpu`` without CUDA; its file is left as
it is). Ratios are always taken within one run of one module, so machine load affects both sides
alike. ``--only gpu`` is ``--only bench_gpu``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        type=lambda name: name if name.startswith("bench_") else f"bench_{name}",
        choices=names,
        help="run only these (repeatable; the bench_ prefix may be left out)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    args = parser.parse_args(argv)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    for name in args.only or names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        section = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        if section is None:  # nothing measured here: keep the figures of a machine that could
            continue
        header = (
            f"<!-- {dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
            f"({platform.machine()}, python {platform.python_version()}), "
            f"{time.perf_counter() - start:.0f} s{' quick' if args.quick else ''} -->\n"
        )
        (out_dir / f"{name}.md").write_text(header + section)
        print(section, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
