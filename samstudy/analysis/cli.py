"""``samstudy export NAME`` and ``samstudy report NAME`` (``make export`` / ``make report``)."""

from __future__ import annotations

import argparse
import os
import sys

from samstudy.analysis.schema import DEFAULT_ROOT

EXIT_BAD_CONFIG = 2  # as `samstudy train`, `plan` and `study`: a config that cannot be used


def _stages(text: str) -> dict[str, tuple[float, float]]:
    """Parse ``early=0:0.33,late=0.67:1`` into ``{"early": (0.0, 0.33), "late": (0.67, 1.0)}``."""
    stages: dict[str, tuple[float, float]] = {}
    try:
        for item in text.split(","):
            name, bounds = item.split("=", 1)
            low, high = (float(b) for b in bounds.split(":", 1))
            if not 0.0 <= low < high <= 1.0:
                raise ValueError
            stages[name.strip()] = (low, high)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --stages {text!r}: use NAME=LOW:HIGH[,NAME=LOW:HIGH...] with fractions of the "
            "epochs, 0 <= LOW < HIGH <= 1, e.g. early=0:0.33,late=0.67:1"
        ) from None
    return stages


def export_source(
    name: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    studies_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, str]:
    """The (tracking URI, experiment) a study logged to, by the runner's own precedence
    (``samstudy.settings.tracking_target``); the study file (``<studies_dir>/NAME.yaml``,
    default ``./studies``, else ``<project root>/studies``) contributes its ``tracking:`` block."""
    from samstudy.settings import study_settings, tracking_target

    tracking = study_settings(name, studies_dir).tracking
    return tracking_target(name, tracking_uri, experiment, tracking, writing=False)


def export_main(argv: list[str] | None = None) -> int:
    """Export a study from MLflow to Parquet; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="samstudy export",
        description="Export a study (MLflow experiment) to results/{runs,metrics}/study=NAME.",
    )
    parser.add_argument("name", help="study name (studies/NAME.yaml)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store or server (default, as `samstudy study` picks it: the study file's "
        "tracking.tracking_uri, else MLFLOW_TRACKING_URI, else mlflow.db in the project root)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment (default: the study file's tracking.experiment, else NAME)",
    )
    parser.add_argument(
        "--studies-dir",
        default=None,
        help="folder of study files (default: ./studies if present, else <project root>/studies)",
    )
    parser.add_argument(
        "--root", default=str(DEFAULT_ROOT), help=f"results folder (default: {DEFAULT_ROOT})"
    )
    parser.add_argument(
        "--best-by", default="test_acc", help="metric for best/early-stopped values"
    )
    parser.add_argument("--best-mode", choices=["max", "min"], default="max")
    args = parser.parse_args(argv)

    from samstudy.analysis.export import export_study
    from samstudy.analysis.readers import StudyNotFoundError
    from samstudy.configio import ConfigError
    from samstudy.paths import redact
    from samstudy.settings import TrackingError

    try:
        tracking_uri, experiment = export_source(
            args.name, args.tracking_uri, args.experiment, args.studies_dir
        )
    except (ConfigError, TrackingError) as error:
        print(f"samstudy export: {redact(error)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from samstudy.settings import pending_spool

    spooled = pending_spool(args.name, args.studies_dir)
    if spooled:
        print(
            f"samstudy export: warning: {spooled} tracking operations of study {args.name} "
            "have not reached MLflow yet (its spool file); the export misses them. Run "
            f"`samstudy study {args.name}` once more to send them (quick for a complete study).",
            file=sys.stderr,
        )
    try:
        result = export_study(
            args.name,
            tracking_uri,
            args.root,
            best_by=args.best_by,
            best_mode=args.best_mode,
            experiment=experiment,
        )
    except (StudyNotFoundError, ValueError) as error:
        print(f"samstudy export: {redact(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        # A store that does not answer or refuses the login (SQLAlchemy's and MLflow's errors,
        # a dropped connection): one line, the URI and the message redacted, no traceback.
        if not _is_store_error(error):
            raise
        print(
            f"samstudy export: cannot read {redact(tracking_uri)}: "
            f"{type(error).__name__}: {redact(error)}",
            file=sys.stderr,
        )
        return 1
    print(result.summary())
    return 0


def _is_store_error(error: Exception) -> bool:
    """An error of the tracking store (database, server, network), not a bug of samstudy."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(error, SQLAlchemyError | MlflowException | ConnectionError | TimeoutError)


def _reference(text: str) -> object:
    from samstudy.analysis.comparisons import parse_reference

    try:
        return parse_reference(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def report_main(argv: list[str] | None = None) -> int:
    """Build the HTML and markdown report of exported studies; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="samstudy report",
        description="Build results/reports/NAME/report.{html,md} from the Parquet export.",
    )
    parser.add_argument(
        "names",
        nargs="+",
        help="study name(s), or a,b; several are analysed together (the study as a column)",
    )
    parser.add_argument(
        "--root", default=str(DEFAULT_ROOT), help="results folder (default: results)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: ROOT/reports/NAME)")
    parser.add_argument(
        "--studies-dir",
        default=None,
        help="folder of study files, for each study's description and analysis block (default: "
        "./studies if present, else <project root>/studies; a study without a file is reported "
        "all the same, with the default analysis)",
    )
    parser.add_argument(
        "--reference",
        type=_reference,
        action="append",
        default=None,
        help="reference of the comparisons, repeatable: a partial configuration "
        "KEY.PATH=VALUE[,KEY.PATH=VALUE...] (e.g. optimizer.ascent=sam), a variant label, or an "
        "optimizer name (default: the study file's analysis.references, else optimizer.name=sam)",
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        default=None,
        help="stage bounds as fractions of the epochs (default: the study file's "
        "analysis.stages, else early=0:0.333,late=0.667:1)",
    )
    parser.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--best-by", default="test_acc", help="metric for early stopping")
    parser.add_argument(
        "--min-effect",
        type=float,
        default=None,
        help="smallest accuracy difference that counts as up/down (default: the study file's "
        "analysis.min_effect, else 0.005)",
    )
    args = parser.parse_args(argv)

    from samstudy.analysis.report import build_report, resolve_analysis, study_names
    from samstudy.configio import ConfigError
    from samstudy.settings import study_settings

    names = study_names(args.names)
    try:
        descriptions = {n: study_settings(n, args.studies_dir).description for n in names}
        analysis = resolve_analysis(names, studies_dir=args.studies_dir)
    except ConfigError as error:
        print(f"samstudy report: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        result = build_report(
            names,
            descriptions=descriptions,
            root=args.root,
            out_dir=args.out,
            reference=args.reference,
            stages=args.stages,
            level=args.level,
            best_by=args.best_by,
            min_effect=args.min_effect,
            analysis=analysis,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"samstudy report: {error}", file=sys.stderr)
        return 1
    print(f"report: {result.html}\n        {result.markdown} ({len(result.figures)} figures)")
    if result.hypothesis.empty:
        print("\nno verdicts: no variant has a reference (see the report)")
    else:
        print("\nverdicts (variant x stage):")
        print(result.hypothesis.to_string())
    return 0
