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
from typing import Any

from samstudy.configio import add_set_option
from samstudy.paths import redact
from samstudy.settings import studies_dir
from samstudy.study.spec import StudyError, load_study


def _add_set(parser: argparse.ArgumentParser) -> None:
    add_set_option(parser, "a field of the study's base config for every trial")


def plan_main(argv: list[str]) -> int:
    """``samstudy plan NAME``: the expanded trial table, the trial count, the estimated cost and
    disk, then the pre-flight checks (device, resources, data, storage, tracking) against this
    machine, or the cluster at ``RAY_ADDRESS``. Exit status 2 when a check fails."""
    from samstudy.study.plan import format_plan, wall_hours
    from samstudy.study.preflight import environment_problems, static_problems

    parser = argparse.ArgumentParser(prog="samstudy plan", description=plan_main.__doc__)
    parser.add_argument("name", help="study name (studies/NAME.yaml) or path to a study file")
    parser.add_argument("--studies-dir", help="folder of study files (default: ./studies)")
    parser.add_argument("--gpus", type=float, help="wall time of the study on this many GPUs")
    parser.add_argument("--cpus", type=float, help="wall time of the study on this many CPUs")
    parser.add_argument(
        "--address", help="Ray cluster to check against (default: $RAY_ADDRESS, else this machine)"
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="only the table and the estimates: no resource, data and tracking checks (to plan "
        "on a machine that is not where the study runs)",
    )
    _add_set(parser)
    args = parser.parse_args(argv)
    try:
        spec = load_study(args.name, studies_dir(args.studies_dir), args.overrides)
    except StudyError as exc:
        print(f"samstudy plan: {redact(exc)}", file=sys.stderr)
        return 2
    print(format_plan(spec))
    if args.gpus is not None or args.cpus is not None:
        print(wall_hours(spec, cpus=args.cpus, gpus=args.gpus))
    problems = static_problems(spec)
    if not args.no_check:
        from samstudy.settings import TrackingError, tracking_target
        from samstudy.study.cluster import init_ray
        from samstudy.study.state import RunnerError

        address = args.address or os.environ.get("RAY_ADDRESS") or None
        try:
            uri, experiment = tracking_target(spec.name, None, None, spec.tracking)
            if address:
                init_ray(address)
            more, notes = environment_problems(spec, uri, experiment, address, ray_up=bool(address))
        except (RunnerError, TrackingError) as exc:
            print(f"samstudy plan: {redact(exc)}", file=sys.stderr)
            return 2
        finally:
            if address:
                import ray

                ray.shutdown()
        problems += more
        for note in notes:
            print(note)
    if problems:
        print(f"samstudy plan: {spec.path}: the study would fail once launched:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    print("pre-flight: ok" + (" (static checks only: --no-check)" if args.no_check else ""))
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
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="skip the pre-flight checks of `samstudy plan` (device, resources, data, tracking)",
    )
    _add_set(parser)
    args = parser.parse_args(argv)
    try:
        spec = load_study(args.name, studies_dir(args.studies_dir), args.overrides)
    except StudyError as exc:
        print(f"samstudy study: {redact(exc)}", file=sys.stderr)
        return 2

    from samstudy.settings import TrackingError
    from samstudy.study.failures import failure_table
    from samstudy.study.preflight import PreflightError
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
            preflight=not args.no_check,
        )
    except (RunnerError, TrackingError, PreflightError) as exc:
        print(f"samstudy study: {redact(exc)}", file=sys.stderr)
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
        f"Ray results: {result.experiment_path}; MLflow: {redact(result.tracking_uri)} "
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
        how = "stopped by `samstudy stop`; " if result.stopped else ""
        print(f"{how}run `samstudy study {spec.name}` again to resume.")
    elif result.status == "failed":
        print(f"some trials failed; run `samstudy study {spec.name}` again to retry them.")
    return result.exit_code


def _study_target(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, Any]:
    """(args, spec) of a command that names a study; exits 2 on a bad study file."""
    parser.add_argument("name", help="study name (studies/NAME.yaml) or path to a study file")
    parser.add_argument("--studies-dir", help="folder of study files (default: ./studies)")
    args = parser.parse_args(argv)
    try:
        return args, load_study(args.name, studies_dir(args.studies_dir))
    except StudyError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def smoke_main(argv: list[str]) -> int:
    """``samstudy smoke NAME``: each distinct trial type of the study (model, data, optimizer
    variant, batch size, precision; one seed) runs a few steps and one evaluation where the study
    runs (this machine, or the cluster at ``RAY_ADDRESS``), in a throw-away process: step time,
    samples/s, peak memory and the first error per type, then the study's cost from these.
    Nothing is written to the study's MLflow experiment or Ray storage; the result is kept in
    results/smoke/NAME.json for `plan`. Exit status 1 when a type fails, 2 for a bad file."""
    from samstudy.study.smoke import DEFAULT_STEPS, format_smoke, run_smoke, save_smoke

    parser = argparse.ArgumentParser(prog="samstudy smoke", description=smoke_main.__doc__)
    parser.add_argument("name", help="study name (studies/NAME.yaml) or path to a study file")
    parser.add_argument("--studies-dir", help="folder of study files (default: ./studies)")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="timed training steps per type"
    )
    parser.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS, else local)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    _add_set(parser)
    args = parser.parse_args(argv)
    try:
        spec = load_study(args.name, studies_dir(args.studies_dir), args.overrides)
    except StudyError as exc:
        print(f"samstudy smoke: {redact(exc)}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("samstudy smoke: --steps must be at least 1", file=sys.stderr)
        return 2
    result = run_smoke(spec, steps=args.steps, address=args.address, num_cpus=args.num_cpus)
    print(format_smoke(result))
    print(f"saved to {save_smoke(result)}")
    return 0 if result.ok else 1


def status_main(argv: list[str]) -> int:
    """``samstudy status NAME``: trials pending, running (epoch, node), done, failed (with the
    error), diverged, and an ETA, read from MLflow: any shell that reaches the tracking store."""
    import json

    from samstudy.settings import TrackingError, tracking_target
    from samstudy.study.status import format_status, study_status

    parser = argparse.ArgumentParser(prog="samstudy status", description=status_main.__doc__)
    parser.add_argument("--tracking-uri", help="MLflow store (default: as `samstudy study`)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args, spec = _study_target(parser, argv)
    try:
        uri, experiment = tracking_target(spec.name, args.tracking_uri, None, spec.tracking)
        status = study_status(uri, experiment, spec.name)
    except (TrackingError, LookupError) as exc:
        print(f"samstudy status: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status))
    return 0


def stop_main(argv: list[str]) -> int:
    """``samstudy stop NAME``: ask the study's driver to stop (from any shell that sees the
    study's storage); the running trials stay resumable and `samstudy study NAME` resumes."""
    from samstudy.study.control import request_stop
    from samstudy.study.state import ExperimentFiles, experiment_path, resolve_storage_path

    parser = argparse.ArgumentParser(prog="samstudy stop", description=stop_main.__doc__)
    parser.add_argument("--storage-path", help="the study's storage (default: as `samstudy study`)")
    args, spec = _study_target(parser, argv)
    storage = resolve_storage_path(args.storage_path or spec.storage_path)
    files = ExperimentFiles(experiment_path(storage, spec.name), spec.storage_endpoint)
    print(f"samstudy stop: {request_stop(files)}")
    return 0


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
    # MLflow 3 opens an experiment on its GenAI view unless the URL asks for model training.
    url = f"http://127.0.0.1:{args.port}/#/experiments?workflowType=machine_learning"
    print(f"MLflow UI on {url} ({redact(store)}); Ctrl+C stops it.", flush=True)
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
