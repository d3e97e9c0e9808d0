"""Export (sqlite store) and analysis numbers on a hand-built study whose answers are known."""

from __future__ import annotations

import math
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from samstudy.analysis import (
    METRICS_SCHEMA,
    RULE,
    curves,
    differences,
    final_and_best,
    final_best_table,
    hypothesis_table,
    load_metrics,
    load_study,
    match_references,
    seed_aggregate,
    stage_values,
    verdict,
    verdict_table,
    verdicts,
)
from samstudy.analysis.schema import RUNS_FIXED_FIELDS, exported_studies, partition_dir
from samstudy.analysis.stats import t_quantile, welch_interval
from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store
from samstudy.identity import param_value, run_name

# ---------------------------------------------------------------------------------------------
# The hand-built study. Six epochs; default stages: early = epochs 1-2, late = epochs 5-6.
# Reference (sam) curves: REF[m][epoch] + 0.01 * seed. Every other variant adds DELTA[variant]
# [(metric, stage)] on that stage's epochs plus a per-seed jitter (-0.03, 0, +0.03), so each
# paired stage difference has mean DELTA and sd 0.03 over 3 seeds: its 95% half-width is
# t(0.975, 2) * 0.03 / sqrt(3) = 0.0745, so |DELTA| = 0.1 is "up"/"down" and 0.02 is "flat".

EPOCHS = 6
SEEDS = (0, 1, 2)
JITTER = (-0.03, 0.0, 0.03)
T975_2 = 4.302652729749752  # Student t quantile, 2 degrees of freedom (printed tables: 4.303)
HALF = T975_2 * 0.03 / math.sqrt(3)
REF = {
    "train_acc": [0.40, 0.50, 0.60, 0.70, 0.80, 0.90],
    "test_acc": [0.50, 0.60, 0.70, 0.80, 0.75, 0.70],
    "train_acc_clean": [0.45, 0.55, 0.65, 0.75, 0.85, 0.95],
    "train_acc_noisy": [0.05, 0.10, 0.20, 0.30, 0.40, 0.50],
    "memorization": [0.05, 0.10, 0.20, 0.30, 0.40, 0.50],
    "region_ckpt1": [0.30, 0.30, 0.25, 0.25, 0.20, 0.20],
    "region_ckpt2": [0.40, 0.40, 0.40, 0.40, 0.40, 0.40],
    "region_ckpt3": [0.10, 0.10, 0.15, 0.15, 0.20, 0.20],
    "region_ckpt4": [0.20, 0.20, 0.20, 0.20, 0.20, 0.20],
    "region_zero": [0.0] * 6,
    "grad_ratio": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
}
UP, DOWN, FLAT = 0.1, -0.1, 0.02
# variant -> {(metric, stage): delta}; unlisted = 0 (also "flat").
DELTA = {
    "ckpt1": {("train_acc", "early"): DOWN, ("train_acc", "late"): UP, ("test_acc", "late"): UP},
    "ckpt2": {
        ("train_acc", "early"): UP,
        ("test_acc", "early"): FLAT,
        ("train_acc", "late"): UP,
        ("test_acc", "late"): UP,
    },
    "ckpt3": {
        ("train_acc", "early"): DOWN,
        ("train_acc", "late"): DOWN,
        ("test_acc", "late"): DOWN,
    },
    "ckpt4": {("test_acc", "late"): DOWN, ("train_acc_noisy", "late"): UP},
}
EXPECTED = {  # the lab notes' table for SAMECHECKPOINT1..3, and two more cases
    ("ckpt1", "early"): "learns useful patterns",
    ("ckpt1", "late"): "learns useful patterns",
    ("ckpt2", "early"): "noisy fitting",
    ("ckpt2", "late"): "learns useful patterns",
    ("ckpt3", "early"): "learns useful patterns",
    ("ckpt3", "late"): "underfitting",
    ("ckpt4", "early"): "no clear difference",
    ("ckpt4", "late"): "noisy fitting",
}
SCALES = {
    "ckpt1": [1, 0, 0, 0],
    "ckpt2": [0, 1, 0, 0],
    "ckpt3": [0, 0, -0.5, 0],
    "ckpt4": [0, 0, 0, 1],
}


def stage_of(epoch: int) -> str | None:
    return "early" if epoch <= 2 else "late" if epoch >= 5 else None


def curve(variant: str, seed: int, metric: str) -> list[float]:
    values = []
    for epoch in range(1, EPOCHS + 1):
        value = REF[metric][epoch - 1] + 0.01 * seed
        if variant != "sam":
            value += DELTA[variant].get((metric, stage_of(epoch)), 0.0) + JITTER[seed]
        values.append(value)
    return values


def config(variant: str, rho: float, seed: int) -> dict:
    optimizer = {"name": "sam" if variant == "sam" else "same", "rho": rho, "lr": 0.05}
    if variant != "sam":
        optimizer["scales"] = SCALES[variant]
    return {
        "optimizer": optimizer,
        "model": {"name": "mlp"},
        "noise": {"kind": "symmetric", "rate": 0.4},
        "epochs": EPOCHS,
        "seed": seed,
        "device": "cpu",
    }


def name(variant: str, rho: float, seed: int) -> str:
    """The run name the expansion gives (``sam-rho0.05-mlp-n0.4-s0``); the variant label is it
    without ``-s<seed>``."""
    return run_name(config(variant, rho, seed))


def hand_trials() -> list[TrialData]:
    trials = []
    for variant in ["sam", *DELTA]:
        for seed in SEEDS:
            metrics = {m: curve(variant, seed, m) for m in REF}
            trials.append(
                TrialData(name(variant, 0.05, seed), config(variant, 0.05, seed), metrics)
            )
    # A second rho: SAM and ckpt1 at rho 0.1 (two seeds only for ckpt1: Welch, not paired).
    for variant, seeds in (("sam", SEEDS), ("ckpt1", (0, 1))):
        for seed in seeds:
            metrics = {m: [v + 0.2 for v in curve(variant, seed, m)] for m in REF}
            trials.append(TrialData(name(variant, 0.1, seed), config(variant, 0.1, seed), metrics))
    return trials


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One sqlite MLflow store with the hand-built study, exported once."""
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study

    tmp = tmp_path_factory.mktemp("analysis")
    uri = sqlite_store(tmp / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    ids = log_study(client, "hand", hand_trials())
    # Edge cases in a study of their own (the hand-built numbers stay exact): a resumed trial
    # that logged epoch 3 again later with another value, NaN and inf values.
    from mlflow.entities import Metric

    edge = log_study(
        client, "edge", [TrialData("sam-s0", config("sam", 0.05, 0), {"test_acc": [0.5, 0.8, 0.7]})]
    )["t0000"]
    client.log_batch(edge, metrics=[Metric("test_acc", 0.123, 1_800_000_000_000, 3)])
    client.log_batch(
        edge,
        metrics=[
            Metric("train_loss", float("nan"), 1_700_000_001_000, 1),
            Metric("train_loss", float("inf"), 1_700_000_002_000, 2),
            # a run that ends in NaN (diverged): its final value is NaN, not the last number
            Metric("test_loss", 1.5, 1_700_000_001_000, 1),
            Metric("test_loss", float("nan"), 1_700_000_002_000, 2),
        ],
    )
    root = tmp / "results"
    result = export_study("hand", uri, root=root)
    export_study("edge", uri, root=root)
    return {
        "uri": uri,
        "client": client,
        "ids": ids,
        "root": root,
        "result": result,
        "resumed": edge,
    }


@pytest.fixture(scope="module")
def study(store: dict):
    return load_study("hand", store["root"])


# ---------------------------------------------------------------------------------------------
# Export


def test_export_schema_and_layout(store: dict) -> None:
    root = store["root"]
    metrics_file = partition_dir(root, "metrics", "hand") / "part-0.parquet"
    runs_file = partition_dir(root, "runs", "hand") / "part-0.parquet"
    assert pq.read_schema(metrics_file).remove_metadata() == METRICS_SCHEMA
    runs_schema = pq.read_schema(runs_file)
    assert runs_schema.names[: len(RUNS_FIXED_FIELDS)] == [f.name for f in RUNS_FIXED_FIELDS]
    rest = runs_schema.names[len(RUNS_FIXED_FIELDS) :]
    assert all(n.split(".")[0] in {"params", "tags", "final", "best"} for n in rest)
    assert {"params.optimizer.rho", "params.seed", "final.test_acc", "best.test_acc"} <= set(rest)
    assert str(runs_schema.field("final.test_acc").type) == "double"
    # params keep their types: no CAST needed to compare them
    types = {n: str(runs_schema.field(n).type) for n in rest if n.startswith("params.")}
    assert types == {
        "params.device": "string",
        "params.epochs": "int64",
        "params.model.name": "string",
        "params.noise.kind": "string",
        "params.noise.rate": "double",
        "params.optimizer.lr": "double",
        "params.optimizer.name": "string",
        "params.optimizer.rho": "double",
        "params.optimizer.scales": "list<element: double>",  # null for sam
        "params.seed": "int64",
    }
    assert str(runs_schema.field("variant").type) == "string"
    assert str(runs_schema.field("variant_id").type) == "string"
    assert exported_studies(root) == ["edge", "hand"]
    # 3 seeds x 5 variants + 3 + 2 at rho 0.1, the parent run left out
    assert store["result"].n_runs == 20
    runs = pq.read_table(runs_file).to_pandas()
    assert set(runs["status"]) == {"completed"}
    assert runs["trial_id"].is_unique and runs["parent_run_id"].nunique() == 1


def test_export_round_trip_equals_mlflow(store: dict) -> None:
    client = store["client"]
    exported = pq.read_table(partition_dir(store["root"], "metrics", "hand")).to_pandas()
    runs = pq.read_table(partition_dir(store["root"], "runs", "hand")).to_pandas()
    for _, run in runs.iterrows():
        mlflow_run = client.get_run(run["run_id"])
        assert run["trial_id"] == mlflow_run.data.tags["samstudy.trial_id"]
        assert run["run_name"] == mlflow_run.info.run_name
        for key, value in mlflow_run.data.params.items():
            got, want = run[f"params.{key}"], param_value(value)  # typed from MLflow's string
            assert (list(got) if isinstance(want, list) else got) == want, key
            assert type(want) is not str or isinstance(got, str), key
        tags = mlflow_run.data.tags
        assert run["variant"] == tags["samstudy.variant"] == run["run_name"].rsplit("-s", 1)[0]
        assert run["variant_id"] == tags["samstudy.variant_id"]
        mine = exported[exported["run_id"] == run["run_id"]]
        for key in mlflow_run.data.metrics:
            history = sorted(
                (m.step, m.timestamp, m.value)
                for m in client.get_metric_history(run["run_id"], key)
            )
            rows = mine[mine["metric"] == key]
            got = sorted(
                zip(
                    rows["step"],
                    rows["timestamp"].astype("int64") // 1_000_000
                    if rows["timestamp"].dtype.kind == "M" and "ns" in str(rows["timestamp"].dtype)
                    else rows["timestamp"].map(lambda t: int(t.timestamp() * 1000)),
                    rows["value"],
                    strict=True,
                )
            )
            assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in history]
            np.testing.assert_array_equal([v for *_, v in got], [v for *_, v in history])
    assert len(exported) == sum(len(v) for v in REF.values()) * 20


def test_export_keeps_duplicates_nan_inf_and_final_uses_latest(store: dict) -> None:
    table = pq.read_table(partition_dir(store["root"], "metrics", "edge")).to_pandas()
    third = table[(table["metric"] == "test_acc") & (table["step"] == 3)]
    assert sorted(third["value"]) == pytest.approx([0.123, 0.7])  # both rows, as in MLflow
    loss = table[table["metric"] == "train_loss"].sort_values("step")["value"].tolist()
    assert math.isnan(loss[0]) and loss[1] == 1.7976931348623157e308  # MLflow stores inf so
    runs = pq.read_table(partition_dir(store["root"], "runs", "edge")).to_pandas()
    assert runs["final.test_acc"].tolist() == [pytest.approx(0.123)]  # the latest value
    assert runs["best_step"].tolist() == [2] and runs["best.test_acc"].tolist() == [0.8]
    assert runs["best.train_loss"].item() == 1.7976931348623157e308  # logged at step 2 too
    assert math.isnan(runs["final.test_loss"].item())  # the last step's NaN, not step 1's 1.5
    per_run = final_and_best(load_study("edge", store["root"])).set_index(["kind", "metric"])
    assert math.isnan(per_run.at[("final", "test_loss"), "value"])  # the analysis agrees
    assert per_run.at[("final", "test_acc"), "value"] == pytest.approx(0.123)
    # the analysis loader keeps the latest value of a step logged twice
    long = load_metrics("edge", store["root"], metrics=["test_acc"])
    assert long.sort_values("step")["value"].tolist() == pytest.approx([0.5, 0.8, 0.123])


def test_reexport_replaces_partition_without_duplicates(store: dict, tmp_path: Path) -> None:
    from mlflow.entities import Metric

    from samstudy.analysis.export import export_study

    root = tmp_path / "results"
    first = export_study("hand", store["uri"], root=root)
    before = pq.read_table(first.metrics_path).num_rows
    second = export_study("hand", store["uri"], root=root)
    assert pq.read_table(second.metrics_path).num_rows == before
    assert [p.name for p in (root / "metrics").iterdir()] == ["study=hand"]  # no temp dirs
    assert [p.name for p in second.metrics_path.iterdir()] == ["part-0.parquet"]
    # new data shows up after a re-export, and nothing else changes
    run_id = store["ids"]["t0001"]
    store["client"].log_batch(run_id, metrics=[Metric("test_acc", 0.99, 1_900_000_000_000, 7)])
    try:
        third = export_study("hand", store["uri"], root=root)
        assert pq.read_table(third.metrics_path).num_rows == before + 1
        runs = pq.read_table(third.runs_path).to_pandas().set_index("run_id")
        assert runs.at[run_id, "final.test_acc"] == pytest.approx(0.99)
        assert runs.at[run_id, "num_steps"] == 7
    finally:
        store["client"].delete_run(run_id)  # keep the shared store as the other tests expect
        store["client"].restore_run(run_id)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        sql = SqlAlchemyStore(store["uri"], str(tmp_path))
        with sql.ManagedSessionMaker() as session:
            from mlflow.store.tracking.dbmodels.models import SqlMetric

            session.query(SqlMetric).filter(
                SqlMetric.run_uuid == run_id, SqlMetric.step == 7
            ).delete()


def test_stale_temp_dirs_are_cleaned_and_hive_root_reads(store: dict, tmp_path: Path) -> None:
    from samstudy.analysis.export import export_study

    root = tmp_path / "results"
    stale = root / "metrics" / ".study=hand.tmp-0123456789ab"
    stale.mkdir(parents=True)
    (stale / "part-0.parquet").write_bytes(b"junk")
    export_study("hand", store["uri"], root=root)
    assert not stale.exists()
    # the whole root reads as one Hive-partitioned data set, with `study` from the folder
    frame = pd.read_parquet(root / "metrics")
    assert set(frame["study"].astype(str)) == {"hand"}
    assert len(frame) == pq.read_table(partition_dir(root, "metrics", "hand")).num_rows


def test_missing_study_and_bad_names(store: dict, tmp_path: Path) -> None:
    from samstudy.analysis.cli import export_main
    from samstudy.analysis.export import export_study
    from samstudy.analysis.readers import StudyNotFoundError

    with pytest.raises(StudyNotFoundError, match="hand"):  # lists the experiments that exist
        export_study("nope", store["uri"], root=tmp_path)
    with pytest.raises(StudyNotFoundError, match="no MLflow database"):
        export_study("hand", f"sqlite:///{tmp_path / 'missing.db'}", root=tmp_path)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(ValueError, match="partition"):
        export_study("../evil", store["uri"], root=tmp_path)
    assert export_main(["nope", "--tracking-uri", store["uri"], "--root", str(tmp_path)]) == 1
    assert export_main(["hand", "--tracking-uri", store["uri"], "--root", str(tmp_path)]) == 0
    assert (tmp_path / "runs" / "study=hand" / "part-0.parquet").exists()


# ---------------------------------------------------------------------------------------------
# Analysis numbers


def test_variants_labels_and_seeds(study) -> None:
    labels = sorted(study.variants["variant"])
    assert labels == sorted(
        [name(v, 0.05, 0)[:-3] for v in ["sam", *DELTA]]
        + ["sam-rho0.1-mlp-n0.4", "same[1,0,0,0]-rho0.1-mlp-n0.4"]
    )
    assert (
        study.variants.set_index("variant")["n_runs"].to_dict()["same[1,0,0,0]-rho0.1-mlp-n0.4"]
        == 2
    )
    assert set(study.runs["seed"]) == set(SEEDS)
    assert "device" not in study.varying_params() and "seed" not in study.varying_params()
    assert set(study.varying_params()) == {"optimizer.name", "optimizer.rho", "optimizer.scales"}


def test_seed_aggregate_known_numbers(study) -> None:
    table = final_best_table(study)
    sam = table[table["variant"] == "sam-rho0.05-mlp-n0.4"].set_index(["kind", "metric"])
    # best test acc of SAM: 0.80 + 0.01 * seed at epoch 4
    best = sam.loc[("best", "test_acc")]
    assert best["mean"] == pytest.approx(0.81) and best["std"] == pytest.approx(0.01)
    assert best["n"] == 3
    assert best["ci_high"] - best["mean"] == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    assert sam.loc[("best", "best_step"), "mean"] == 4
    final = sam.loc[("final", "test_acc")]
    finals = [0.70, 0.71, 0.72]
    assert final["mean"] == pytest.approx(np.mean(finals))
    assert final["std"] == pytest.approx(np.std(finals, ddof=1))
    # a one-seed group has no interval
    one = seed_aggregate(pd.DataFrame({"g": ["a"], "value": [1.0]}), ["g"])
    assert one["n"].item() == 1 and math.isnan(one["ci_low"].item())


def test_curves_mean_and_band(study) -> None:
    data = curves(study, ["train_acc"])
    row = data[(data["variant"] == "same[1,0,0,0]-rho0.05-mlp-n0.4") & (data["step"] == 5)].iloc[0]
    # REF 0.80 + UP + mean(0.01 * seed) + mean(jitter); per-seed values 0.87, 0.91, 0.95
    assert row["mean"] == pytest.approx(0.91) and row["n"] == 3
    assert row["ci_high"] - row["mean"] == pytest.approx(T975_2 * 0.04 / math.sqrt(3))


def test_final_and_best_agree_with_export_columns(study) -> None:
    per_run = final_and_best(study)
    runs = study.runs.set_index("run_id")
    for (kind, metric), group in per_run.groupby(["kind", "metric"]):
        if metric == "best_step":
            np.testing.assert_array_equal(group["value"], runs.loc[group["run_id"], "best_step"])
            continue
        expected = runs.loc[group["run_id"], f"{kind}.{metric}"].to_numpy()
        np.testing.assert_allclose(group["value"].to_numpy(), expected, equal_nan=True)


def test_stage_values_are_stage_means(study) -> None:
    values = stage_values(study, metrics=["train_acc"])
    run = study.runs.set_index("run_id")
    some = values[
        (values["variant"] == "same[0,0,-0.5,0]-rho0.05-mlp-n0.4") & (values["seed"] == 2)
    ]
    got = some.set_index("stage")["value"]
    # ckpt3 seed 2: epochs 1-2 -> 0.40, 0.50 (+0.02 seed, -0.1 delta, +0.03 jitter)
    assert got["early"] == pytest.approx(np.mean([0.40, 0.50]) + 0.02 - 0.1 + 0.03)
    assert got["late"] == pytest.approx(np.mean([0.80, 0.90]) + 0.02 - 0.1 + 0.03)
    assert len(run) == 20
    custom = stage_values(study, {"mid": (1 / 3, 2 / 3)}, metrics=["train_acc"])
    assert set(custom["stage"]) == {"mid"}
    with pytest.raises(ValueError, match="stage"):
        stage_values(study, {"bad": (0.5, 0.2)})


def test_reference_matching_by_rho(study) -> None:
    refs = match_references(study.variants, "sam")
    assert refs["same[1,0,0,0]-rho0.05-mlp-n0.4"] == "sam-rho0.05-mlp-n0.4"
    assert refs["same[1,0,0,0]-rho0.1-mlp-n0.4"] == "sam-rho0.1-mlp-n0.4"
    assert refs["sam-rho0.1-mlp-n0.4"] == "sam-rho0.1-mlp-n0.4"
    single = match_references(
        study.variants, "sam-rho0.1-mlp-n0.4"
    )  # a label: one reference for all
    assert set(single.values()) == {"sam-rho0.1-mlp-n0.4"}
    nobody = match_references(study.variants, "sgd")
    assert all(v is None for v in nobody.values())


def test_paired_differences_known_intervals(study) -> None:
    diffs = differences(stage_values(study), study.variants, "sam").set_index(
        ["variant", "stage", "metric"]
    )
    for variant, deltas in DELTA.items():
        label = name(variant, 0.05, 0)[:-3]
        for stage in ("early", "late"):
            for metric in ("train_acc", "test_acc"):
                row = diffs.loc[(label, stage, metric)]
                delta = deltas.get((metric, stage), 0.0)
                assert row["paired"] and row["n"] == 3
                assert row["diff"] == pytest.approx(delta, abs=1e-12)
                assert row["ci_low"] == pytest.approx(delta - HALF)
                assert row["ci_high"] == pytest.approx(delta + HALF)
                want = "up" if delta - HALF > 0 else "down" if delta + HALF < 0 else "flat"
                assert row["direction"] == want


def test_welch_when_seeds_differ(study) -> None:
    diffs = differences(stage_values(study, metrics=["train_acc"]), study.variants, "sam")
    row = diffs[
        (diffs["variant"] == "same[1,0,0,0]-rho0.1-mlp-n0.4") & (diffs["stage"] == "late")
    ].iloc[0]
    assert not row["paired"] and (row["n"], row["n_ref"]) == (2, 3)
    a = [np.mean([0.8, 0.9]) + 0.2 + 0.01 * s + UP + JITTER[s] for s in (0, 1)]
    b = [np.mean([0.8, 0.9]) + 0.2 + 0.01 * s for s in SEEDS]
    diff, low, high = welch_interval(
        np.mean(a), np.std(a, ddof=1), 2, np.mean(b), np.std(b, ddof=1), 3
    )
    assert (row["diff"], row["ci_low"], row["ci_high"]) == pytest.approx((diff, low, high))
    assert row["diff"] == pytest.approx(np.mean(a) - np.mean(b))


def test_verdicts_reproduce_the_designed_table(study) -> None:
    table = verdict_table(study)
    got = {(r.variant, r.stage): r.verdict for r in table.itertuples()}
    for (variant, stage), want in EXPECTED.items():
        assert got[(name(variant, 0.05, 0)[:-3], stage)] == want, (variant, stage)
    # the noisy-train gain of ckpt4 is reported beside the verdict
    row = table[
        (table["variant"] == "same[0,0,0,1]-rho0.05-mlp-n0.4") & (table["stage"] == "late")
    ].iloc[0]
    assert row["d_train_acc_noisy"] == pytest.approx(UP)
    assert row["d_test_acc_low"] == pytest.approx(DOWN - HALF)
    hyp = hypothesis_table(table)
    assert list(hyp.columns) == ["early", "late"]
    assert hyp.loc["same[0,0,-0.5,0]-rho0.05-mlp-n0.4", "late"] == "underfitting"
    assert "sam-rho0.05-mlp-n0.4" not in hyp.index  # references get no verdict
    # custom stage names and order carry through
    custom = verdict_table(study, stages={"late": (2 / 3, 1.0), "early": (0.0, 1 / 3)})
    assert list(hypothesis_table(custom).columns) == ["late", "early"]


def test_verdict_rule_is_total_and_matches_the_brief() -> None:
    assert len(RULE) == 9
    assert verdict("up", "flat") == "noisy fitting"  # train up, test not up
    assert verdict("down", "flat") == "learns useful patterns"  # train not up, test not down
    assert verdict("flat", "up") == "learns useful patterns"
    assert verdict("down", "down") == "underfitting"
    assert verdict("flat", "flat") == "no clear difference"
    with pytest.raises(ValueError):
        verdict("sideways", "up")


def test_t_quantiles_match_printed_tables() -> None:
    for df, value in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (1000, 1.962)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    assert math.isnan(t_quantile(0.975, 0))


def test_two_studies_load_together(store: dict, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study

    uri = store["uri"]
    trials = [
        TrialData(
            f"sgd-mlp-s{s}",
            {"optimizer": {"name": "sgd"}, "model": {"name": "mlp"}, "seed": s},
            {"test_acc": [0.1, 0.2]},
        )
        for s in (0, 1)
    ]
    log_study(MlflowClient(uri), "other", trials)
    root = tmp_path / "results"
    export_study("other", uri, root=root)
    export_study("hand", uri, root=root)
    both = load_study(["hand", "other"], root)
    assert set(both.runs["study"]) == {"hand", "other"}
    assert "other/sgd-mlp" in set(both.variants["variant"])
    assert any(v.startswith("hand/sam") for v in both.variants["variant"])
    # one label per (study, variant_id), and the variants table has one row per label
    pairs = both.runs.groupby("variant")[["study", "variant_id"]].nunique()
    assert (pairs == 1).all().all() and len(pairs) == len(both.variants) == 7 + 1
    frame = pd.read_parquet(root / "runs")  # Hive read of both partitions (different columns)
    assert set(frame["study"].astype(str)) == {"hand", "other"}


def test_study_without_trials(store: dict, tmp_path: Path) -> None:
    from samstudy.analysis.cli import report_main
    from samstudy.analysis.export import export_study

    log_study(store["client"], "empty", [])  # a parent run only
    result = export_study("empty", store["uri"], root=tmp_path)
    assert (result.n_runs, result.n_metric_rows) == (0, 0)
    assert (
        pq.read_schema(result.metrics_path / "part-0.parquet").remove_metadata() == METRICS_SCHEMA
    )
    empty = load_study("empty", tmp_path)
    assert empty.runs.empty and empty.metrics.empty and empty.variants.empty
    assert report_main(["empty", "--root", str(tmp_path)]) == 1


def test_sql_reader_key_modes_agree(store: dict) -> None:
    """The rowid fast path (sqlite) and the run-id path (other databases) read the same."""
    from samstudy.analysis.export import build_tables
    from samstudy.analysis.readers import read_sql_store

    fast = build_tables(read_sql_store(store["uri"], "hand", rowid_keys=True))
    plain = build_tables(read_sql_store(store["uri"], "hand", rowid_keys=False))
    for a, b in zip(fast, plain, strict=True):
        pd.testing.assert_frame_equal(a.to_pandas(), b.to_pandas())


def test_lab_notes_column_marks_samecheckpoint_variants(study) -> None:
    from samstudy.analysis import with_lab_notes
    from samstudy.analysis.verdicts import lab_notes_region

    assert lab_notes_region("same", "[0, 1, 0, 0]") == 2
    assert lab_notes_region("same", "[0, 0, -0.5, 0]") is None  # lowering is not the notebook's
    assert lab_notes_region("custom_same", "[1, 0, -0.5, 1]") is None
    table = with_lab_notes(hypothesis_table(verdict_table(study)), study.variants)
    assert table.loc["same[0,1,0,0]-rho0.05-mlp-n0.4", "lab notes: early"] == "noisy fitting"
    assert table.loc["same[0,0,-0.5,0]-rho0.05-mlp-n0.4", "lab notes: late"] == ""
    # our designed ckpt2 agrees with the notebook in both stages
    row = table.loc["same[0,1,0,0]-rho0.05-mlp-n0.4"]
    assert (row["early"], row["late"]) == (row["lab notes: early"], row["lab notes: late"])


def test_negligible_difference_is_flat_whatever_its_interval(tmp_path: Path) -> None:
    """A razor-thin interval around a tiny mean earns no verdict; a real difference still does."""
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study

    shifts = {"sam": (0.0, 0.0), "ckpt1": (0.001, 0.001), "ckpt2": (0.0, 0.03)}
    trials = []
    for variant, (train_shift, test_shift) in shifts.items():
        for seed in (0, 1):  # the same shift in both seeds: a zero-width paired interval
            curves = {
                "train_acc": [0.5 + 0.05 * e + 0.01 * seed + train_shift for e in range(EPOCHS)],
                "test_acc": [0.4 + 0.05 * e + 0.01 * seed + test_shift for e in range(EPOCHS)],
            }
            trials.append(TrialData(name(variant, 0.05, seed), config(variant, 0.05, seed), curves))
    uri = sqlite_store(tmp_path / "mlflow.db")
    log_study(MlflowClient(tracking_uri=uri), "tiny", trials)
    export_study("tiny", uri, root=tmp_path / "results")
    tiny = load_study("tiny", tmp_path / "results")
    labels = {v: name(v, 0.05, 0).rsplit("-s", 1)[0] for v in shifts}

    def verdicts_of(min_effect: float) -> dict[str, set[str]]:
        table = verdicts.verdict_table(tiny, min_effect=min_effect)
        return {v: set(table.loc[table["variant"] == labels[v], "verdict"]) for v in shifts}

    default = verdicts_of(verdicts.DEFAULT_MIN_EFFECT)
    assert default["ckpt1"] == {"no clear difference"}
    assert default["ckpt2"] == {"learns useful patterns"}
    assert "no clear difference" not in verdicts_of(0.0)["ckpt1"]
