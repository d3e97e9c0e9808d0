"""Export speed: MLflow sqlite store -> Parquet against a ``get_metric_history`` loop.

Builds a store of N runs x 20 metrics x E epochs by direct SQL inserts (not measured), then times
``export_study`` (bulk SQL read, shaping, Parquet write) and the plain client loop a naive
exporter would run (``search_runs`` plus one ``get_metric_history`` call per run and metric).
The loop is timed on a subset of runs and extrapolated linearly (it is one call per run and
metric, so its cost is linear in runs); the table says so. Targets (full size: 1000 x 20 x 200):
export <= 30 s and >= 20x faster than the loop.

The PostgreSQL row: the same study copied (``COPY``, not measured) into an MLflow store on a
throwaway local PostgreSQL (``samstudy.devstores.LocalPostgres``, 127.0.0.1), exported through the
same bulk SQL path; where PostgreSQL cannot start here the row says why.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from samstudy.train.config import EPOCH_METRICS

# 20 of the trainer's per-epoch metrics (the 1000 runs x 20 metrics x 200 epochs).
METRICS = [*EPOCH_METRICS[:18], "lr", "epoch_time"]


def run(quick: bool = False) -> str:
    """Run the benchmark and return its markdown section."""
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study
    from samstudy.analysis.synthetic import bulk_insert_study

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    n_runs, epochs = (100, 50) if quick else (1000, 200)
    loop_runs = 10 if quick else 25
    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    try:
        db = tmp / "mlflow.db"
        uri = f"sqlite:///{db}"
        client = MlflowClient(tracking_uri=uri)
        start = time.perf_counter()
        run_ids = bulk_insert_study(str(db), client, "bench", n_runs, METRICS, epochs)
        build_s = time.perf_counter() - start
        values = n_runs * len(METRICS) * epochs

        result = export_study("bench", uri, root=tmp / "results")
        assert result.n_runs == n_runs and result.n_metric_rows == values, result
        pg_row = postgres_row(db, tmp, n_runs, values)

        # The naive exporter: list the runs, then one history call per run and metric.
        start = time.perf_counter()
        exp = client.get_experiment_by_name("bench")
        found = client.search_runs([exp.experiment_id], max_results=1000)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        fetched = 0
        for run_id in run_ids[:loop_runs]:
            for key in METRICS:
                fetched += len(client.get_metric_history(run_id, key))
        loop_subset_s = time.perf_counter() - start
        assert fetched == loop_runs * len(METRICS) * epochs and found
        loop_s = search_s + loop_subset_s * n_runs / loop_runs
        speedup = loop_s / result.total_s
        size_mb = sum(f.stat().st_size for f in (tmp / "results").rglob("*.parquet")) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if quick:  # fixed costs dominate at the quick size; the targets are for the full size
        ok_time = ok_ratio = "n/a (quick size)"
    else:
        ok_time = "yes" if result.total_s <= 30 else "NO"
        ok_ratio = "yes" if speedup >= 20 else "NO"
    return "\n".join(
        [
            f"## Export: {n_runs} runs x {len(METRICS)} metrics x {epochs} epochs "
            f"({values:,} values, sqlite store)",
            "",
            "| what | seconds | note |",
            "|---|---|---|",
            f"| build store (direct inserts, not measured) | {build_s:.1f} | |",
            f"| export_study: read | {result.read_s:.2f} | 5 SQL queries + shaping |",
            f"| export_study: write | {result.write_s:.2f} | {size_mb:.1f} MB Parquet (zstd) |",
            f"| **export_study total** | **{result.total_s:.2f}** | target <= 30 s: {ok_time} |",
            f"| get_metric_history loop, {loop_runs} runs measured | {loop_subset_s:.2f} | "
            f"{loop_runs * len(METRICS)} calls |",
            f"| get_metric_history loop, all {n_runs} runs (extrapolated) | {loop_s:.1f} | "
            f"search_runs {search_s:.2f} s + {n_runs / loop_runs:.0f} x the subset |",
            f"| **speed-up** | **{speedup:.0f}x** | target >= 20x: {ok_ratio} |",
            pg_row,
            "",
        ]
    )


def postgres_row(db: Path, tmp: Path, n_runs: int, values: int) -> str:
    """The table row of the same export from PostgreSQL (or why there is none)."""
    from samstudy.analysis.export import export_study
    from samstudy.analysis.synthetic import copy_study_to_postgres
    from samstudy.devstores import LocalPostgres, PostgresUnavailable

    try:
        pg = LocalPostgres().start()
    except PostgresUnavailable as exc:
        return f"| export_study from PostgreSQL | n/a | skipped: {exc} |"
    try:
        pg_uri = pg.mlflow_database("bench")
        start = time.perf_counter()
        copied = copy_study_to_postgres(str(db), pg_uri, "bench")
        copy_s = time.perf_counter() - start
        pg.execute("VACUUM ANALYZE", "bench")  # as a long-lived server's autovacuum would have
        result = export_study("bench", pg_uri, root=tmp / "results-pg")
        assert copied == values and result.n_runs == n_runs, result
        assert result.n_metric_rows == values, result
        ((version,),) = pg.execute("SHOW server_version")
    finally:
        pg.stop()
    return (
        f"| **export_study from PostgreSQL {version.split()[0]}** (same study, bulk SQL) | "
        f"**{result.total_s:.2f}** | read {result.read_s:.2f} s + write {result.write_s:.2f} s; "
        f"local server on 127.0.0.1; copy into it {copy_s:.1f} s, not measured |"
    )


if __name__ == "__main__":
    print(run(quick=False))
