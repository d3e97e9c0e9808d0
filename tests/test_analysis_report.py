"""The report and the offline example, on a small real study (trained here, logged to MLflow).

Six real trials (SGD, SAM, SAME[1,0,0,0] x 2 seeds, 5 epochs of the MLP on digits with 40% label
noise) go through ``run_trial``, are logged in the tracker's layout, exported, and reported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here

import numpy as np
import pytest

from samstudy.analysis import VERDICTS, curves, load_study
from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
VARIANTS = {
    "sgd": {"name": "sgd"},
    "sam-rho0.05": {"name": "sam", "rho": 0.05},
    "same[1,0,0,0]-rho0.05": {"name": "same", "rho": 0.05, "scales": [1, 0, 0, 0]},
}


def _png_pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def assert_drawn(path: Path) -> None:
    """A real figure: many distinct colours and not one flat colour."""
    pixels = _png_pixels(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgb = (pixels[..., :3] * 255).astype(np.uint32)
    assert float(pixels[..., :3].std()) > 0.05, path
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    assert len(np.unique(packed)) > 30, path


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study
    from samstudy.train import load_trial_config, run_trial

    tmp = tmp_path_factory.mktemp("report")
    trials = []
    for label, optimizer in VARIANTS.items():
        for seed in (0, 1):
            config = {
                "data": {"name": "digits"},
                "noise": {"kind": "symmetric", "rate": 0.4, "seed": 0},
                "model": {"name": "mlp"},
                "optimizer": dict(optimizer),
                "epochs": EPOCHS,
                "batch_size": 128,
                "seed": seed,
                "device": "cpu",
                "threads": 1,
                "checkpoint_every": 0,
            }
            history: list[dict] = []
            last = run_trial(config, lambda metrics, _ckpt, h=history: h.append(dict(metrics)))
            keys = [k for k, v in history[0].items() if isinstance(v, int | float) and k != "epoch"]
            metrics = {k: [float(row[k]) for row in history] for k in keys}
            params = load_trial_config(config).model_dump()
            trials.append(
                TrialData(f"{label}-mlp-n0.4-s{seed}", params, metrics, status=last["status"])
            )
    uri = sqlite_store(tmp / "mlflow.db")
    log_study(MlflowClient(tracking_uri=uri), "small", trials)
    root = tmp / "results"
    export_study("small", uri, root=root)
    from samstudy.analysis.report import build_report

    report = build_report("small", root=root)
    return {"root": root, "report": report, "uri": uri, "tmp": tmp}


def test_report_files_figures_and_tables(real: dict) -> None:
    report = real["report"]
    assert report.out_dir == real["root"] / "reports" / "small"
    names = sorted(p.name for p in report.figures)
    assert "curves.png" in names and "regions.png" in names
    assert any(n.startswith("heatmap-") for n in names)  # optimizer.name x optimizer.rho etc.
    for path in report.figures:
        assert path.exists()
        assert_drawn(path)
    html = report.html.read_text()
    markdown = report.markdown.read_text()
    # self-contained: every figure inline, nothing fetched from elsewhere
    assert html.count("data:image/png;base64,") == len(report.figures)
    assert 'src="http' not in html and "<script" not in html
    for name in names:
        assert f"]({name})" in markdown
    # the verdict table, the final/best table, every variant
    assert "Verdicts" in html and "verdict</th>" in html and "best test acc" in html
    for label in VARIANTS:
        assert label in html and label in markdown
    shown = set(report.verdicts["verdict"])
    assert shown and shown <= set(VERDICTS)
    assert set(report.verdicts["variant"]) == {
        f"{v}-mlp-n0.4" for v in ("sgd", "same[1,0,0,0]-rho0.05")
    }
    assert set(report.verdicts["reference"]) == {"sam-rho0.05-mlp-n0.4"}
    for verdict in shown:
        assert verdict in html and verdict in markdown


def test_report_numbers_match_the_data(real: dict) -> None:
    study = load_study("small", real["root"])
    assert len(study.runs) == 6 and set(study.runs["status"]) <= {"completed", "diverged"}
    final = real["report"].final_best
    row = final[
        (final["variant"] == "sgd-mlp-n0.4")
        & (final["kind"] == "final")
        & (final["metric"] == "test_acc")
    ]
    last = study.metrics[
        (study.metrics["metric"] == "test_acc") & (study.metrics["step"] == EPOCHS)
    ]
    expected = last[last["variant"] == "sgd-mlp-n0.4"]["value"]
    assert row["mean"].item() == pytest.approx(expected.mean())
    assert row["n"].item() == 2


def test_report_path_never_imports_mlflow(real: dict, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['mlflow'] = None\n"  # any `import mlflow` now fails
        "from samstudy.analysis.cli import report_main\n"
        f"rc = report_main(['small', '--root', {str(real['root'])!r}, '--out', {str(tmp_path)!r},"
        " '--stages', 'early=0:0.4,late=0.6:1'])\n"
        "assert 'mlflow' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "verdicts" in done.stdout and (tmp_path / "report.html").exists()


def test_report_cli_errors(real: dict, tmp_path: Path) -> None:
    from samstudy.analysis.cli import report_main

    assert report_main(["missing", "--root", str(real["root"])]) == 1
    with pytest.raises(SystemExit):
        report_main(["small", "--root", str(real["root"]), "--stages", "early=0.5:0.2"])


def test_offline_example_reproduces_the_curves(real: dict, tmp_path: Path) -> None:
    script = REPO / "examples" / "offline_curves.py"
    out = tmp_path / "curve.png"
    done = subprocess.run(
        [sys.executable, str(script), "small", "--root", str(real["root"]), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert_drawn(out)
    spec = importlib.util.spec_from_file_location("offline_curves", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mine = module.curve_table(real["root"], "small", "test_acc").set_index(["variant", "step"])
    theirs = curves(load_study("small", real["root"]), ["test_acc"]).set_index(["variant", "step"])
    np.testing.assert_allclose(mine["mean"], theirs.loc[mine.index, "mean"])
    np.testing.assert_allclose(mine["ci_low"], theirs.loc[mine.index, "ci_low"], rtol=1e-9)
