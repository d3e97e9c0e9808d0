"""MLflow on PostgreSQL, the team set-up: a real PostgreSQL 15 cluster on 127.0.0.1 (run as an
unprivileged user, password authentication), a real ``mlflow server`` on it, a study through the
server while it is killed and restarted, the bulk SQL export against PostgreSQL compared value
for value with the server's REST export and with a sqlite store of the same runs, and no
password in anything samstudy prints. Skipped, with the reason, where PostgreSQL cannot start.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("psycopg", reason="no PostgreSQL driver (psycopg): `make setup`")
ray = pytest.importorskip("ray")

from mlflow import MlflowClient  # noqa: E402
from test_study_run import RestartServer, child_runs, make_study, steps  # noqa: E402

from samstudy.analysis.export import export_study  # noqa: E402
from samstudy.analysis.schema import partition_dir  # noqa: E402
from samstudy.analysis.synthetic import (  # noqa: E402
    TrialData,
    bulk_insert_study,
    copy_study_to_postgres,
    log_study,
    sqlite_store,
)
from samstudy.devstores import LocalPostgres, MlflowServer, PostgresUnavailable  # noqa: E402
from samstudy.paths import project_root  # noqa: E402
from samstudy.study.runner import run_study  # noqa: E402


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    pg = LocalPostgres()
    try:
        pg.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL cannot start here: {exc}")
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def served(postgres: LocalPostgres, database: str, tmp: Path) -> MlflowServer:
    """An mlflow server on ``database``, started and ready; its password comes from the
    environment (PGPASSWORD), not its command line, which every user of the host can read."""
    server = MlflowServer(
        postgres.uri(database, password=False),
        tmp / "artifacts",
        env=postgres.env,
        log=tmp / f"server-{database}.log",
    )
    server.start()
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


def test_postgres_server_outage_loses_nothing(
    local_ray: None, postgres: LocalPostgres, tmp_path: Path
) -> None:
    postgres.mlflow_database("outage")
    server = served(postgres, "outage", tmp_path)
    try:
        spec = make_study(
            tmp_path,
            "pgserved",
            tracking_uri=server.uri,
            base={"epochs": 6},
            grid={"seed": [0, 1]},
        )
        outage = RestartServer(server)  # kills the server's process group at the first result
        result = run_study(spec, callbacks=[outage], out=io.StringIO(), flush_timeout_s=180.0)
        assert result.status == "complete"
        assert outage.stopped_at is not None and outage.results_while_down > 0
        assert result.tracking_pending == 0  # flushed once the server was back
        runs = child_runs(server.uri, "pgserved")
        assert len(runs) == 2
        for run in runs:
            assert steps(server.uri, run.info.run_id) == [1, 2, 3, 4, 5, 6]
            assert run.data.tags["samstudy.status"] == "completed"
            assert run.info.status == "FINISHED"
    finally:
        server.stop()
    # In PostgreSQL itself: every epoch of every metric exactly once per run.
    counts = postgres.execute(
        "SELECT m.run_uuid, m.key, m.step, count(*) FROM metrics m "
        "JOIN runs r ON r.run_uuid = m.run_uuid JOIN experiments e "
        "ON e.experiment_id = r.experiment_id WHERE e.name = 'pgserved' "
        "GROUP BY m.run_uuid, m.key, m.step",
        "outage",
    )
    assert counts and {c for *_, c in counts} == {1}
    per_run: dict[str, set[int]] = {}
    for run_id, key, step, _ in counts:
        if key == "train_loss":
            per_run.setdefault(run_id, set()).add(step)
    assert sorted(map(sorted, per_run.values())) == [[1, 2, 3, 4, 5, 6]] * 2


# -- the export: SQL against PostgreSQL, REST through its server, SQL against sqlite --------


def comparison_trials() -> list[TrialData]:
    """Typed params of every kind, a failed trial, a NaN loss, an extra metric in one run."""
    trials = []
    for name, rho in (("sgd", 0.0), ("sam", 0.05), ("same", 0.1)):
        for seed in (0, 1):
            config = {
                "optimizer": {"name": name, "rho": rho, "lr": 0.05, "scales": [seed, 0, 0, 0]},
                "model": {"name": "mlp", "width": 64},
                "data": {"augment": seed == 1},
                "seed": seed,
            }
            loss = [2.0, 1.0 + seed, 0.5 / (1 + rho)]
            metrics = {"test_acc": [0.3, 0.5 + rho, 0.6 + rho + 0.01 * seed], "test_loss": loss}
            status = "completed"
            if name == "same" and seed == 1:
                metrics["test_loss"] = [2.0, math.nan, math.nan]
                status = "failed"
            if name == "sam":
                metrics["sharpness"] = [10.0, 5.0, 1.0 + seed]
            trials.append(TrialData(f"{name}-rho{rho}-s{seed}", config, metrics, status=status))
    return trials


def same_values(a: pa.Table, b: pa.Table) -> None:
    """Equal schemas and equal values, column by column (NaN equals NaN)."""
    assert a.schema.names == b.schema.names
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows
    for name in a.schema.names:
        left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
        same = [
            x == y
            or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
            for x, y in zip(left, right, strict=True)
        ]
        assert all(same), (name, left, right)


def read_export(root: Path, study: str) -> tuple[pa.Table, pa.Table]:
    runs = pq.read_table(partition_dir(root, "runs", study)).sort_by("trial_id")
    metrics = pq.read_table(partition_dir(root, "metrics", study)).sort_by(
        [("trial_id", "ascending"), ("metric", "ascending"), ("step", "ascending")]
    )
    return runs, metrics


def test_export_from_postgres_matches_its_server_and_sqlite(
    postgres: LocalPostgres, tmp_path: Path
) -> None:
    pg_uri = postgres.mlflow_database("exported")
    trials = comparison_trials()
    log_study(MlflowClient(tracking_uri=pg_uri), "cmp", trials)
    lite_uri = sqlite_store(tmp_path / "mlflow.db")
    log_study(MlflowClient(tracking_uri=lite_uri), "cmp", trials)

    sql = export_study("cmp", pg_uri, root=tmp_path / "pg")
    # the bulk SQL path (no "(bulk history)" / "(history loop)"), its source shown redacted
    assert sql.source == f"postgresql://samstudy:***@127.0.0.1:{postgres.port}/exported"
    assert sql.n_runs == len(trials) and sql.n_metric_rows == 3 * (2 * 6 + 2)
    server = served(postgres, "exported", tmp_path)
    try:
        rest = export_study("cmp", server.uri, root=tmp_path / "rest")
    finally:
        server.stop()
    assert rest.source == f"{server.uri} (bulk history)"
    lite = export_study("cmp", lite_uri, root=tmp_path / "lite")
    assert lite.source == lite_uri

    pg_runs, pg_metrics = read_export(tmp_path / "pg", "cmp")
    rest_runs, rest_metrics = read_export(tmp_path / "rest", "cmp")
    # The same runs read two ways: identical, run ids and times included.
    same_values(pg_runs, rest_runs)
    same_values(pg_metrics, rest_metrics)
    # The same trials logged into sqlite: identical but for the runs' own ids and clocks.
    lite_runs, lite_metrics = read_export(tmp_path / "lite", "cmp")
    own = ["run_id", "parent_run_id", "start_time", "end_time"]
    same_values(pg_runs.drop_columns(own), lite_runs.drop_columns(own))
    same_values(pg_metrics.drop_columns(["run_id"]), lite_metrics.drop_columns(["run_id"]))
    # ... and the values are the logged ones: the failed trial's NaN loss survived
    failed = pg_runs.filter(pa.compute.equal(pg_runs["status"], "failed"))
    assert failed.num_rows == 1 and math.isnan(failed["final.test_loss"][0].as_py())
    assert pg_runs.schema.field("params.optimizer.rho").type == pa.float64()
    assert pg_runs.schema.field("params.data.augment").type == pa.bool_()
    assert pg_runs.schema.field("params.optimizer.scales").type == pa.list_(pa.float64())


def test_copy_into_postgres_for_the_benchmark_exports_the_same(
    postgres: LocalPostgres, tmp_path: Path
) -> None:
    """The benchmark's PostgreSQL row: a bulk-inserted sqlite study copied with COPY exports
    the same Parquet from PostgreSQL, run ids included."""
    db = tmp_path / "mlflow.db"
    lite_uri = sqlite_store(db)
    bulk_insert_study(str(db), MlflowClient(tracking_uri=lite_uri), "bulk", 24, ["a", "b"], 5)
    pg_uri = postgres.mlflow_database("copied")
    assert copy_study_to_postgres(str(db), pg_uri, "bulk") == 24 * 2 * 5
    export_study("bulk", lite_uri, root=tmp_path / "lite")
    result = export_study("bulk", pg_uri, root=tmp_path / "pg")
    assert result.n_runs == 24 and result.n_metric_rows == 240
    for lite, pg in zip(
        read_export(tmp_path / "lite", "bulk"), read_export(tmp_path / "pg", "bulk"), strict=True
    ):
        same_values(lite, pg)


# -- no password in what samstudy prints ---------------------------------------------------


def samstudy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m samstudy ARGS`` as a user types it; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", "samstudy", *args],
        cwd=project_root(),
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def test_export_console_never_shows_the_password(postgres: LocalPostgres, tmp_path: Path) -> None:
    pg_uri = postgres.mlflow_database("console_export")
    log_study(MlflowClient(tracking_uri=pg_uri), "quiet", comparison_trials()[:2])
    root = ["--root", str(tmp_path / "results"), "--studies-dir", str(tmp_path)]
    done = samstudy("export", "quiet", "--tracking-uri", pg_uri, *root)
    assert done.returncode == 0, done.stdout
    assert "exported study 'quiet' from postgresql://samstudy:***@127.0.0.1" in done.stdout
    # a study that is not there, a wrong password, a database that is not there: one line each
    wrong = pg_uri.replace(postgres.password, "wrongPw-" + postgres.password[::-1])
    cases = {
        "absent": samstudy("export", "absent", "--tracking-uri", pg_uri, *root),
        "password": samstudy("export", "quiet", "--tracking-uri", wrong, *root),
        "database": samstudy("export", "quiet", "--tracking-uri", postgres.uri("nowhere"), *root),
    }
    for case, run in cases.items():
        assert run.returncode == 1, (case, run.stdout)
        assert "Traceback" not in run.stdout, (case, run.stdout)
        assert "samstudy export:" in run.stdout and "samstudy:***@127.0.0.1" in run.stdout, case
    assert "no active MLflow experiment named 'absent'" in cases["absent"].stdout
    assert "password authentication failed" in cases["password"].stdout
    outputs = done.stdout + "".join(run.stdout for run in cases.values())
    assert postgres.password not in outputs
    assert postgres.password[::-1] not in outputs


def test_study_console_never_shows_the_password(postgres: LocalPostgres, tmp_path: Path) -> None:
    """The driver writes straight into PostgreSQL (no server), given a URI with a password."""
    pg_uri = postgres.mlflow_database("console_study")
    (tmp_path / "pgquiet.yaml").write_text(
        "name: pgquiet\n"
        "base:\n"
        "  data: {name: digits}\n"
        "  model: {name: mlp}\n"
        "  optimizer: {name: sgd, lr: 0.05}\n"
        "  epochs: 2\n"
        "  threads: 1\n"
        "  device: cpu\n"
    )
    done = samstudy(
        "study", "pgquiet", "--studies-dir", str(tmp_path), "--tracking-uri", pg_uri,
        "--storage-path", str(tmp_path / "ray"), "--num-cpus", "1", "--progress-interval", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert postgres.password not in done.stdout, done.stdout[-3000:]
    assert "samstudy:***@127.0.0.1" in done.stdout
    # the study is in PostgreSQL, and the password in none of its params or tags
    epochs = postgres.execute(
        "SELECT count(*) FROM metrics WHERE key = 'train_loss'", "console_study"
    )
    assert epochs == [(2,)]
    leaks = postgres.execute(
        f"SELECT (SELECT count(*) FROM params WHERE value LIKE '%{postgres.password}%') + "
        f"(SELECT count(*) FROM tags WHERE value LIKE '%{postgres.password}%')",
        "console_study",
    )
    assert leaks == [(0,)]
