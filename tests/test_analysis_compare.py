"""Comparisons declared in a study file, the report's lab-notes figures and reports across
studies: the ``analysis:`` block's validation (at load, as ``plan`` sees it), how a partial
configuration picks references (defaults, settings that do not apply), the SAM/ASAM and
sharpness figures (drawn, or left out with a line), and ``report a,b`` with the study as a
column. Real expansion, real sqlite MLflow, real Parquet."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here
from pathlib import Path

import pytest
from test_analysis_report import assert_drawn

from samstudy.analysis.comparisons import (
    MISSING,
    AnalysisSpec,
    is_reference,
    parse_reference,
    reference_candidates,
    setting,
)
from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store
from samstudy.study.spec import StudyError, study_from_mapping

BASE = {
    "data": {"name": "digits"},
    "noise": {"kind": "symmetric", "rate": 0.4},
    "model": {"name": "mlp"},
    "optimizer": {"base": "sgd", "lr": 0.05, "rho": 0.1},
    "epochs": 6,
    "device": "cpu",
    "threads": 1,
}


def spec(name: str, grid: list, analysis: dict | None = None, **extra) -> object:
    data = {"name": name, "base": copy.deepcopy(BASE), "grid": grid, "seeds": [0, 1], **extra}
    if analysis is not None:
        data["analysis"] = analysis
    return study_from_mapping(data, path=f"studies/{name}.yaml")


# -- the analysis block ---------------------------------------------------------------------------

CLAMP_GRID = [{"optimizer": [{"name": "sam"}, {"name": "sam", "ascent": "clamp"}]}]


def test_declared_reference_must_match_a_trial() -> None:
    assert spec("ok", CLAMP_GRID, {"references": [{"optimizer.ascent": "sam"}]})
    with pytest.raises(StudyError) as error:
        spec("bad", CLAMP_GRID, {"references": [{"optimizer.ascent": "adaptive"}]})
    text = str(error.value)
    assert text.startswith("studies/bad.yaml: analysis.references[0]:")
    assert "optimizer.ascent=adaptive" in text and "matches no trial" in text
    assert '"clamp", "sam"' in text  # what the study has instead
    with pytest.raises(StudyError, match=r"no trial has optimizer.ascnt \(did you mean"):
        spec("typo", CLAMP_GRID, {"references": [{"optimizer.ascnt": "sam"}]})
    # the default reference is not checked: a study without SAM and without a block loads
    assert spec("nosam", [{"optimizer.name": ["sgd"]}])


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"refrences": []},
            "analysis.refrences: unknown key 'refrences' (did you mean 'references'?); allowed: metrics, min_effect, references, stages",
        ),
        ({"stages": {"early": [0.5, 0.2]}}, "analysis.stages: early: need 0 <= low < high <= 1"),
        (
            {"metrics": ["test_los", "train_acc"]},
            "unknown metric 'test_los' (did you mean 'test_loss'?)",
        ),
        ({"metrics": ["test_acc"]}, "must include train_acc"),
        ({"references": [{"optimizer": {"name": "sam"}}]}, "dotted form"),
        ({"references": []}, "at least one reference"),
        ({"min_effect": -1}, "analysis.min_effect: expected a number >= 0"),
    ],
)
def test_malformed_analysis_block_names_file_field_and_allowed(block: dict, message: str) -> None:
    with pytest.raises(StudyError) as error:
        spec("bad", CLAMP_GRID, block)
    assert str(error.value).startswith("studies/bad.yaml: analysis.")
    assert message in str(error.value)


def test_plan_refuses_an_unmatched_reference(tmp_path: Path) -> None:
    """``samstudy plan`` loads the study through the same check (exit status 2, nothing run)."""
    import subprocess
    import sys

    from samstudy import configio  # noqa: F401 - the study file is plain YAML, written here

    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "mine.yaml").write_text(
        "name: mine\nbase: {optimizer: {rho: 0.1}, epochs: 2, device: cpu}\n"
        "grid: {optimizer.name: [sgd, sam]}\nanalysis:\n  references:\n"
        "    - {optimizer.second_grad: jacobian}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "samstudy", "plan", "mine", "--studies-dir", str(studies)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        "analysis.references[0]: {optimizer.second_grad=jacobian} matches no trial" in done.stderr
    )


def test_settings_left_out_count_at_their_default() -> None:
    sam = {"optimizer.name": "sam", "optimizer.rho": 0.1}
    sgd = {"optimizer.name": "sgd", "optimizer.rho": 0.1}
    assert setting(sam, "optimizer.ascent") == "sam"
    assert setting(sam, "optimizer.m") is None  # the whole batch: a value, not missing
    assert setting(sam, "optimizer.clamp_rms") is MISSING  # applies to the clamp ascent only
    assert setting(sgd, "optimizer.ascent") is MISSING  # one pass: no ascent
    assert setting(sam, "model.name") is MISSING
    assert is_reference(sam, {"optimizer.ascent": "sam"})
    assert not is_reference(sgd, {"optimizer.ascent": "sam"})


def test_reference_agrees_on_every_setting_that_applies() -> None:
    variants = {
        "sgd": {"optimizer.name": "sgd", "optimizer.rho": 0.05, "model.name": "mlp"},
        "sam.1": {"optimizer.name": "sam", "optimizer.rho": 0.1, "model.name": "mlp"},
        "sam.2": {"optimizer.name": "sam", "optimizer.rho": 0.2, "model.name": "mlp"},
        "sam1.1": {
            "optimizer.name": "sam",
            "optimizer.rho": 0.1,
            "optimizer.m": 1,
            "model.name": "mlp",
        },
        "jsam.1": {
            "optimizer.name": "sam",
            "optimizer.rho": 0.1,
            "optimizer.second_grad": "jacobian",
            "model.name": "mlp",
        },
        "clamp.2": {
            "optimizer.name": "sam",
            "optimizer.rho": 0.2,
            "optimizer.ascent": "clamp",
            "optimizer.clamp_rms": 3.0,
            "model.name": "mlp",
        },
        "sgd.cnn": {"optimizer.name": "sgd", "optimizer.rho": 0.05, "model.name": "cnn"},
    }
    full = reference_candidates(variants, {"optimizer.second_grad": "full"})
    assert full["jsam.1"] == ["sam.1"]  # not the 1-SAM run: m differs (whole batch vs 1)
    to_sgd = reference_candidates(variants, {"optimizer.name": "sgd"})
    assert to_sgd["sam.2"] == ["sgd"] and to_sgd["jsam.1"] == ["sgd"]  # SGD ignores rho
    unclamped = reference_candidates(variants, {"optimizer.ascent": "sam"})
    assert unclamped["clamp.2"] == ["sam.2"]  # the clamp threshold does not apply to sam.2
    # rho is compared when the reference uses it: SGD's logged rho pairs it with SAM at 0.05 only
    assert reference_candidates(variants, {"optimizer.name": "sam"})["sgd"] == []


def test_reference_on_the_command_line() -> None:
    assert parse_reference("sam") == "sam"
    assert parse_reference("optimizer.ascent=sam") == {"optimizer.ascent": "sam"}
    assert parse_reference("optimizer.name=same,optimizer.scales=[1,0,0,0],optimizer.m=1") == {
        "optimizer.name": "same",
        "optimizer.scales": [1, 0, 0, 0],
        "optimizer.m": 1,
    }
    for bad in ("=sam", "optimizer.scales=[1,0", "optimizer.name=sam,oops"):
        with pytest.raises(ValueError):
            parse_reference(bad)
    assert AnalysisSpec().references == [{"optimizer.name": "sam"}]


# -- reports ----------------------------------------------------------------------------------


def curves(config: dict) -> dict[str, list[float]]:
    """Region shares that drift with the ascent (ASAM's ckpt1 grows), accuracies by variant."""
    opt, seed = config["optimizer"], config["seed"]
    asam = opt.get("ascent") == "adaptive"
    bonus = 0.05 * len(str(opt.get("scales", ""))) / 9 + (0.03 if asam else 0.0)
    out: dict[str, list[float]] = {}
    for epoch in range(1, 7):
        t = epoch / 6
        values = {
            "train_acc": 0.3 + 0.6 * t + bonus + 0.005 * seed,
            "test_acc": 0.3 + 0.3 * t + bonus + 0.004 * seed,
            "test_loss": 2.0 - t - bonus,
        }
        if opt["name"] != "sgd":
            values.update(
                region_ckpt1=(0.3 + 0.1 * t if asam else 0.3 - 0.1 * t) + 0.01 * seed,
                region_ckpt2=0.4,
                region_ckpt3=0.1 + (0.0 if asam else 0.05 * t),
                region_ckpt4=0.2 + (0.0 if asam else 0.05 * t) - 0.01 * seed,
                grad_ratio=1.0 + 0.5 * t + 0.02 * seed * t,
            )
        for key, value in values.items():
            out.setdefault(key, []).append(value)
    return out


STUDIES = {
    "alpha": [
        {"optimizer": [{"name": "sgd"}, {"name": "sam"}, {"name": "same", "scales": [1, 0, 0, 0]}]}
    ],
    "beta": [
        {
            "optimizer": [
                {"name": "same", "scales": [1, 0, 0, 0]},
                {"name": "same", "scales": [0, 1, 0, 0]},
                {"name": "sam", "ascent": "adaptive"},
            ]
        }
    ],
    "asam": [{"optimizer": [{"name": "sam"}, {"name": "sam", "ascent": "adaptive"}]}],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study

    tmp = tmp_path_factory.mktemp("compare")
    uri = sqlite_store(tmp / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    for name, grid in STUDIES.items():
        trials = [
            TrialData(
                t.name, t.config, curves(t.config), trial_id=t.trial_id, overrides=t.overrides
            )
            for t in spec(name, grid).expand()
        ]
        log_study(client, name, trials)
        export_study(name, uri, root=tmp / "results")
    return tmp / "results"


def test_sam_and_asam_regions_side_by_side(exported: Path, tmp_path: Path) -> None:
    from samstudy.analysis.figures import ascent_groups
    from samstudy.analysis.load import load_study
    from samstudy.analysis.report import build_report

    groups = ascent_groups(load_study("asam", exported))
    assert groups == {
        "SAM ascent": ["sam-rho0.1-mlp-n0.4"],
        "ASAM ascent": ["sam+adaptive-rho0.1-mlp-n0.4"],
    }
    report = build_report("asam", root=exported, out_dir=tmp_path / "asam", studies_dir=tmp_path)
    names = {p.name for p in report.figures}
    assert {"regions-asam.png", "grad-ratio.png", "curves.png"} <= names
    for path in report.figures:
        assert_drawn(path)
    markdown = report.markdown.read_text()
    # no sharpness and a single rho here: each left out with one line, never drawn empty
    assert "Sharpness: not drawn, no run logged it" in markdown
    assert "Region shares against rho: not drawn, no variant was run at two values" in markdown
    assert "sharpness.png" not in names and "regions-rho.png" not in names
    # both variants are SAM by name: the default reference leaves no verdict, and says so
    assert report.verdicts.empty and "No verdicts" in markdown

    alpha = build_report("alpha", root=exported, out_dir=tmp_path / "alpha", studies_dir=tmp_path)
    assert "regions-asam.png" not in {p.name for p in alpha.figures}
    markdown = alpha.markdown.read_text()
    assert "SAM against ASAM regions: not drawn" in markdown
    # test loss beside test accuracy, in the curves and in the verdict inputs
    assert "Δ test_loss" in markdown and "final test loss" in markdown
    assert alpha.verdicts["d_test_loss"].notna().all() and len(alpha.verdicts) == 4


def test_report_across_studies_with_the_study_as_a_column(exported: Path, tmp_path: Path) -> None:
    from samstudy.analysis.cli import report_main
    from samstudy.analysis.report import build_report

    report = build_report(["alpha", "beta"], root=exported, out_dir=tmp_path, studies_dir=tmp_path)
    table = report.verdicts
    assert {"study", "ref_study"} <= set(table.columns)
    refs = dict(zip(table["variant"], table["reference"], strict=False))
    # beta has no plain SAM: its variants are compared with alpha's, which shares their settings
    assert refs["beta/same[0,1,0,0]-rho0.1-mlp-n0.4"] == "alpha/sam-rho0.1-mlp-n0.4"
    assert refs["alpha/same[1,0,0,0]-rho0.1-mlp-n0.4"] == "alpha/sam-rho0.1-mlp-n0.4"
    beta_rows = table[table["study"] == "beta"]
    assert set(beta_rows["ref_study"]) == {"alpha"}
    markdown = report.markdown.read_text()
    assert "Variants shared by the studies" in markdown
    shared = [line for line in markdown.splitlines() if "| same[1,0,0,0]-rho0.1-mlp-n0.4 |" in line]
    assert (
        len(shared) == 2
        and "| alpha |" in shared[0] + shared[1]
        and "| beta |" in shared[0] + shared[1]
    )
    # `make report NAME=alpha,beta`
    assert report_main(["alpha,beta", "--root", str(exported), "--studies-dir", str(tmp_path)]) == 0
    assert (exported / "reports" / "alpha+beta" / "report.html").exists()


def test_duckdb_example_answers_god_sign_2(exported: Path) -> None:
    """examples/duckdb_grad_ratio.py (SQL over the Parquet files) agrees with the analysis API:
    the late-minus-early ||g_p|| / ||g|| per variant, paired over seeds, with its interval."""
    import importlib.util
    import subprocess
    import sys

    import numpy as np

    from samstudy.analysis import load_study, seed_aggregate, stage_values

    script = Path(__file__).resolve().parents[1] / "examples" / "duckdb_grad_ratio.py"
    done = subprocess.run(
        [sys.executable, str(script), "alpha", "--root", str(exported)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "later is larger" in done.stdout and "same[1,0,0,0]-rho0.1-mlp-n0.4" in done.stdout
    module_spec = importlib.util.spec_from_file_location("duckdb_grad_ratio", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    mine = module.grad_ratio_table(exported, "alpha").set_index("variant")

    per_run = stage_values(load_study("alpha", exported), metrics=["grad_ratio"])
    wide = per_run.pivot_table(index=["variant", "seed"], columns="stage", values="value")
    wide["value"] = wide["late"] - wide["early"]
    theirs = seed_aggregate(wide.reset_index(), ["variant"]).set_index("variant")
    assert (
        sorted(mine.index)
        == sorted(theirs.index)
        == [
            "sam-rho0.1-mlp-n0.4",
            "same[1,0,0,0]-rho0.1-mlp-n0.4",
        ]
    )  # SGD logs no grad_ratio
    np.testing.assert_allclose(mine["diff"], theirs.loc[mine.index, "mean"])
    np.testing.assert_allclose(mine["ci_low"], theirs.loc[mine.index, "ci_low"], rtol=1e-9)
    np.testing.assert_allclose(mine["ci_high"], theirs.loc[mine.index, "ci_high"], rtol=1e-9)
    assert (mine["n"] == 2).all() and (mine["late"] > mine["early"]).all()
