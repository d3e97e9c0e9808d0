"""``samstudy train``: one trial from a YAML config (the mapping a study trial gets).

Prints one progress line per epoch, writes the metrics (final and per epoch) to a JSON file and,
with ``--checkpoint-dir``, the latest checkpoint to ``DIR/last.pt`` (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from samstudy import configio
from samstudy.configio import ConfigError, problems, read_yaml, report
from samstudy.train.config import TrialConfig, load_trial_config

EXIT_BAD_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samstudy train",
        description="Run one trial from a config file and write its per-epoch metrics.",
        epilog="example: samstudy train --config trial.yaml --set optimizer.rho=0.1 "
        "--set noise.rate=0.4 --out metrics.json",
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="trial config (YAML mapping); default: all defaults"
    )
    configio.add_set_option(parser, "one field")
    parser.add_argument(
        "--out", metavar="metrics.json", default="metrics.json", help="metrics JSON file"
    )
    parser.add_argument("--resume", metavar="CKPT.pt", help="continue from this checkpoint")
    parser.add_argument(
        "--checkpoint-dir", metavar="DIR", help="write each checkpoint to DIR/last.pt (atomically)"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    return parser


def apply_override(mapping: dict[str, Any], assignment: str) -> None:
    """Set ``key.path=value`` in a trial config mapping, in place (``configio.apply_override``)."""
    configio.apply_override(mapping, assignment, TrialConfig, TrialConfig().model_dump(mode="json"))


def load_config_file(path: str | None) -> dict[str, Any]:
    """Read a YAML mapping with the config loader; no file (or an empty one) means ``{}``."""
    if path is None:
        return {}
    loaded = read_yaml(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, got {type(loaded).__name__}"
        )
    return loaded


def format_validation_error(source: str, error: ValidationError) -> str:
    """One ``source: field.path: message`` line per problem (the message names what is allowed)."""
    return report(source, problems(error, TrialConfig))


def _finite_or_none(value: Any) -> Any:
    # Strict JSON has no NaN/Infinity: undefined rates (no noisy samples) and diverged losses
    # are written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: _finite_or_none(value) for key, value in metrics.items()}


def progress_line(metrics: dict[str, Any], epochs: int) -> str:
    """One human-readable line for an epoch's metrics."""

    def f(key: str, digits: int = 3) -> str:
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}"

    line = (
        f"epoch {metrics['epoch']:>3}/{epochs}  loss {f('train_loss')}  acc {f('train_acc')} "
        f"(clean {f('train_acc_clean')}, noisy {f('train_acc_noisy')})  "
        f"mem {f('memorization')} rec {f('recovery')}  test {f('test_acc')} "
        f"(best {f('best_test_acc')} @{metrics.get('best_epoch', '-')})  lr {f('lr', 4)}  "
        f"{f('epoch_time', 1)}s {f('samples_per_sec', 0)}/s"
    )
    if "sharpness_lambda_max" in metrics:
        line += f"  lambda_max {f('sharpness_lambda_max', 2)} trace {f('sharpness_trace', 1)}"
    if metrics.get("status") not in (None, "running"):
        line += f"  [{metrics['status']}]"
    return line


def main(argv: list[str]) -> int:
    """Entry point of ``samstudy train``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): a return value, not an exit
        return int(exc.code or 0)
    source = args.config or "<defaults + --set>"
    try:
        mapping = load_config_file(args.config)
        for assignment in args.overrides:
            apply_override(mapping, assignment)
        cfg = load_trial_config(mapping)
    except ConfigError as exc:
        print(f"samstudy train: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except ValidationError as exc:
        print(f"samstudy train: {format_validation_error(source, exc)}", file=sys.stderr)
        return EXIT_BAD_CONFIG

    # Imported here: config errors are reported without loading data or model code.
    from samstudy.train.checkpoint import load_checkpoint, save_checkpoint
    from samstudy.train.loop import run_trial

    resume = None
    if args.resume:
        try:
            resume = load_checkpoint(args.resume)
        except (OSError, RuntimeError) as exc:
            print(f"samstudy train: {args.resume}: cannot load checkpoint ({exc})", file=sys.stderr)
            return 1

    out = Path(args.out)
    history: list[dict[str, Any]] = list(resume["history"]) if resume else []
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None

    def write_metrics(final: dict[str, Any]) -> None:
        payload = {
            "config": cfg.model_dump(),
            "status": final.get("status"),
            "final": _clean(final),
            "history": [_clean(m) for m in history],
        }
        _write_json(out, payload)

    def report(metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        history.append(metrics)
        if not args.quiet:
            print(progress_line(metrics, cfg.epochs), flush=True)
        if checkpoint is not None and checkpoint_dir is not None:
            save_checkpoint(checkpoint, checkpoint_dir / "last.pt")
        # Rewritten every epoch so that an interrupted run still leaves its metrics behind.
        write_metrics(metrics)

    try:
        final = run_trial(mapping, report, resume=resume)
    except (ValueError, FileNotFoundError) as exc:
        # Problems found while building the trial (missing CIFAR files, bad model kwargs,
        # a checkpoint of another config): one message, no traceback.
        print(f"samstudy train: {source}: {exc}", file=sys.stderr)
        return 1
    write_metrics(final)
    if not args.quiet:
        print(f"status {final['status']}; metrics written to {out}")
    return 0
