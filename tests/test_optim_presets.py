"""The preset registry is the one place a variant is defined: everything else derives from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from samstudy.identity import NAMED_PATHS, identify, run_name, trial_id
from samstudy.optim import PRESETS, check_optimizer_config, parse_optimizer_config, register_preset
from samstudy.optim.config import MEMBERS, RECIPE
from samstudy.optim.presets import DOCS_BEGIN, DOCS_END, markdown_table
from samstudy.train.config import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_IDS = Path(__file__).parent / "data" / "shipped_trial_ids.json"


@pytest.mark.parametrize("doc", ["README.md", "docs/optimizers.md"])
def test_docs_preset_table_is_the_registry(doc: str) -> None:
    text = (ROOT / doc).read_text()
    _, _, rest = text.partition(DOCS_BEGIN)
    table, end, _ = rest.partition(DOCS_END)
    assert end, f"{doc} lost its preset-table markers"
    assert table.strip() == markdown_table(), f"{doc}: the preset table is stale, run `make docs`"


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_is_a_typed_member_with_its_knobs(name: str) -> None:
    preset = PRESETS[name]
    member = MEMBERS[name]
    assert set(preset.knob_names) <= set(member.model_fields)
    config = parse_optimizer_config({"name": name, **preset.example})
    assert type(config) is member and config.region_table() == preset.table(config)
    # a dump keeps what was given (and name, base, lr, rho): the input of trial ids
    dumped = config.model_dump(mode="json")
    assert set(dumped) == {"name", "base", "lr", "rho", *preset.example}
    assert parse_optimizer_config(dumped) == config
    for knob in set(preset.knob_names):
        others = [p for p in PRESETS.values() if knob not in p.knob_names]
        if others:  # a knob of this preset on a preset without it is refused by name
            with pytest.raises(ValueError, match=rf"optimizer\.{knob}: applies only to name"):
                check_optimizer_config({"name": others[0].name, knob: preset.example[knob]})


@pytest.mark.parametrize("name", PRESETS)
def test_run_names_show_the_preset_label(name: str) -> None:
    preset = PRESETS[name]
    config = TrialConfig.model_validate({"optimizer": {"name": name, **preset.example}})
    dumped = config.model_dump(mode="json")
    label = config.optimizer.label()
    assert label.startswith(name)
    if preset.label is not None:
        assert label != name  # the knobs show
    name_of_trial = run_name(dumped, {f"optimizer.{k}": v for k, v in preset.example.items()})
    assert name_of_trial.startswith(label + "-") and name_of_trial.endswith("-s0")
    # labelled knobs are not repeated after the label; others are appended as leaf + value
    for knob in preset.knob_names:
        shown = f"optimizer.{knob}" in NAMED_PATHS
        assert shown == (preset.label is not None)
        if not shown:
            assert knob in name_of_trial


def test_trial_configs_take_the_recipe_and_create_optimizer_takes_torch_defaults() -> None:
    config = TrialConfig.model_validate({"optimizer": {"name": "sgd"}})
    assert config.optimizer.base_kwargs() == RECIPE["sgd"]
    adamw = TrialConfig.model_validate({"optimizer": {"base": "adamw"}})
    assert adamw.optimizer.base_kwargs() == RECIPE["adamw"]
    assert parse_optimizer_config({"name": "sgd"}).base_kwargs() == {}  # the API: torch's


def test_registering_after_the_config_is_built_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"register presets in samstudy/optim/presets\.py"):
        register_preset("late", summary="too late")(lambda knobs: ((1.0, 0.0),) * 4)
    assert "late" not in PRESETS


def test_shipped_studies_keep_their_trial_ids() -> None:
    """Trial configs and run names of every shipped study as the previous (untyped) version
    made them, by the whole-config ids of that time (``config_trial_id``; the runner resumes a
    study those ids keyed): a study started before the optimizer config was typed resumes with
    the same trials."""
    from samstudy.identity import config_trial_id
    from samstudy.study import load_study

    before = json.loads(SHIPPED_IDS.read_text())
    for study, trials in before.items():
        expanded = load_study(study, ROOT / "studies").expand()
        now = {config_trial_id(t.config): t.name for t in expanded}
        assert now == trials, study


def test_placement_fields_are_not_part_of_a_trial_id() -> None:
    """Where a trial runs (data folder, workers, threads, device, checkpoint cadence) is not
    what it computes: the id stays; any other field changes it."""
    from samstudy.identity import PLACEMENT_PATHS

    config = TrialConfig.model_validate({"optimizer": {"name": "sam"}}).model_dump(mode="json")
    moved = json.loads(json.dumps(config))
    moved.update(device="cuda:1", threads=7, checkpoint_every=3)
    moved["data"].update(root="/mnt/elsewhere", num_workers=5, download=True)
    assert {"device", "threads", "checkpoint_every", "data.root"} <= set(PLACEMENT_PATHS)
    assert trial_id(moved) == trial_id(config)
    for path, value in (("epochs", 7), ("seed", 9), ("batch_size", 32)):
        assert trial_id({**config, path: value}) != trial_id(config), path
    assert trial_id({**config, "data": {**config["data"], "name": "cifar10"}}) != trial_id(config)


def test_identity_of_a_config() -> None:
    config = TrialConfig.model_validate(
        {"optimizer": {"name": "same", "scales": [2, 0, 0, 0], "rho": 0.1}, "seed": 3}
    ).model_dump(mode="json")
    ident = identify(config, {"optimizer.rho": 0.1, "seed": 3, "threads": 2})
    assert ident["trial_id"] == trial_id(config)
    assert ident["name"] == "same[2,0,0,0]-rho0.1-mlp-threads2-s3"
    assert ident["variant"] == "same[2,0,0,0]-rho0.1-mlp"  # no seed, no placement field
    other_seed = identify({**config, "seed": 4, "threads": 1})
    assert (
        other_seed["variant_id"]
        == ident["variant_id"]
        != identify({**config, "optimizer": {**config["optimizer"], "rho": 0.2}})["variant_id"]
    )
    assert re.fullmatch(r"[0-9a-f]{12}", ident["variant_id"])


def test_a_label_file_names_one_variant_relative_or_absolute() -> None:
    from samstudy.identity import variant_id
    from samstudy.paths import project_root

    config = TrialConfig.model_validate(
        {"noise": {"kind": "human", "label_file": "labels/c10n.pt"}}
    ).model_dump(mode="json")
    absolute = {
        **config,
        "noise": {**config["noise"], "label_file": str(project_root() / "labels/c10n.pt")},
    }
    elsewhere = {**config, "noise": {**config["noise"], "label_file": "/elsewhere/c10n.pt"}}
    assert variant_id(absolute) == variant_id(config) != variant_id(elsewhere)


def test_sam_damp_disagree_runs_from_sam_to_samanatomy() -> None:
    from samstudy.optim import preset_table

    assert preset_table("sam_damp_disagree", beta=1.0) == preset_table("sam")
    assert preset_table("sam_damp_disagree", beta=0.0) == preset_table("sam_where_agree")
    with pytest.raises(ValueError, match=r"optimizer\.beta: expected a number <= 1, got 2"):
        check_optimizer_config({"name": "sam_damp_disagree", "beta": 2})


@pytest.mark.parametrize("name", PRESETS)
def test_typed_configs_pickle_by_reference(name: str) -> None:
    """Ray pickles study specs (with their typed optimizer) to its workers: each member class
    must be found by reference there, or a worker holds a foreign copy of the class."""
    import pickle

    config = TrialConfig.model_validate({"optimizer": {"name": name, **PRESETS[name].example}})
    back = pickle.loads(pickle.dumps(config))
    assert type(back.optimizer) is MEMBERS[name] and back == config
