"""``python -m samstudy <command> ...``: one entry point, each command owned by its package.

Commands are imported lazily so that ``samstudy train`` never imports Ray or MLflow.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("samstudy.train.cli", "main", "run one trial from a config file"),
    "plan": ("samstudy.study.cli", "plan_main", "validate a study and print its trial table"),
    "study": ("samstudy.study.cli", "study_main", "run (or resume) a study with Ray Tune + MLflow"),
    "smoke": ("samstudy.study.cli", "smoke_main", "a few steps of each trial type: time, memory"),
    "ui": ("samstudy.study.cli", "ui_main", "open the MLflow UI on 127.0.0.1"),
    "status": ("samstudy.study.cli", "status_main", "where a study stands (from MLflow), with ETA"),
    "stop": ("samstudy.study.cli", "stop_main", "stop a running study from any shell (resumable)"),
    "export": ("samstudy.analysis.cli", "export_main", "export a study from MLflow to Parquet"),
    "report": ("samstudy.analysis.cli", "report_main", "build the HTML/markdown report of a study"),
    "summarize": (
        "samstudy.analysis.variant_runs",
        "summarize_main",
        "export a study, then write one MLflow run per variant (seed means, intervals)",
    ),
}


def _usage() -> str:
    lines = ["usage: samstudy <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "'samstudy <command> --help' lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"samstudy: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)
