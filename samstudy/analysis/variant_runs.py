"""One MLflow summary run per variant (``samstudy summarize NAME``), so the MLflow UI compares
variants side by side: MLflow itself cannot average a variant's seeds.

Each run is tagged ``samstudy.role=variant`` (the export leaves such runs out), carries the
variant's params (its trials' config without the seed) and, from the Parquet export, for the
final and the best (early-stopped) value of each metric in :data:`SUMMARY_METRICS`:
``<kind>.<metric>.mean``, ``.ci_low``, ``.ci_high`` (the 95% Student t interval over seeds) and
``.n``; plus the seed-mean curve of :data:`CURVE_METRICS` as metric history (step = epoch,
under the trials' own metric names, so MLflow's charts overlay variants and trials). Summarising
again deletes the study's previous summary runs first: they are replaced, never duplicated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from samstudy import tags
from samstudy.analysis import aggregate
from samstudy.analysis.load import Study, load_study, plain
from samstudy.analysis.schema import DEFAULT_ROOT, PARAM_PREFIX
from samstudy.identity import MAX_PARAM_CHARS, SEED_PATH

SUMMARY_METRICS: tuple[str, ...] = (
    "test_acc",
    "test_loss",
    "train_acc",
    "train_loss",
    "train_acc_clean",
    "train_acc_noisy",
    "memorization",
    "recovery",
)
CURVE_METRICS: tuple[str, ...] = ("test_acc", "memorization")
STATS: tuple[str, ...] = ("mean", "ci_low", "ci_high", "n")
RUN_SUFFIX = " (seed mean)"  # a summary run's name: the variant label, then this


@dataclass
class SummaryResult:
    """What :func:`write_variant_runs` did."""

    study: str
    experiment_id: str
    run_ids: dict[str, str]  # variant label -> its summary run
    replaced: int  # earlier summary runs deleted

    def summary(self) -> str:
        return (
            f"summarised study {self.study!r}: {len(self.run_ids)} variant runs in experiment "
            f"{self.experiment_id} (tag {tags.ROLE}={tags.ROLE_VARIANT}; {self.replaced} "
            "earlier ones replaced)"
        )


def _param_text(value: Any) -> str | None:
    """A typed Parquet param back to MLflow's text (JSON, strings as they are); None: unset."""
    value = plain(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, tuple):
        value = list(value)
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_CHARS]


def variant_params(study: Study) -> dict[str, dict[str, str]]:
    """Each variant's params as MLflow text: its first run's, without the seed."""
    out: dict[str, dict[str, str]] = {}
    columns = [c for c in study.runs.columns if c.startswith(PARAM_PREFIX)]
    for variant, runs in study.runs.groupby("variant", sort=True):
        row = runs.iloc[0]
        params = {}
        for column in columns:
            key = column[len(PARAM_PREFIX) :]
            text = _param_text(row[column])
            if key != SEED_PATH and text is not None:
                params[key] = text
        out[str(variant)] = params
    return out


def summary_metrics(study: Study, level: float = 0.95) -> dict[str, dict[str, float]]:
    """Per variant: ``<kind>.<metric>.<stat>`` -> value, from ``final_best_table``."""
    logged = set(study.metrics["metric"].astype(str).unique())
    metrics = [m for m in SUMMARY_METRICS if m in logged]
    table = aggregate.final_best_table(study, metrics=metrics, level=level)
    table = table[table["metric"].isin(metrics)]
    out: dict[str, dict[str, float]] = {str(v): {} for v in study.runs["variant"].unique()}
    for row in table.itertuples(index=False):
        for stat in STATS:
            out[str(row.variant)][f"{row.kind}.{row.metric}.{stat}"] = float(getattr(row, stat))
    return out


def summary_curves(study: Study, level: float = 0.95) -> pd.DataFrame:
    """The seed-mean curves a summary run logs as history: ``variant, metric, step, mean``."""
    return aggregate.curves(study, CURVE_METRICS, level=level)[
        ["variant", "metric", "step", "mean"]
    ]


def _delete_old(client: Any, experiment_id: str, study: str) -> int:
    query = f"tags.`{tags.ROLE}` = '{tags.ROLE_VARIANT}' and tags.`{tags.STUDY}` = '{study}'"
    deleted, token = 0, None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        for run in page:
            client.delete_run(run.info.run_id)
            deleted += 1
        token = page.token
        if not token:
            return deleted


def write_variant_runs(
    study: str,
    tracking_uri: str,
    experiment: str | None = None,
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    level: float = 0.95,
) -> SummaryResult:
    """Replace the study's summary runs in ``experiment`` (default: the study name) with one
    run per variant of its Parquet export under ``root``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment or study)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment or study!r} at {tracking_uri}")
    data = load_study(study, root)
    params = variant_params(data)
    values = summary_metrics(data, level)
    curves = summary_curves(data, level)
    ids_of = data.runs.groupby("variant")["variant_id"].first()
    seeds_of = data.runs.groupby("variant")["run_id"].count()
    replaced = _delete_old(client, found.experiment_id, study)
    now = int(time.time() * 1000)
    run_ids = {}
    for variant in sorted(params):
        run_tags = {
            tags.ROLE: tags.ROLE_VARIANT,
            tags.STUDY: study,
            tags.VARIANT: variant,
            tags.VARIANT_ID: str(ids_of[variant]),
            tags.NOTE: f"Mean over the {seeds_of[variant]} seeds of variant {variant} "
            "(samstudy summarize; 95% Student t intervals).",
        }
        run = client.create_run(found.experiment_id, run_name=variant + RUN_SUFFIX, tags=run_tags)
        run_id = run.info.run_id
        batch = [Param(k, v) for k, v in params[variant].items()]
        for i in range(0, len(batch), 100):
            client.log_batch(run_id, params=batch[i : i + 100])
        metrics = [Metric(k, v, now, 0) for k, v in values.get(variant, {}).items()]
        mine = curves[curves["variant"] == variant]
        metrics += [
            Metric(str(r.metric), float(r.mean), now, int(r.step)) for r in mine.itertuples()
        ]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        client.set_terminated(run_id, status="FINISHED")
        run_ids[variant] = run_id
    return SummaryResult(study, found.experiment_id, run_ids, replaced)


def summarize_main(argv: list[str] | None = None) -> int:
    """``samstudy summarize NAME``: export the study, then write its variant runs."""
    parser = argparse.ArgumentParser(
        prog="samstudy summarize",
        description="Export a study to Parquet, then write one MLflow run per variant (mean, "
        "95%% interval and n over seeds) so the MLflow UI compares variants side by side.",
    )
    parser.add_argument("name", help="study name (studies/NAME.yaml)")
    parser.add_argument("--tracking-uri", default=None, help="as for `samstudy export`")
    parser.add_argument("--experiment", default=None, help="as for `samstudy export`")
    parser.add_argument("--studies-dir", default=None, help="as for `samstudy export`")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="results folder")
    parser.add_argument(
        "--no-export", action="store_true", help="summarise the Parquet export as it is"
    )
    args = parser.parse_args(argv)

    from samstudy.analysis.cli import export_source
    from samstudy.analysis.export import export_study
    from samstudy.analysis.readers import StudyNotFoundError
    from samstudy.configio import ConfigError
    from samstudy.settings import TrackingError

    try:
        uri, experiment = export_source(
            args.name, args.tracking_uri, args.experiment, args.studies_dir
        )
    except (ConfigError, TrackingError) as error:
        print(f"samstudy summarize: {error}", file=sys.stderr)
        return 2
    try:
        if not args.no_export:
            print(export_study(args.name, uri, args.root, experiment=experiment).summary())
        print(write_variant_runs(args.name, uri, experiment, args.root).summary())
    except (StudyNotFoundError, FileNotFoundError, ValueError) as error:
        print(f"samstudy summarize: {error}", file=sys.stderr)
        return 1
    return 0


def variant_run_names(labels: Mapping[str, str] | list[str]) -> list[str]:
    """The run names :func:`write_variant_runs` gives these variant labels."""
    return [label + RUN_SUFFIX for label in labels]
