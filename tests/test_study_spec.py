"""Study files: schema, grid expansion, trial ids and names, plan, shipped studies, bad files."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from samstudy.study import (
    StudyError,
    estimate_cost,
    flatten_config,
    format_plan,
    load_study,
    run_name,
    study_from_mapping,
)
from samstudy.study.plan import trial_seconds

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SHIPPED = sorted(p.stem for p in STUDIES.glob("*.yaml"))
# The lab notes' experiments at full scale (label_noise_theory runs on CPUs: 0 GPU-hours).
FULL_SCALE = {
    "same_checkpoints",
    "custom_same",
    "magnitude_direction",
    "clamp_sam",
    "rho_direction",
    "label_noise_theory",
    "optuna_same",
    "asam_regions",
}


def write_study(tmp_path: Path, text: str, name: str = "s") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BASE = """\
name: s
base:
  noise: {kind: symmetric, rate: 0.4}
  model: {name: mlp}
  epochs: 3
  optimizer: {base: sgd, lr: 0.05}
"""


# -- the shipped studies ---------------------------------------------------------------------


def test_every_required_study_is_shipped() -> None:
    assert {"quickstart", *FULL_SCALE} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_study_loads_expands_and_states_its_size(name: str) -> None:
    spec = load_study(name, studies_dir=STUDIES)
    trials = spec.expand()
    assert trials, name
    assert len({t.trial_id for t in trials}) == len(trials)
    assert len({t.name for t in trials}) == len(trials)
    assert spec.sha256 == hashlib.sha256((STUDIES / f"{name}.yaml").read_bytes()).hexdigest()
    plan = format_plan(spec)
    count = spec.search.num_samples if spec.search else len(trials)
    assert f"{count} trials" in plan
    if name in FULL_SCALE:
        # The description promises a trial count and GPU-hours: they must match the plan.
        stated = re.search(r"(\d+) trials", spec.description)
        assert stated and int(stated.group(1)) == count, spec.description
        hours = re.search(r"~?([\d.]+) GPU-hours", spec.description)
        assert hours, spec.description
        cost = estimate_cost(spec)
        if cost.device == "gpu":
            assert 0.75 * cost.trial_hours <= float(hours.group(1)) <= 1.34 * cost.trial_hours


def test_open_question_studies_run_three_seeds_and_state_their_price() -> None:
    for name in ("asam_regions", "data_size", "label_noise_theory"):  # verdicts need seeds
        assert len(load_study(name, studies_dir=STUDIES).seed_list) >= 3, name
    asam = load_study("asam_regions", studies_dir=STUDIES).expand()
    ascents = {c.config["optimizer"].get("ascent", "sam") for c in asam}
    assert ascents == {"sam", "adaptive"}
    spec = load_study("data_size", studies_dir=STUDIES)
    trials = spec.expand()
    assert f"{len(trials)} trials" in spec.description and len(trials) == 48
    fractions = {t.config["data"].get("train_fraction", 1.0) for t in trials}
    assert fractions == {0.1, 0.25, 0.5, 1.0}
    # the plan prices each trial at its share of the training set, as the description states
    stated = float(re.search(r"~([\d.]+) GPU-hours", spec.description).group(1))
    cost = estimate_cost(spec)
    assert 0.75 * cost.trial_hours <= stated <= 1.34 * cost.trial_hours


def test_quickstart_is_the_promised_small_study() -> None:
    spec = load_study("quickstart", studies_dir=STUDIES)
    trials = spec.expand()
    configs = [t.config for t in trials]
    assert all(c["data"]["name"] == "digits" for c in configs)
    assert all((c["noise"]["kind"], c["noise"]["rate"]) == ("symmetric", 0.4) for c in configs)
    assert all(c["model"]["name"] == "mlp" and c["threads"] == 1 for c in configs)
    assert spec.seed_list == [0, 1] and spec.resources.cpus == 1 and spec.resources.gpus == 0
    names = {c["optimizer"]["name"] for c in configs}
    assert {"sgd", "sam", "same", "custom_same", "saner"} <= names
    # sgd once per seed; the SAM family over the rho grid
    assert sum(c["optimizer"]["name"] == "sgd" for c in configs) == 2
    same_scales = {
        tuple(c["optimizer"]["scales"]) for c in configs if c["optimizer"]["name"] == "same"
    }
    assert same_scales == {(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)}
    rhos = {c["optimizer"]["rho"] for c in configs if c["optimizer"]["name"] != "sgd"}
    assert rhos == {0.1, 0.2}
    assert {c["optimizer"]["alpha"] for c in configs if c["optimizer"]["name"] == "saner"} == {0.5}
    # <= 10 minutes on 2 cores, estimated at 2 trials at once with a margin for Ray's start-up
    per_trial = [trial_seconds(c, "cpu") for c in configs]
    assert sum(per_trial) / 2 + 30 <= 600


# -- grid expansion --------------------------------------------------------------------------


def test_union_of_blocks_with_mapping_values_and_seed_crossing(tmp_path: Path) -> None:
    spec = load_study(
        write_study(
            tmp_path,
            BASE
            + """\
grid:
  - optimizer: [{name: sgd}]
  - optimizer: [{name: sam}, {name: same, scales: [2, 0, 0, 0]}]
    optimizer.rho: [0.05, 0.1]
seeds: [0, 1]
""",
        )
    )
    trials = spec.expand()
    assert len(trials) == (1 + 2 * 2) * 2
    # seeds vary slowest: a half-finished study already covers every configuration once
    assert [t.config["seed"] for t in trials] == [0] * 5 + [1] * 5
    sgd = trials[0]
    assert sgd.overrides == {"optimizer.name": "sgd", "seed": 0}
    assert sgd.config["optimizer"]["lr"] == 0.05  # merged into base, not replacing it
    same = trials[4]
    assert same.config["optimizer"]["scales"] == [2, 0, 0, 0]
    assert same.name == "same[2,0,0,0]-rho0.1-mlp-n0.4-s0"
    assert same.overrides == {
        "optimizer.name": "same",
        "optimizer.scales": [2, 0, 0, 0],
        "optimizer.rho": 0.1,
        "seed": 0,
    }


def test_zip_repeats_and_list_index_paths(tmp_path: Path) -> None:
    spec = load_study(
        write_study(
            tmp_path,
            BASE.replace(
                "optimizer: {base: sgd, lr: 0.05}", "optimizer: {name: same, scales: [0, 0, 0, 0]}"
            )
            + """\
grid:
  optimizer.scales[1]: [0.5, 1]
  zip:
    - {optimizer.rho: [0.05, 0.2], optimizer.lr: [0.1, 0.01]}
repeats: 2
""",
        )
    )
    trials = spec.expand()
    assert len(trials) == 2 * 2 * 2
    pairs = {(t.config["optimizer"]["rho"], t.config["optimizer"]["lr"]) for t in trials}
    assert pairs == {(0.05, 0.1), (0.2, 0.01)}
    assert {tuple(t.config["optimizer"]["scales"]) for t in trials} == {
        (0, 0.5, 0, 0),
        (0, 1, 0, 0),
    }
    assert {t.config["seed"] for t in trials} == {0, 1}
    # lr is not part of the fixed name, so it is appended to keep names distinct
    assert "lr0.1" in trials[0].name and trials[0].name.endswith("-s0")


def test_study_without_grid_is_one_trial_per_seed(tmp_path: Path) -> None:
    spec = load_study(write_study(tmp_path, BASE + "seeds: [3, 5]\n"))
    assert [t.config["seed"] for t in spec.expand()] == [3, 5]
    single = load_study(write_study(tmp_path, BASE, name="s"))
    assert len(single.expand()) == 1 and single.expand()[0].overrides == {}


def test_trial_ids_are_stable_and_content_addressed(tmp_path: Path) -> None:
    text = BASE + "grid:\n  optimizer.rho: [0.05, 0.1]\n"
    first = load_study(write_study(tmp_path, text)).expand()
    again = load_study(write_study(tmp_path, text)).expand()
    assert [t.trial_id for t in first] == [t.trial_id for t in again]
    assert all(re.fullmatch(r"[0-9a-f]{12}", t.trial_id) for t in first)
    # the same trial written differently (1 vs 1.0, key order) keeps its id
    one = load_study(write_study(tmp_path, BASE + "grid:\n  optimizer.rho: [1]\n")).expand()
    one_f = load_study(write_study(tmp_path, BASE + "grid:\n  optimizer.rho: [1.0]\n")).expand()
    assert one[0].trial_id == one_f[0].trial_id
    # ... and a different config gets a different id
    assert one[0].trial_id not in {t.trial_id for t in first}


def test_trial_from_overrides_matches_expansion_and_accepts_numpy(tmp_path: Path) -> None:
    spec = load_study(write_study(tmp_path, BASE + "grid:\n  optimizer.rho: [0.05, 0.1]\n"))
    expanded = spec.expand()[1]
    again = spec.trial_from_overrides({"optimizer.rho": np.float64(0.1)})
    assert (again.trial_id, again.name, again.config) == (
        expanded.trial_id,
        expanded.name,
        expanded.config,
    )
    assert type(again.config["optimizer"]["rho"]) is float
    assert again.to_dict() == expanded.to_dict()
    assert type(expanded).from_dict(expanded.to_dict()) == expanded


def test_run_name_and_flatten_config() -> None:
    config = {
        "optimizer": {"name": "same", "scales": [2.0, 0, 0, 0], "rho": 0.1, "base": "sgd"},
        "model": {"name": "resnet18", "kwargs": {}},
        "noise": {"kind": "symmetric", "rate": 0.4},
        "seed": 1,
    }
    assert run_name(config) == "same[2,0,0,0]-rho0.1-resnet18-n0.4-s1"
    sgd = {**config, "optimizer": {"name": "sgd", "rho": 0.05}, "noise": {"kind": "none"}}
    assert run_name(sgd, {"optimizer.lr": 0.2}) == "sgd-resnet18-lr0.2-s1"
    jsam = {**config, "optimizer": {"name": "sam", "rho": 0.1, "second_grad": "jacobian", "m": 1}}
    assert run_name(jsam) == "sam+jacobian+m1-rho0.1-resnet18-n0.4-s1"
    flat = flatten_config(config)
    assert flat["optimizer.scales"] == "[2.0, 0, 0, 0]"
    assert json.loads(flat["optimizer.scales"]) == [2.0, 0, 0, 0]
    assert flat["model.kwargs"] == "{}" and flat["noise.rate"] == 0.4 and flat["seed"] == 1
    assert "optimizer" not in flat


def test_format_plan_lists_trials_count_and_cost(tmp_path: Path) -> None:
    spec = load_study(
        write_study(tmp_path, BASE + "grid:\n  optimizer.rho: [0.05, 0.1]\nseeds: [0, 1]\n")
    )
    plan = format_plan(spec)
    for trial in spec.expand():
        assert trial.trial_id in plan and trial.name in plan
    assert "4 trials (2 configurations x 2 seeds)" in plan
    assert "optimizer.rho" in plan and "CPU-minutes" in plan


def test_gpu_plan_and_search_plan(tmp_path: Path) -> None:
    gpu = study_from_mapping(
        {
            "name": "g",
            "base": {"data": {"name": "cifar10"}, "model": {"name": "resnet18"}, "epochs": 200},
            "resources": {"cpus": 4, "gpus": 0.5},
        }
    )
    cost = estimate_cost(gpu)
    assert cost.device == "gpu" and 0.2 < cost.trial_hours < 2.0  # one ResNet-18 SAM run
    assert "GPU-hours" in format_plan(gpu)
    search = load_study(
        write_study(
            tmp_path,
            BASE
            + """\
search:
  algorithm: random
  metric: best_test_acc
  num_samples: 7
  params:
    optimizer.rho: {type: float, low: 0.01, high: 0.5, log: true}
    optimizer.name: {type: categorical, values: [sam, sgd]}
  asha: {grace_period: 1}
""",
        )
    )
    plan = format_plan(search)
    assert "7 trials" in plan and "log scale" in plan and "ASHA" in plan
    assert estimate_cost(search).trials == 7


def test_resources_tracking_and_defaults(tmp_path: Path) -> None:
    spec = load_study(
        write_study(
            tmp_path,
            BASE
            + """\
resources: {cpus: 0.5, gpus: 0.25}
max_concurrent: 3
tracking: {tracking_uri: "sqlite:///x.db"}
storage_path: /tmp/ray-results
""",
        )
    )
    assert (spec.resources.cpus, spec.resources.gpus, spec.max_concurrent) == (0.5, 0.25, 3)
    assert spec.experiment == "s" and spec.tracking.tracking_uri == "sqlite:///x.db"
    assert spec.base.epochs == 3 and spec.base_raw["epochs"] == 3


# -- malformed study files -------------------------------------------------------------------

# (kind, file text, substrings the message must contain: the field path and what is allowed)
BAD = [
    ("empty file", "", ["is empty"]),
    ("comment-only file", "# nothing\n", ["is empty"]),
    ("yaml syntax", "name: s\nbase:\n  epochs: [3\n", ["YAML syntax error at line", "line"]),
    (
        "duplicate yaml key",
        "name: s\nname: s\n",
        ["duplicate key 'name' at line 2, column 1", "first on line 1"],
    ),
    ("top level not a mapping", "- a\n- b\n", ["top level must be a mapping"]),
    ("unknown top key", BASE + "grdi: {}\n", ["grdi", "did you mean 'grid'", "allowed:"]),
    (
        "unknown nested key",
        BASE.replace("rate: 0.4", "rat: 0.4"),
        ["base.noise.rat", "did you mean 'rate'", "label_file"],
    ),
    (
        "wrong type",
        BASE.replace("epochs: 3", "epochs: ten"),
        ["base.epochs", "expected an integer", "'ten'"],
    ),
    (
        "negative rho",
        BASE.replace("lr: 0.05", "lr: 0.05, rho: -0.1"),
        ["base.optimizer.rho:", ">= 0"],
    ),
    (
        "noise rate 1",
        BASE.replace("rate: 0.4", "rate: 1.0"),
        ["base.noise.rate", "expected a number < 1, got 1.0"],
    ),
    (
        "noise rate negative in grid",
        BASE + "grid: {noise.rate: [0.2, -0.1]}\n",
        ["grid (noise.rate=-0.1)", "noise.rate", ">= 0, got -0.1"],
    ),
    (
        "wrong-length scales",
        BASE + "grid:\n  optimizer: [{name: same, scales: [1, 0, 0]}]\n",
        ["grid (optimizer=", "optimizer.scales:", "4 numbers"],
    ),
    (
        "custom_same sign pattern",
        BASE + "grid:\n  optimizer: [{name: custom_same, scales: [1, 0, 0.5, 1]}]\n",
        ["optimizer.scales:", "custom_same", "-1 <= s3 < 0"],
    ),
    (
        "unknown optimizer preset",
        BASE + "grid:\n  optimizer.name: [sam, smae]\n",
        ['grid (optimizer.name="smae")', "optimizer.name:", "allowed:", "custom_same"],
    ),
    (
        "unequal zip",
        BASE + "grid:\n  zip:\n    - {optimizer.rho: [0.1, 0.2], optimizer.lr: [0.1]}\n",
        ["grid.zip[0]", "equal lengths", "optimizer.rho: 2", "optimizer.lr: 1"],
    ),
    (
        "unknown dotted path",
        BASE + "grid:\n  noise.rat: [0.1]\n",
        ["grid.noise.rat", "did you mean 'rate'"],
    ),
    (
        "path through a value",
        BASE + "grid:\n  epochs.max: [1]\n",
        ["grid.epochs.max", "epochs is a value"],
    ),
    (
        "empty grid list",
        BASE + "grid:\n  optimizer.rho: []\n",
        ["grid.optimizer.rho", "empty list"],
    ),
    ("scalar grid value", BASE + "grid:\n  optimizer.rho: 0.1\n", ["must be a list", "[0.1]"]),
    ("empty grid", BASE + "grid: []\n", ["grid", "empty"]),
    (
        "duplicate trials",
        BASE + "grid:\n  - {optimizer.rho: [0.1]}\n  - {optimizer.rho: [0.2, 0.1]}\n",
        ["grid[1] (optimizer.rho=0.1)", "duplicate trial", "grid[0]"],
    ),
    (
        "same path twice in a block",
        BASE + "grid:\n  optimizer.rho: [0.1]\n  zip:\n    - {optimizer.rho: [0.2]}\n",
        ["already varied"],
    ),
    ("seed in grid and seeds", BASE + "grid: {seed: [1]}\nseeds: [0]\n", ["grid.seed", "seeds"]),
    ("seeds and repeats", BASE + "seeds: [0]\nrepeats: 2\n", ["seeds, repeats:", "either seeds"]),
    ("repeated seeds", BASE + "seeds: [0, 0]\n", ["seeds", "[0]"]),
    (
        "search param on an unknown path",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    noise.rat: {type: float, low: 0, high: 0.5}\n",
        ["search.params.noise.rat", "did you mean 'rate'"],
    ),
    (
        "search range out of bounds",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    noise.rate: {type: float, low: 0.1, high: 1.5}\n",
        ["search.params.noise.rate.high (1.5)", "< 1, got 1.5"],
    ),
    (
        "search log range from zero",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    optimizer.rho: {type: float, low: 0, high: 1, log: true}\n",
        ["search.params.optimizer.rho", "log scale needs low > 0"],
    ),
    (
        "search unknown metric",
        BASE
        + "search:\n  num_samples: 2\n  metric: test_accuracy\n  params:\n    optimizer.rho: {type: float, low: 0.01, high: 1}\n",
        ["search.metric", "test_accuracy", "allowed:", "test_acc"],
    ),
    (
        "search with grid",
        BASE
        + "grid: {optimizer.rho: [0.1]}\nsearch:\n  num_samples: 2\n  params:\n    optimizer.rho: {type: float, low: 0.01, high: 1}\n",
        ["grid, search:", "not both"],
    ),
    (
        "search on an unknown optimizer knob",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    optimizer.rhoo: {type: float, low: 0.1, high: 1}\n",
        ["search.params.optimizer.rhoo:", "unknown key 'rhoo'", "did you mean 'rho'"],
    ),
    (
        "search categorical value invalid",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    model.name: {type: categorical, values: [mlp, resnet19]}\n",
        ['search.params.model.name.values ("resnet19")', "unknown model"],
    ),
    (
        "search asha beyond epochs",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    optimizer.rho: {type: float, low: 0.01, high: 1}\n  asha: {max_t: 50}\n",
        ["search.asha.max_t: 50 exceeds base.epochs (3)"],
    ),
    (
        "search point missing a param",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    optimizer.rho: {type: float, low: 0.01, high: 1}\n"
        + "    batch_size: {type: categorical, values: [32, 64]}\n"
        + "  points_to_evaluate:\n    - {optimizer.rho: 0.1, batch_sise: 32}\n",
        ["search.points_to_evaluate", "[0]", "missing: batch_size", "not a param: batch_sise"],
    ),
    (
        "search point outside its range",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    optimizer.rho: {type: float, low: 0.01, high: 1}\n"
        + "  points_to_evaluate:\n    - {optimizer.rho: 2}\n",
        ["search.points_to_evaluate:", "[0].optimizer.rho: 2 is outside", "float in [0.01, 1.0]"],
    ),
    (
        "search point that is no valid trial",
        BASE
        + "search:\n  num_samples: 2\n  params:\n    optimizer.name: {type: categorical, values: [sam, sgd]}\n"
        + "    optimizer.ascent: {type: categorical, values: [sam, adaptive]}\n"
        + "  points_to_evaluate:\n    - {optimizer.name: sgd, optimizer.ascent: adaptive}\n",
        ["search.points_to_evaluate[0]:", "ascent"],
    ),
    (
        "search with seeds",
        BASE
        + "seeds: [0, 1]\nsearch:\n  num_samples: 2\n  params:\n    optimizer.rho: {type: float, low: 0.01, high: 1}\n",
        ["seeds, repeats:", "base.seed"],
    ),
    (
        "bad resources: 1.5 gpus",
        BASE + "resources: {gpus: 1.5}\n",
        ["resources.gpus", "fraction below 1"],
    ),
    (
        "bad resources: no cpus",
        BASE + "resources: {cpus: 0}\n",
        ["resources.cpus", "> 0, got 0"],
    ),
    (
        "bad resources: key",
        BASE + "resources: {gpu: 1}\n",
        ["resources.gpu", "did you mean 'gpus'"],
    ),
    (
        "max_concurrent zero",
        BASE + "max_concurrent: 0\n",
        ["max_concurrent", ">= 1, got 0"],
    ),
    (
        "negative checkpoint_min_s",
        BASE + "checkpoint_min_s: -1\n",
        ["checkpoint_min_s", ">= 0, got -1"],
    ),
    (
        "unknown model",
        BASE.replace("name: mlp", "name: resnet19"),
        ["base.model.name", "resnet18"],
    ),
    (
        "unknown model argument",
        BASE.replace("{name: mlp}", "{name: mlp, kwargs: {widht: 8}}"),
        ["base.model.kwargs:", "widht", "did you mean 'width'"],
    ),
    ("name differs from file", BASE.replace("name: s", "name: other"), ["name: 'other'", "s.yaml"]),
]


@pytest.mark.parametrize(("kind", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_malformed_study_is_refused(
    tmp_path: Path, kind: str, text: str, expected: list[str]
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(StudyError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in expected:
        assert fragment in message, f"{kind}: {fragment!r} not in {message!r}"


# The command line: exit status 2, file and field path on stderr, and no traceback.
CLI_BAD = ["unknown nested key", "unknown dotted path", "bad resources: key"]


@pytest.mark.parametrize("kind", CLI_BAD)
def test_plan_command_refuses_malformed_study_without_traceback(tmp_path: Path, kind: str) -> None:
    _, text, expected = next(b for b in BAD if b[0] == kind)
    path = tmp_path / "s.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "samstudy", "plan", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"samstudy plan: {path}: "), done.stderr
    assert expected[0] in done.stderr  # the field path
    assert "Traceback" not in done.stderr and not done.stdout


def test_exponent_numbers_are_floats_and_paths_resolve(tmp_path: Path) -> None:
    text = (
        BASE.replace("lr: 0.05}", "lr: 5e-2, weight_decay: 1E-4}")
        + "grid: {optimizer.rho: [1e-2, 2.5e-1]}\n"
    )
    spec = load_study(write_study(tmp_path, text))
    optimizers = [t.config["optimizer"] for t in spec.expand()]
    assert [o["rho"] for o in optimizers] == [0.01, 0.25]
    assert optimizers[0]["lr"] == 0.05 and optimizers[0]["weight_decay"] == 1e-4
    assert load_study(tmp_path / "s").path == tmp_path / "s.yaml"  # suffix optional


def test_missing_study_lists_the_available_ones(tmp_path: Path) -> None:
    write_study(tmp_path, BASE)
    with pytest.raises(StudyError, match=r"no such study file; studies in .*: s"):
        load_study("nope", studies_dir=tmp_path)
    assert load_study("s", studies_dir=tmp_path).path == tmp_path / "s.yaml"


def test_many_bad_trials_are_reported_once_each(tmp_path: Path) -> None:
    text = (
        BASE
        + "grid:\n  optimizer.rho: [-0.1, -0.2]\n  optimizer.lr: [0.1, 0.2, 0.3]\nseeds: [0, 1, 2]\n"
    )
    with pytest.raises(StudyError) as info:
        load_study(write_study(tmp_path, text))
    lines = str(info.value).splitlines()
    assert 1 <= len(lines) <= 7  # capped, not one line per bad trial (18 of them)
