"""Typed Parquet and the variant columns: the export's param types, the variant identity from
expansion to Parquet, DuckDB queries without casts, the previous version's exports, several
studies typed differently. Real sqlite MLflow stores, real Parquet, real DuckDB."""

from __future__ import annotations

import math
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from samstudy import tags
from samstudy.analysis import final_and_best, load_study
from samstudy.analysis.params import param_column, parse_param, retype_string_params
from samstudy.analysis.schema import PARAM_PREFIX, partition_dir, write_partitions
from samstudy.analysis.summary import run_values
from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store
from samstudy.study.spec import study_from_mapping

SPEC = {
    "name": "typed",
    "base": {
        "data": {"name": "digits"},
        "noise": {"kind": "symmetric", "rate": 0.4},
        "model": {"name": "mlp"},
        "optimizer": {"base": "sgd", "lr": 0.05},
        "epochs": 3,
        "device": "cpu",
        "threads": 1,
    },
    "grid": [
        {"optimizer": [{"name": "sgd"}], "optimizer.lr": [0.05, 0.1]},
        {
            "optimizer": [{"name": "sam"}, {"name": "same", "scales": [2, 0, 0, 0]}],
            "optimizer.rho": [0.05, 0.1],
        },
    ],
    "seeds": [0, 1, 2],
}
BONUS = {"sgd": 0.0, "sam": 0.1, "same": 0.2}


def final_acc(config: dict) -> float:
    """A known final test accuracy per trial: optimizer, rho, lr and seed each add a part."""
    opt = config["optimizer"]
    return 0.5 + BONUS[opt["name"]] + opt["rho"] + (opt["lr"] - 0.05) + 0.01 * config["seed"]


def curves(config: dict) -> dict[str, list[float]]:
    seed = config["seed"]
    return {
        "train_acc": [0.4, 0.6, 0.8 + 0.01 * seed],
        "test_acc": [0.3, 0.4, final_acc(config)],
    }


def trial_data(trial, **kwargs) -> TrialData:
    return TrialData(
        trial.name,
        trial.config,
        curves(trial.config),
        trial_id=trial.trial_id,
        overrides=trial.overrides,
        **kwargs,
    )


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The expanded study logged twice: as the tracker logs it now (variant tags from the
    expansion) and as versions before the variant tags did (``legacy``)."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("typed")
    trials = study_from_mapping(SPEC, path=tmp / "typed.yaml").expand()
    assert len(trials) == 18
    uri = sqlite_store(tmp / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    tagged = [trial_data(t, variant=t.variant, variant_id=t.variant_id) for t in trials]
    log_study(client, "typed", tagged)
    log_study(client, "legacy", [trial_data(t) for t in trials], variant_tags=False)
    return {"uri": uri, "trials": trials, "client": client}


# ---------------------------------------------------------------------------------------------
# The typing rule


def test_param_typing_rule() -> None:
    def typed(*texts):
        array = param_column(list(texts))
        return str(array.type), array.to_pylist()

    assert typed("1", "2", None) == ("int64", [1, 2, None])
    assert typed("1", "0.5") == ("double", [1.0, 0.5])
    assert typed("true", "false", "null") == ("bool", [True, False, None])
    assert typed("[1, 0]", "[0.5]", "[]") == ("list<element: double>", [[1.0, 0.0], [0.5], []])
    assert typed("resnet18", "mlp") == ("string", ["resnet18", "mlp"])
    # mixed: each value's MLflow text, so nothing is lost
    assert typed("1", "mlp", "null") == ("string", ["1", "mlp", None])
    assert typed('["a"]', "[1]") == ("string", ['["a"]', "[1]"])
    assert typed("{}", '{"depth": 2}') == ("string", ["{}", '{"depth": 2}'])
    assert typed("true", "1") == ("string", ["true", "1"])  # a bool is no number
    # nothing to type by: string, all null (a string column reads beside any other type)
    assert typed("null", None) == ("string", [None, None])
    assert typed(str(2**70), "1") == ("string", [str(2**70), "1"])  # beyond int64


def test_earlier_exports_type_by_the_same_rule() -> None:
    parsed = parse_param(pd.Series(["0.05", "0.1", None], dtype=object))
    assert parsed.dtype == np.float64 and parsed.iloc[:2].tolist() == [0.05, 0.1]
    assert pd.isna(parsed.iloc[2])
    assert str(parse_param(pd.Series(["1", "null"])).dtype) == "Int64"
    assert str(parse_param(pd.Series(["true", "false"])).dtype) == "boolean"
    assert parse_param(pd.Series(["[1, 0]", "[2, 0]"])).tolist() == [(1.0, 0.0), (2.0, 0.0)]
    # retyping a table this version wrote changes nothing (its strings stay strings)
    table = pa.table(
        {
            "params.a": param_column(["1", "mlp"]),  # mixed: MLflow text
            "params.b": param_column(["sam", "same"]),
            "params.c": param_column(["0.1", "0.2"]),
        }
    )
    assert retype_string_params(table, PARAM_PREFIX).equals(table)


def test_run_values_first_best_step_latest_value_and_nan() -> None:
    rows = [  # run, metric, step, value, timestamp
        ("a", "acc", 1, 0.5, 1),
        ("a", "acc", 2, 0.8, 2),
        ("a", "acc", 3, 0.8, 3),  # a tie: the first best step (2) counts
        ("a", "acc", 4, float("nan"), 4),  # NaN is never best, and is the final value
        ("a", "loss", 1, 2.0, 1),
        ("a", "loss", 4, 1.0, 4),
        ("a", "loss", 4, 3.0, 9),  # step 4 logged again later: the latest value counts
        ("b", "acc", 1, 0.2, 1),
        ("b", "acc", 2, 0.1, 2),
    ]
    long = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])
    values = run_values(long.sample(frac=1.0, random_state=0), "acc", "max")  # any row order
    final = values.final.set_index(["run_id", "metric"])["value"]
    assert math.isnan(final[("a", "acc")]) and final[("a", "loss")] == 3.0
    assert final[("b", "acc")] == 0.1
    assert values.best_step.to_dict() == {"a": 2, "b": 1}
    best = values.best.set_index(["run_id", "metric"])["value"].to_dict()
    assert best == {("a", "acc"): 0.8, ("b", "acc"): 0.2}  # a logged no loss at step 2
    assert values.num_steps.to_dict() == {"a": 4, "b": 2}
    lowest = run_values(long, "loss", "min")
    assert lowest.best_step.to_dict() == {"a": 1}  # 2.0 at step 1 beats the latest 3.0 at 4
    with pytest.raises(ValueError, match="mode"):
        run_values(long, "acc", "highest")


# ---------------------------------------------------------------------------------------------
# Variant identity, from the expansion to Parquet


def test_variant_columns_are_the_expansions(logged: dict, tmp_path: Path) -> None:
    from samstudy.analysis.export import export_study

    root = tmp_path / "results"
    want = {t.trial_id: (t.variant, t.variant_id) for t in logged["trials"]}
    for study in ("typed", "legacy"):
        export_study(study, logged["uri"], root=root)
        runs = pq.read_table(partition_dir(root, "runs", study)).to_pandas()
        pairs = zip(runs["variant"], runs["variant_id"], strict=True)
        got = dict(zip(runs["trial_id"], pairs, strict=True))
        assert got == want, study
    # the legacy runs have no variant tags: the export derived the same identity from their
    # params and overrides tag
    legacy = pq.read_schema(partition_dir(root, "runs", "legacy") / "part-0.parquet")
    assert "tags.samstudy.variant_id" not in legacy.names
    assert "tags.samstudy.overrides" in legacy.names
    # the synthetic helper's default tags are the expansion's too
    for t in logged["trials"]:
        default = TrialData(t.name, t.config, {}, overrides=t.overrides).variant_tags()
        assert default == {tags.VARIANT: t.variant, tags.VARIANT_ID: t.variant_id}
    # the analysis groups by them: 6 variants of 3 seeds, labelled as the expansion labels
    study = load_study("typed", root)
    assert sorted(study.variants["variant"]) == sorted({t.variant for t in logged["trials"]})
    assert set(study.variants["n_runs"]) == {3}
    assert set(study.varying_params()) == {
        "optimizer.name",
        "optimizer.lr",
        "optimizer.rho",
        "optimizer.scales",
    }
    # the same configs in two studies are two sets of variants, prefixed by their study
    both = load_study(["legacy", "typed"], root)
    assert len(both.variants) == 12
    assert {v.split("/", 1)[0] for v in both.variants["variant"]} == {"legacy", "typed"}
    assert both.variants.groupby("variant_id")["study"].nunique().eq(2).all()


def test_duckdb_compares_typed_params_without_a_cast(logged: dict, tmp_path: Path) -> None:
    from samstudy.analysis.export import export_study

    root = tmp_path / "results"
    export_study("typed", logged["uri"], root=root)
    con = duckdb.connect()
    con.execute(
        "CREATE VIEW runs AS SELECT * FROM "
        f"read_parquet('{root}/runs/*/*.parquet', hive_partitioning=true)"
    )
    query = (
        'SELECT variant, avg("final.test_acc") FROM runs '
        'WHERE "params.optimizer.rho" = 0.1 GROUP BY variant'
    )
    rows = con.execute(query).fetchall()
    print(f"\n{query}\n" + "\n".join(f"  {v} | {a!r}" for v, a in sorted(rows)))
    expected: dict[str, list[float]] = {}
    for t in logged["trials"]:
        if t.config["optimizer"]["rho"] == 0.1:
            expected.setdefault(t.variant, []).append(final_acc(t.config))
    assert sorted(expected) == ["sam-rho0.1-mlp-n0.4", "same[2,0,0,0]-rho0.1-mlp-n0.4"]
    got = dict(rows)
    assert got.keys() == expected.keys()
    for variant, finals in expected.items():
        assert got[variant] == pytest.approx(np.mean(finals), abs=1e-12)
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE runs)").fetchall())
    assert types["params.optimizer.rho"] == "DOUBLE"
    assert types["params.seed"] == types["params.threads"] == "BIGINT"
    assert types["params.data.augment"] == "BOOLEAN"
    assert types["params.optimizer.scales"] == "DOUBLE[]"
    assert types["params.optimizer.name"] == types["variant_id"] == "VARCHAR"
    # lists and booleans query as what they are
    with_two = con.execute(
        'SELECT count(*) FROM runs WHERE list_contains("params.optimizer.scales", 2.0) '
        'AND "params.data.augment"'
    ).fetchone()
    assert with_two == (6,)


# ---------------------------------------------------------------------------------------------
# Exports of the previous version


def previous_version_runs(runs: pa.Table, raw) -> pa.Table:
    """The runs table as the previous version wrote it: no variant columns, every param the
    string MLflow keeps."""
    texts = {r.run_id: r.params for r in raw.runs}
    run_ids = runs.column("run_id").to_pylist()
    table = runs.drop_columns(["variant", "variant_id"])
    for i, field in enumerate(table.schema):
        if field.name.startswith(PARAM_PREFIX):
            key = field.name[len(PARAM_PREFIX) :]
            strings = pa.array([texts[r].get(key) for r in run_ids], pa.string())
            table = table.set_column(i, pa.field(field.name, pa.string()), strings)
    return table


def test_previous_versions_export_loads_and_reexports(logged: dict, tmp_path: Path) -> None:
    from samstudy.analysis.export import build_tables, export_study
    from samstudy.analysis.readers import read_sql_store
    from samstudy.analysis.report import build_report

    root = tmp_path / "results"
    raw = read_sql_store(logged["uri"], "legacy")
    runs, metrics = build_tables(raw)
    write_partitions(root, "legacy", {"runs": previous_version_runs(runs, raw), "metrics": metrics})
    old_file = partition_dir(root, "runs", "legacy") / "part-0.parquet"
    old_schema = pq.read_schema(old_file)
    assert "variant" not in old_schema.names
    assert old_schema.field("params.optimizer.rho").type == pa.string()

    # it loads: params typed by the export's rule, variants derived as the export derives them
    before = load_study("legacy", root)
    assert before.runs["params.optimizer.rho"].dtype == np.float64
    assert str(before.runs["params.seed"].dtype) == "Int64"
    want = {t.trial_id: t.variant for t in logged["trials"]}
    assert dict(zip(before.runs["trial_id"], before.runs["variant"], strict=True)) == want
    # and beside a study this version exported
    export_study("typed", logged["uri"], root=root)
    mixed = load_study(["legacy", "typed"], root)
    assert mixed.runs["params.optimizer.rho"].dtype == np.float64 and len(mixed.variants) == 12
    assert mixed.variants.groupby("variant_id")["study"].nunique().eq(2).all()

    # re-export with this version into the same root: typed, and no duplicate rows
    result = export_study("legacy", logged["uri"], root=root)
    assert [p.name for p in result.runs_path.iterdir()] == ["part-0.parquet"]
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["study=legacy", "study=typed"]
    table = pq.read_table(result.runs_path)
    assert table.num_rows == 18 and len(set(table.column("trial_id").to_pylist())) == 18
    assert table.schema.field("params.optimizer.rho").type == pa.float64()
    assert table.schema.field("params.seed").type == pa.int64()
    assert pq.read_table(result.metrics_path).num_rows == metrics.num_rows
    after = load_study("legacy", root)
    columns = ["run_id", "variant", "variant_id", "params.optimizer.rho", "params.seed"]
    pd.testing.assert_frame_equal(
        after.runs[columns].sort_values("run_id").reset_index(drop=True),
        before.runs[columns].sort_values("run_id").reset_index(drop=True),
    )
    pd.testing.assert_frame_equal(after.variants, before.variants)

    report = build_report("legacy", root=root)
    assert not report.verdicts.empty and report.html.exists()
    assert set(report.verdicts["reference"]) <= set(after.variants["variant"])


# ---------------------------------------------------------------------------------------------
# Several studies


def test_studies_that_type_a_param_differently(tmp_path: Path) -> None:
    """``rho`` int64 in one study and float64 in another, ``extra`` a string in one and a
    number in the other: the loader settles each by the same rule; DuckDB reads them with
    ``union_by_name``."""
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    for study, rho, extra in (("ints", 1, "abc"), ("floats", 0.5, 3)):
        config = {
            "optimizer": {"name": "sam", "rho": rho},
            "model": {"name": "mlp"},
            "extra": extra,
        }
        trials = [
            TrialData(f"{study}-s{seed}", {**config, "seed": seed}, {"test_acc": [0.5, 0.6]})
            for seed in (0, 1)
        ]
        log_study(client, study, trials)
    root = tmp_path / "results"
    for study in ("ints", "floats"):
        export_study(study, uri, root=root)
    kinds = {
        study: pq.read_schema(partition_dir(root, "runs", study) / "part-0.parquet")
        for study in ("ints", "floats")
    }
    assert kinds["ints"].field("params.optimizer.rho").type == pa.int64()
    assert kinds["floats"].field("params.optimizer.rho").type == pa.float64()
    assert kinds["ints"].field("params.extra").type == pa.string()
    assert kinds["floats"].field("params.extra").type == pa.int64()

    both = load_study(["floats", "ints"], root).runs.set_index("study")
    assert both["params.optimizer.rho"].dtype == np.float64
    assert both.loc["ints", "params.optimizer.rho"].tolist() == [1.0, 1.0]
    assert sorted(set(both["params.extra"])) == ["3", "abc"]  # mixed: the MLflow text
    per_run = final_and_best(load_study(["floats", "ints"], root))
    assert set(per_run["variant"]) == {"floats/sam-rho0.5-mlp", "ints/sam-rho1-mlp"}

    con = duckdb.connect()
    rows = con.execute(
        'SELECT study, "params.optimizer.rho", "params.extra" FROM '
        f"read_parquet('{root}/runs/*/*.parquet', hive_partitioning=true, union_by_name=true) "
        "ORDER BY study"
    ).fetchall()
    assert rows == [("floats", 0.5, "3")] * 2 + [("ints", 1.0, "abc")] * 2


def test_labels_of_runs_logged_without_the_expansion(tmp_path: Path) -> None:
    """Another tool's runs (no samstudy config) are grouped by their params' hash and named by
    the params that tell them apart; samstudy labels that collide get those params appended."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from samstudy.analysis.export import export_study

    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("foreign")
    for lr in (0.1, 0.2):
        for seed in (0, 1):
            run_id = client.create_run(experiment, run_name=f"run-{lr}-{seed}").info.run_id
            client.log_batch(
                run_id,
                metrics=[Metric("test_acc", lr + 0.01 * seed, 0, 1)],
                params=[Param("lr", str(lr)), Param("seed", str(seed))],
            )
            client.set_terminated(run_id)
    # no overrides tag: the label cannot show the lr, so two variants share "sgd-mlp"
    trials = [
        TrialData(
            f"sgd-s{seed}",
            {"optimizer": {"name": "sgd", "lr": lr}, "model": {"name": "mlp"}, "seed": seed},
            {"test_acc": [0.5]},
        )
        for lr in (0.05, 0.1)
        for seed in (0, 1)
    ]
    log_study(client, "collide", trials, variant_tags=False)
    root = tmp_path / "results"
    for study in ("foreign", "collide"):
        export_study(study, uri, root=root)

    foreign = load_study("foreign", root)
    assert sorted(foreign.variants["variant"]) == ["lr=0.1", "lr=0.2"]
    assert set(foreign.variants["n_runs"]) == {2}
    runs = pq.read_table(partition_dir(root, "runs", "foreign")).to_pandas()
    assert (runs["variant"] == runs["variant_id"]).all()  # Parquet: the hash, one per variant
    assert runs.groupby("params.lr")["variant_id"].nunique().eq(1).all()
    collide = load_study("collide", root)
    assert sorted(collide.variants["variant"]) == [
        "sgd-mlp (optimizer.lr=0.05)",
        "sgd-mlp (optimizer.lr=0.1)",
    ]
