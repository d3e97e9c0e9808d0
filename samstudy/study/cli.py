"""``samstudy plan | study | ui``: validate and price a study, run it, open the MLflow UI.

Study-file errors print as one message (file, field path, allowed values) without a traceback
and exit with status 2; nothing is launched.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from samstudy.configio import add_set_option
from samstudy.settings import studies_dir
from samstudy.study.spec import StudyError, load_study


def _add_set(parser: argparse.ArgumentParser) -> None:
    add_set_option(parser, "a field of the study's base config for every trial")


def plan_main(argv: list[str]) -> int:
    """``samstudy plan NAME``: the expanded trial table, the trial count and the estimated cost."""
    from samstudy.study.plan import format_plan

    parser = argparse.ArgumentParser(prog="samstudy plan", description=plan_main.__doc__)
    parser.add_argument("name", help="study name (studies/NAME.yaml) or path to a study file")
    parser.add_argument("--studies-dir", help="folder of study files (default: ./studies)")
    _add_set(parser)
    args = parser.parse_args(argv)
    try:
        spec = load_study(args.name, studies_dir(args.studies_dir), args.overrides)
    except StudyError as exc:
        print(f"samstudy plan: {exc}", file=sys.stderr)
        return 2
    print(format_plan(spec))
    return 0


def study_main(argv: list[str]) -> int:
    """``samstudy study NAME``: run a study with Ray Tune, tracked in MLflow.

    Running it again resumes an interrupted study (finished trials are kept, unfinished and
    failed ones continue from their last checkpoint); a complete study starts nothing.
    """
    from samstudy.study.result import EXIT_CODES

    parser = argparse.ArgumentParser(
        prog="samstudy study",
        description=study_main.__doc__,
        epilog="exit status:\n"
        + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="study name (studies/NAME.yaml) or path to a study file")
    parser.add_argument("--studies-dir", help="folder of study files (default: ./studies)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: delete the study's Ray results and soft-delete its MLflow runs "
        "(recoverable with `mlflow runs restore` until `mlflow gc`)",
    )
    parser.add_argument(
        "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument(
        "--storage-path",
        help="where Ray keeps results and checkpoints (default: the study's storage_path, "
        "else results/ray under the project); a URI or shared folder on a cluster",
    )
    parser.add_argument(
        "--shared-storage",
        action="store_true",
        default=None,
        help="declare a local-looking --storage-path as shared by every node (NFS mount)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: the study's tracking_uri, $MLFLOW_TRACKING_URI, else "
        "sqlite:///<project>/mlflow.db)",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="retries of a failed trial, each from its last checkpoint (default 3)",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        help="seconds between epoch lines of one trial in the live view (default 10)",
    )
    parser.add_argument("--quiet", action="store_true", help="no live view")
    _add_set(parser)
    args = parser.parse_args(argv)
    try:
        spec = load_study(args.name, studies_dir(args.studies_dir), args.overrides)
    except StudyError as exc:
        print(f"samstudy study: {exc}", file=sys.stderr)
        return 2

    from samstudy.settings import TrackingError
    from samstudy.study.failures import failure_table
    from samstudy.study.result import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_STORAGE
    from samstudy.study.runner import RunnerError, run_study

    try:
        result = run_study(
            spec,
            fresh=args.fresh,
            address=args.address,
            storage_path=args.storage_path,
            shared_storage=args.shared_storage,
            tracking_uri=args.tracking_uri,
            max_failures=args.max_failures,
            num_cpus=args.num_cpus,
            progress=not args.quiet,
            progress_interval_s=args.progress_interval,
        )
    except (RunnerError, TrackingError) as exc:
        print(f"samstudy study: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print(f"interrupted; run `samstudy study {spec.name}` again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.status == "already_complete":
        return result.exit_code
    if result.status == "storage_fault":
        print(f"samstudy study: {result.message}", file=sys.stderr)
        return EXIT_STORAGE
    counts: dict[str, int] = {}
    for status in result.trials.values():
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(
        f"study {spec.name}: {result.status} in {result.wall_s:.0f} s ({summary}). "
        f"Ray results: {result.experiment_path}; MLflow: {result.tracking_uri} "
        f"(`make ui` to browse)."
    )
    if result.failures:
        print(f"failed trials ({len(result.failures)}):")
        print(failure_table(sorted(result.failures.items())))
        print("tracebacks: each failed run's error.txt in MLflow, and the error.txt files above")
    if result.tracking_pending:
        print(
            f"warning: MLflow is incomplete: {result.tracking_pending} tracking operations "
            f"could not reach it; they are kept and sent by the next `samstudy study "
            f"{spec.name}` (exit status {result.exit_code}).",
            file=sys.stderr,
        )
    if result.status == "interrupted":
        print(f"run `samstudy study {spec.name}` again to resume.")
    elif result.status == "failed":
        print(f"some trials failed; run `samstudy study {spec.name}` again to retry them.")
    return result.exit_code


def ui_main(argv: list[str]) -> int:
    """``samstudy ui``: the MLflow UI on 127.0.0.1 over the project's tracking store."""
    from samstudy.paths import default_tracking_uri

    parser = argparse.ArgumentParser(prog="samstudy ui", description=ui_main.__doc__)
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument(
        "--backend-store-uri",
        default=None,
        help="store to browse (default: sqlite:///<project>/mlflow.db)",
    )
    args = parser.parse_args(argv)
    store = args.backend_store_uri or default_tracking_uri()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--host",
        "127.0.0.1",  # never every interface: the UI has no authentication
        "--port",
        str(args.port),
        "--backend-store-uri",
        store,
    ]
    print(f"MLflow UI on http://127.0.0.1:{args.port} ({store}); Ctrl+C stops it.", flush=True)
    # Its own process group, so stopping it also stops the server's worker processes.
    # The UI needs no job runner (a dozen worker processes for MLflow's GenAI jobs).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    process = subprocess.Popen(command, start_new_session=True, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
