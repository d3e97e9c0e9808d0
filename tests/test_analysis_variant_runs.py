"""Summary runs per variant (``samstudy summarize``) in a real sqlite MLflow store: their values
are the Parquet aggregates, a second summary replaces them, the export ignores them, and a real
MLflow UI (served on 127.0.0.1, loaded by a headless Chromium) lists them in the runs table of
a study experiment created the way ``samstudy study`` creates it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here

import pytest

from samstudy import tags
from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
STUDY = "quickstart"
ROLE_QUERY = f"tags.`{tags.ROLE}` = '{tags.ROLE_VARIANT}'"


def _curves(config: dict, variant_id: str) -> dict[str, list[float]]:
    """Per-epoch metrics that differ by variant and (a little) by seed."""
    effect = int(variant_id[:4], 16) / 65536 * 0.2
    jitter = 0.01 * int(config["seed"])
    out: dict[str, list[float]] = {}
    for epoch in range(1, EPOCHS + 1):
        t = epoch / EPOCHS
        for key, value in {
            "train_acc": 0.4 + 0.5 * t + effect + jitter,
            "train_loss": 2.0 - t - effect + jitter,
            "test_acc": 0.3 + 0.4 * t + effect - jitter,
            "test_loss": 2.0 - t + effect * jitter,
            "memorization": 0.1 + 0.3 * t + effect + 2 * jitter,
        }.items():
            out.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The quickstart's trials with synthetic metrics, in an experiment the study's own store
    created, exported to Parquet and summarised."""
    from samstudy.analysis.export import export_study
    from samstudy.analysis.variant_runs import write_variant_runs
    from samstudy.study.spec import load_study as load_spec
    from samstudy.study.store import MlflowStore, StudyInfo

    tmp = tmp_path_factory.mktemp("variants")
    uri = sqlite_store(tmp / "mlflow.db")
    MlflowStore(uri, StudyInfo(STUDY, STUDY))._ensure_experiment()  # as `samstudy study` does
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    spec = load_spec(STUDY, REPO / "studies", overrides=[f"epochs={EPOCHS}"])
    trials = [
        TrialData(
            t.name,
            t.config,
            _curves(t.config, t.variant_id),
            trial_id=t.trial_id,
            overrides=t.overrides,
            variant=t.variant,
            variant_id=t.variant_id,
        )
        for t in spec.expand()
    ]
    log_study(client, STUDY, trials)
    root = tmp / "results"
    export_study(STUDY, uri, root=root)
    first = write_variant_runs(STUDY, uri, root=root)
    return {"uri": uri, "root": root, "client": client, "first": first, "tmp": tmp}


def test_study_experiment_is_a_model_training_experiment(store: dict, tmp_path: Path) -> None:
    from samstudy.study.store import MlflowStore, StudyInfo

    experiment = store["client"].get_experiment_by_name(STUDY)
    assert experiment.tags[tags.EXPERIMENT_KIND] == "custom_model_development"
    # an experiment made before the tag existed gets it when the study resumes
    uri = sqlite_store(tmp_path / "old.db")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("old", tags={tags.STUDY: "old"})
    MlflowStore(uri, StudyInfo("old", "old"))._ensure_experiment()
    assert client.get_experiment_by_name("old").tags[tags.EXPERIMENT_KIND] == (
        "custom_model_development"
    )


def test_variant_runs_hold_the_parquet_aggregates(store: dict) -> None:
    import math

    from samstudy.analysis import curves, final_best_table, load_study

    client, first = store["client"], store["first"]
    study = load_study(STUDY, store["root"])
    assert set(first.run_ids) == set(study.variants["variant"]) and len(first.run_ids) == 15
    table = final_best_table(study, metrics=("test_acc", "test_loss", "memorization"))
    mean_curves = curves(study, ["test_acc", "memorization"])
    for variant, run_id in first.run_ids.items():
        run = client.get_run(run_id)
        assert run.data.tags[tags.ROLE] == tags.ROLE_VARIANT
        assert run.info.run_name == variant + " (seed mean)"
        rows = table[(table["variant"] == variant) & (table["metric"] != "best_step")]
        assert len(rows) == 6  # final and best of three metrics
        for row in rows.itertuples():
            for stat in ("mean", "ci_low", "ci_high", "n"):
                logged = run.data.metrics[f"{row.kind}.{row.metric}.{stat}"]
                assert math.isclose(logged, float(getattr(row, stat)), rel_tol=1e-12), (
                    variant,
                    row,
                    stat,
                )
            assert row.n == 2 and row.ci_low < row.mean < row.ci_high
        # the variant's params: its trials' config without the seed
        trial = study.runs[study.runs["variant"] == variant].iloc[0]
        assert "seed" not in run.data.params
        assert run.data.params["optimizer.name"] == trial["params.optimizer.name"]
        assert float(run.data.params["optimizer.lr"]) == trial["params.optimizer.lr"]
        # the seed-mean curves as history, one point per epoch
        for metric in ("test_acc", "memorization"):
            history = client.get_metric_history(run_id, metric)
            expected = mean_curves[
                (mean_curves["variant"] == variant) & (mean_curves["metric"] == metric)
            ].sort_values("step")
            assert [h.step for h in sorted(history, key=lambda h: h.step)] == list(expected["step"])
            got = [h.value for h in sorted(history, key=lambda h: h.step)]
            assert got == pytest.approx(list(expected["mean"]), rel=1e-12)


def test_summarising_again_replaces_and_export_ignores_variant_runs(store: dict) -> None:
    from samstudy.analysis import load_study
    from samstudy.analysis.export import export_study
    from samstudy.analysis.variant_runs import write_variant_runs

    client, uri, root = store["client"], store["uri"], store["root"]
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    again = write_variant_runs(STUDY, uri, root=root)
    assert again.replaced == 15
    active = client.search_runs([experiment], ROLE_QUERY, max_results=1000)
    assert sorted(r.info.run_id for r in active) == sorted(again.run_ids.values())
    assert not set(again.run_ids.values()) & set(store["first"].run_ids.values())
    export_study(STUDY, uri, root=root)
    runs = load_study(STUDY, root).runs
    assert len(runs) == 30 and set(runs["tags.samstudy.role"]) == {tags.ROLE_TRIAL}


def test_summarize_command(store: dict) -> None:
    from samstudy.analysis.variant_runs import summarize_main

    args = [STUDY, "--tracking-uri", store["uri"], "--root", str(store["root"])]
    assert summarize_main(args) == 0
    assert summarize_main(["no_such_study", *args[1:]]) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser") if (p := shutil.which(n)) is not None), None
    )


@pytest.mark.slow
def test_mlflow_ui_runs_table_lists_the_variant_runs(store: dict) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    from samstudy.analysis.variant_runs import write_variant_runs

    summary = write_variant_runs(STUDY, store["uri"], root=store["root"])
    port = _free_port()
    tmp = store["tmp"]
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with open(tmp / "ui.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
            + ["--backend-store-uri", store["uri"], "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env=env,
            start_new_session=True,  # its own process group: its workers go down with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(tmp / 'ui.log').read_text()[-3000:]}")
            time.sleep(0.5)
        # the experiment's page in the UI's model-training view (MLflow 3.17 takes the view
        # from this parameter, else from the sidebar switch the browser remembers; a fresh
        # browser profile would show the GenAI overview); the variant runs first (newest)
        page = f"{url}/#/experiments/{summary.experiment_id}?workflowType=machine_learning"
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,4000"]
            + ["--virtual-time-budget=30000", f"--user-data-dir={tmp / 'chromium'}"]
            + ["--dump-dom", page],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert "ag-root" in dom or 'role="grid"' in dom, dom[-2000:]  # the runs table rendered
    listed = [variant for variant in summary.run_ids if f">{variant} (seed mean)<" in dom]
    assert sorted(listed) == sorted(summary.run_ids), (len(listed), dom[-3000:])
