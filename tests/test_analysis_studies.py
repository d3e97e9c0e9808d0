"""Every shipped study gets a verdict table: its real trials (``studies/NAME.yaml`` expanded,
with ``--set epochs=6``) logged with synthetic metrics to a real sqlite MLflow store, exported to
real Parquet, read back and reported with the study file's own ``analysis:`` block.

The synthetic curves depend on the variant (so differences have a direction), on the seed
(a small jitter: paired intervals), on rho (region shares move with it) and on the stage
(||g_p|| / ||g|| grows late); sharpness is logged every other epoch where the study measures it.
"""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network here
from pathlib import Path

import pytest

from samstudy.analysis import VERDICTS
from samstudy.analysis.synthetic import TrialData, log_study, sqlite_store
from samstudy.study.spec import load_study as load_spec

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
SHIPPED = sorted(p.stem for p in STUDIES.glob("*.yaml"))
EPOCHS = 6
# Variants compared with a reference (pairs variant -> reference), as the study files declare:
# quickstart and same_checkpoints and custom_same and magnitude_direction: every variant but
# SAM against SAM at its rho (SGD at the base rho); clamp_sam: each clamped run against
# unclamped SAM at its rho; label_noise_theory: J-SAM and logit-SAM, batch-wide and per example,
# against full SAM with the same m (72), every SAM-family variant against SGD (108);
# rho_direction: sam_where_agree against SAM (14), SGD against SAM at rho 0.05 (2), every
# two-step variant against SGD (28); asam_regions: ASAM against SAM at its rho (3), SAM and ASAM
# against SGD (6); data_size: SGD against SAM at each training fraction and noise rate (8);
# optuna_same: each of the five sampled trials against the SAM point the search runs first.
EXPECTED_PAIRS = {
    "quickstart": 13,
    "asam_regions": 9,
    "clamp_sam": 15,
    "custom_same": 20,
    "data_size": 8,
    "label_noise_theory": 180,
    "magnitude_direction": 20,
    "rho_direction": 44,
    "same_checkpoints": 24,
    "optuna_same": 5,
}


def _unit(text: str) -> float:
    """A deterministic number in [0, 1) from a text."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def curves(config: dict, variant_id: str) -> dict[str, list[float]]:
    """Synthetic per-epoch metrics of one trial (see the module docstring)."""
    seed = int(config.get("seed", 0))
    effect = 0.2 * (_unit(variant_id) - 0.5)  # per variant, -0.1 .. 0.1
    jitter = 0.004 * (seed - 1)
    rho = float(config["optimizer"].get("rho", 0.0))
    out: dict[str, list[float]] = {}
    for epoch in range(1, EPOCHS + 1):
        t = epoch / EPOCHS
        values = {
            "train_acc": 0.3 + 0.6 * t + effect + jitter,
            "test_acc": 0.3 + 0.4 * t - effect * (1 if epoch <= 2 else -1) + jitter,
            "test_loss": 2.0 - t + effect + jitter,
            "train_acc_clean": 0.35 + 0.6 * t + effect / 2 + jitter,
            "train_acc_noisy": 0.05 + 0.4 * t + effect + jitter,
            "memorization": 0.05 + 0.4 * t + effect + jitter,
        }
        if config["optimizer"]["name"] != "sgd":
            negative = min(0.4, 0.1 + 0.3 * rho + 0.05 * t)  # more ratio < 0 at larger rho
            values.update(
                region_ckpt1=0.5 - negative - 0.1 * t + jitter,
                region_ckpt2=0.5 - 0.1 * t,
                region_ckpt3=negative / 2 + 0.1 * t,
                region_ckpt4=negative / 2 + 0.1 * t - jitter,
                grad_ratio=1.0 + rho + 0.5 * t + jitter,  # larger later (God sign 2)
            )
        if config["model"]["name"] == "linear2":  # Proposition 4.1: J-SAM shrinks both
            shrink = 0.5 if config["optimizer"].get("second_grad") == "jacobian" else 1.0
            values.update(
                activation_norm=(2.0 + t) * shrink + jitter,
                last_layer_norm=(1.0 + t) * shrink + jitter,
            )
        if config.get("sharpness", {}).get("every", 0) and epoch % 2 == 0:
            values.update(sharpness_lambda_max=50 - 20 * t + 10 * effect + jitter)
        for key, value in values.items():
            out.setdefault(key, []).append(value)
    return out


def trials_of(name: str) -> list[TrialData]:
    """The study's trials with synthetic metrics; a search gets its points_to_evaluate, then
    sampled points, six in all."""
    spec = load_spec(name, STUDIES)
    if spec.search is None:
        trials = load_spec(name, STUDIES, overrides=[f"epochs={EPOCHS}"]).expand()
    else:  # --set epochs would undercut the search's ASHA horizon: set it per sampled trial
        trials = [
            spec.trial_from_overrides({"epochs": EPOCHS, **p})
            for p in spec.search.points_to_evaluate
        ]
        for i in range(6 - len(trials)):
            point: dict = {"epochs": EPOCHS}
            for path, dist in spec.search.params.items():
                low, high = dist.corners()[0], dist.corners()[-1]
                point[path] = low + (high - low) * _unit(f"{path}{i}")  # uniform, not TPE
            trials.append(spec.trial_from_overrides(point))
    return [
        TrialData(
            t.name,
            t.config,
            curves(t.config, t.variant_id),
            trial_id=t.trial_id,
            overrides=t.overrides,
            variant=t.variant,
            variant_id=t.variant_id,
        )
        for t in trials
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every shipped study logged to one real sqlite store and exported to real Parquet."""
    from mlflow import MlflowClient

    from samstudy.analysis.export import export_study

    tmp = tmp_path_factory.mktemp("shipped")
    uri = sqlite_store(tmp / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    root = tmp / "results"
    for name in SHIPPED:
        log_study(client, name, trials_of(name))
        export_study(name, uri, root=root)
    return {"root": root, "tmp": tmp}


def test_every_shipped_study_is_covered() -> None:
    assert set(SHIPPED) == set(EXPECTED_PAIRS)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_study_gets_a_verdict_table(exported: dict, name: str) -> None:
    from samstudy.analysis import load_study
    from samstudy.analysis.report import build_report

    out = exported["tmp"] / "reports" / name
    # what `make report NAME=...` builds: the study file's analysis block, read here
    report = build_report(name, root=exported["root"], out_dir=out, studies_dir=STUDIES)
    markdown = (out / "report.md").read_text()
    study = load_study(name, exported["root"])
    table = report.verdicts
    pairs = set(zip(table["variant"], table["reference"], strict=True))
    assert len(pairs) == EXPECTED_PAIRS[name], sorted(pairs)
    assert set(table["verdict"]) <= set(VERDICTS)
    assert not report.hypothesis.empty and "Stage differences behind the verdicts" in markdown
    assert set(table["stage"]) == {"early", "late"}
    # test loss is among the verdict inputs, beside the rule's train and test accuracy
    assert table["d_test_loss"].notna().all()
    # a variant and its reference share the settings the reference does not name
    params = study.variants.set_index("variant")
    for variant, reference in pairs:
        for key in ("params.model.name", "params.noise.rate", "params.data.name"):
            assert params.at[variant, key] == params.at[reference, key], (variant, reference)


def test_clamp_sam_compares_each_clamp_with_unclamped_sam_at_its_rho(exported: dict) -> None:
    from samstudy.analysis import load_study, reference_pairs, study_analysis

    study = load_study("clamp_sam", exported["root"])
    analysis = study_analysis("clamp_sam", STUDIES)
    assert analysis.references == [{"optimizer.ascent": "sam"}]
    params = study.variants.set_index("variant")
    pairs = reference_pairs(study.variants, analysis.references)
    for variant, reference in pairs:
        assert params.at[variant, "params.optimizer.ascent"] == "clamp"
        assert params.at[reference, "params.optimizer.name"] == "sam"
        assert pd_isna(params.at[reference, "params.optimizer.ascent"])  # the default: sam
        rho = "params.optimizer.rho"
        assert params.at[variant, rho] == params.at[reference, rho]


def test_label_noise_theory_compares_with_full_sam_and_with_sgd(exported: dict) -> None:
    from samstudy.analysis import load_study, reference_pairs, study_analysis

    study = load_study("label_noise_theory", exported["root"])
    params = study.variants.set_index("variant")
    references = study_analysis("label_noise_theory", STUDIES).references
    pairs = reference_pairs(study.variants, references)
    by_variant: dict[str, set[str]] = {}
    for variant, reference in pairs:
        by_variant.setdefault(variant, set()).add(params.at[reference, "params.optimizer.name"])
    jsam = [v for v in params.index if params.at[v, "params.optimizer.second_grad"] == "jacobian"]
    assert len(jsam) == 36  # 2 models x 3 noise rates x 3 rhos x (batch-wide, per example)
    for variant in jsam:  # against full SAM (same rho, m, model, noise) and against SGD
        refs = [r for v, r in pairs if v == variant]
        assert sorted(params.loc[refs, "params.optimizer.name"]) == ["sam", "sgd"]
        full = [r for r in refs if params.at[r, "params.optimizer.name"] == "sam"][0]
        assert params.at[full, "params.optimizer.rho"] == params.at[variant, "params.optimizer.rho"]
        m = params.at[variant, "params.optimizer.m"]
        if pd_isna(m):  # batch-wide J-SAM: against batch-wide SAM, not the 1-SAM run
            assert pd_isna(params.at[full, "params.optimizer.m"])
        else:  # per-example J-SAM: against 1-SAM
            assert params.at[full, "params.optimizer.m"] == m == 1
    assert {0.01, 0.05, 0.2} == set(params.loc[jsam, "params.optimizer.rho"])


def test_label_noise_theory_report_draws_the_proposition_4_1_norms(exported: dict) -> None:
    from samstudy.analysis import load_study
    from samstudy.analysis.figures import norms_section

    study = load_study("label_noise_theory", exported["root"])
    section = norms_section(study)
    assert section.figure is not None and section.name == "norms.png"
    rows = [ax.get_title().split(":")[0] for ax in section.figure.axes if ax.get_visible()]
    assert {"sgd", "sam", "sam+jacobian", "sam+jacobian+m1", "sam+logit+m1"} <= set(rows)
    out = exported["tmp"] / "reports" / "label_noise_theory"
    assert "norms.png" in (out / "report.md").read_text() or (out / "norms.png").exists()
    # a study without the metrics says so in one line and draws nothing
    quick = norms_section(load_study("quickstart", exported["root"]))
    assert quick.figure is None and quick.text.startswith("Proposition 4.1 norms: not drawn")


def test_asam_regions_pairs_asam_with_sam_at_its_rho(exported: dict) -> None:
    from samstudy.analysis import load_study, reference_pairs, study_analysis
    from samstudy.analysis.figures import ascent_section
    from samstudy.analysis.plots import REGION_METRICS

    study = load_study("asam_regions", exported["root"])
    params = study.variants.set_index("variant")
    pairs = reference_pairs(study.variants, study_analysis("asam_regions", STUDIES).references)
    asam = [(v, r) for v, r in pairs if params.at[v, "params.optimizer.ascent"] == "adaptive"]
    assert len(asam) == 6  # 3 rhos, each against SAM's ascent and against SGD
    for variant, reference in asam:
        if params.at[reference, "params.optimizer.name"] == "sam":
            assert pd_isna(params.at[reference, "params.optimizer.ascent"])
            rho = "params.optimizer.rho"
            assert params.at[variant, rho] == params.at[reference, rho]
    from samstudy.analysis import curves

    section = ascent_section(study, curves(study, REGION_METRICS))
    assert section.figure is not None and section.name == "regions-asam.png"


def test_data_size_pairs_sgd_with_sam_at_each_fraction(exported: dict) -> None:
    from samstudy.analysis import load_study, reference_pairs, study_analysis

    study = load_study("data_size", exported["root"])
    params = study.variants.set_index("variant")
    # the 100% trials log no train_fraction (the default stays out of the config): read as 1.0
    assert set(params["params.data.train_fraction"]) == {0.1, 0.25, 0.5, 1.0}
    from samstudy.analysis.comparisons import DEFAULT_REFERENCES

    assert study_analysis("data_size", STUDIES) is None  # no block: the default reference, sam
    pairs = reference_pairs(study.variants, DEFAULT_REFERENCES)
    seen = set()
    for variant, reference in pairs:
        assert params.at[variant, "params.optimizer.name"] == "sgd"
        assert params.at[reference, "params.optimizer.name"] == "sam"
        for key in ("params.data.train_fraction", "params.noise.rate"):
            assert params.at[variant, key] == params.at[reference, key]
        seen.add(tuple(params.loc[variant, ["params.data.train_fraction", "params.noise.rate"]]))
    assert len(seen) == 8


def pd_isna(value: object) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def test_make_report_command(exported: dict, tmp_path: Path) -> None:
    """``samstudy report NAME`` (``make report``) reads ./studies/NAME.yaml's analysis block."""
    from samstudy.analysis.cli import report_main

    args = ["--root", str(exported["root"]), "--out", str(tmp_path)]
    assert report_main(["clamp_sam", *args]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "`optimizer.ascent=sam`" in text
    assert "| sam+clamp-rho2-resnet18-n0.4-clamp_rms3 | early | sam-rho2-resnet18-n0.4 |" in text


def test_report_reference_on_the_command_line(exported: dict, tmp_path: Path) -> None:
    """``--reference optimizer.name=sgd`` replaces the file's references: the clamped and
    unclamped SAM runs of clamp_sam at every rho against SGD (SGD ignores rho)."""
    from samstudy.analysis.cli import report_main

    root = str(exported["root"])
    args = ["clamp_sam", "--root", root, "--out", str(tmp_path)]
    assert report_main([*args, "--reference", "optimizer.name=sgd"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "`optimizer.name=sgd`" in text
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| sam") and "| sgd-resnet18-n0.4 |" in line
    ]
    assert len(rows) == 20 * 2  # 20 SAM-family variants x 2 stages, in the differences table
    with pytest.raises(SystemExit):  # malformed: named on the command line, nothing built
        report_main([*args, "--reference", "optimizer.scales=[1,0"])
