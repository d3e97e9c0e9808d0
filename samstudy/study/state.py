"""A study's experiment on disk: where it lives, whether it may resume, and how it ended.

The Ray experiment lives in ``<storage_path>/<study name>`` (a local folder or a URI that every
node reaches, read through pyarrow's filesystems). Beside Tune's own files it holds the state
file ``samstudy_state.json``: the study's fingerprint (what must not change for Tune to resume
it) and every trial's outcome as it happened, which decides whether the study is complete.
:func:`reconcile` replays Tune's per-trial ``result.json`` into MLflow on resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from samstudy import tags
from samstudy.identity import config_trial_id, without_placement
from samstudy.paths import (  # noqa: F401 - where a study's files live (re-exported)
    SPOOL_FILE,
    experiment_path,
    is_uri,
    resolve_storage_path,
    spool_path,
)
from samstudy.study.spec import StudySpec, TrialSpec

if TYPE_CHECKING:  # callbacks imports this module
    from samstudy.study.callbacks import TrackingCallback

STATE_FILE = "samstudy_state.json"


class RunnerError(RuntimeError):
    """A study that cannot be run as asked (the message says why and what to do)."""


# -- where -------------------------------------------------------------------------------------


class ExperimentFiles:
    """Small text files in the experiment directory, local or on a URI (pyarrow filesystems);
    ``endpoint``: the study's ``storage_endpoint`` (see :mod:`samstudy.study.storage`)."""

    def __init__(self, path: str, endpoint: str | None = None) -> None:
        from samstudy.study.storage import filesystem

        self.path = path
        self.endpoint = endpoint
        self.fs, self.base = filesystem(path, endpoint)

    def _info(self, rel: str = "") -> Any:
        return self.fs.get_file_info(f"{self.base}/{rel}".rstrip("/"))

    def exists(self, rel: str = "") -> bool:
        """Whether ``rel`` (default: the experiment itself) exists."""
        import pyarrow.fs

        return self._info(rel).type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        """The text of ``rel``, None when there is no such file."""
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(f"{self.base}/{rel}") as stream:
            return stream.read().decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        """Replace ``rel`` with ``text`` (atomically on a local disk)."""
        self.fs.create_dir(self.base, recursive=True)
        tmp = f"{self.base}/.{rel}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(text.encode("utf-8"))
        self.fs.move(tmp, f"{self.base}/{rel}")

    def delete_file(self, rel: str) -> None:
        """Remove ``rel`` when it exists."""
        if self.exists(rel):
            self.fs.delete_file(f"{self.base}/{rel}")

    def delete(self) -> None:
        """Delete the whole experiment."""
        if self.exists():
            self.fs.delete_dir(self.base)

    def names(self) -> list[str]:
        """The names of the files directly in the experiment folder."""
        import pyarrow.fs

        if not self.exists():
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.base, recursive=False))
        return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.File]

    def subdirs(self) -> list[str]:
        """The names of the experiment's folders (one per Tune trial)."""
        import pyarrow.fs

        if not self.exists():
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.base, recursive=False))
        return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]


# -- may it resume ---------------------------------------------------------------------------


def _fingerprint_payload(
    study: StudySpec, trials: Sequence[TrialSpec], placement: bool = False
) -> Any:
    """Trial ids (grid) or the search; ``placement``: with the base's placement fields, as
    versions up to commit f069e68 hashed it."""
    if study.search is None:
        return sorted(t.trial_id for t in trials)
    base = study.base.model_dump(mode="json")
    if not placement:
        base = without_placement(base)
    search = study.search.model_dump(mode="json")
    if not search["points_to_evaluate"]:  # a later field: without it, as before it existed
        del search["points_to_evaluate"]
    return {"base": base, "search": search}


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def study_fingerprint(study: StudySpec, trials: Sequence[TrialSpec]) -> str:
    """What must not change for a study to be resumed: its trial ids (grid) or its search."""
    return _hash(_fingerprint_payload(study, trials))


# What the untyped optimizer mapping of versions up to commit 4cb92f8 filled in (frozen here:
# the compatibility of their fingerprints must not follow later changes of the defaults).
_EARLIER_DEFAULTS = {"name": "sam", "base": "sgd", "lr": 0.05, "rho": 0.05}
_EARLIER_RECIPE = {"sgd": {"momentum": 0.9, "weight_decay": 5e-4}, "adamw": {"weight_decay": 5e-4}}


def _earlier_fingerprints(study: StudySpec, trials: Sequence[TrialSpec]) -> set[str]:
    """The fingerprints earlier versions computed for this study.

    Up to commit 4cb92f8 a search study's ``optimizer`` mapping was untyped: its dump was the
    defaults and recipe above overlaid with the mapping exactly as the file wrote it (``scales:
    [1.0, 0, 0, 0]`` stayed mixed), where the typed one dumps floats. Trial ids, and so grid
    fingerprints, never changed: they hash integral floats as ints.
    """
    raw = study.base_raw.get("optimizer") or {}
    if study.search is None or not isinstance(raw, dict):
        return set()
    payload = _fingerprint_payload(study, trials, placement=True)
    found = {_hash(payload)}  # up to commit f069e68: placement fields in the base
    written = {**_EARLIER_DEFAULTS, **raw}
    payload["base"]["optimizer"] = {**_EARLIER_RECIPE.get(written["base"], {}), **written}
    return found | {_hash(payload)}


def config_id_fingerprint(trials: Sequence[TrialSpec]) -> str:
    """A grid study's fingerprint as versions up to commit f069e68 computed it: from trial ids
    that hashed the whole config (``identity.config_trial_id``; ``trials`` as expanded, before
    the runner makes their paths absolute)."""
    return _hash(sorted(config_trial_id(t.config) for t in trials))


def load_state(
    files: ExperimentFiles, study: StudySpec, trials: Sequence[TrialSpec], fingerprint: str
) -> dict[str, Any] | None:
    """The state of the study's earlier run (None if there is none); a state of another study
    (changed trials) raises :class:`RunnerError` with what to do."""
    text = files.read_text(STATE_FILE)
    state = json.loads(text) if text else None
    if state is None or state.get("fingerprint") == fingerprint:
        return state
    if state.get("fingerprint") in _earlier_fingerprints(study, trials):
        state["fingerprint"] = fingerprint  # the same study, as an earlier version saw it
        state["config_ids"] = True  # its sampled trials keep whole-config ids (TrialResolver)
        return state
    if study.search is None and state.get("fingerprint") == config_id_fingerprint(trials):
        state["config_ids"] = True  # its trials keep the ids they started with (runner)
        return state
    if study.search is None and "trial_ids" in state:  # grown or shrunk: see grow()
        diff = config_diff(state.get("base") or {}, identity_base(study))
        if diff:
            raise RunnerError(_altered_message(study, files, state, diff))
        return state
    earlier_set = state.get("overrides", [])
    if earlier_set != study.overrides:
        raise RunnerError(
            f"{study.path}: the study started in {files.path} with --set {earlier_set or '(none)'}"
            f" and now runs with --set {study.overrides or '(none)'}, which makes other trials "
            "(Ray Tune cannot resume a changed search space). Run it with the same --set "
            "assignments, or again with --fresh to start over (which deletes the old Ray "
            "results and MLflow runs)."
        )
    if study.sha256 and state.get("sha256") == study.sha256:
        raise RunnerError(
            f"{study.path}: the study file is unchanged, but this samstudy version makes other "
            f"trials of it than the version that started it in {files.path} (Ray Tune cannot "
            "resume a changed search space). Finish it with that version (its commit is the "
            f"{tags.GIT} tag of the study's MLflow parent run), or run it again with "
            "--fresh to start over (which deletes the old Ray results and MLflow runs)."
        )
    raise RunnerError(
        f"{study.path}: the study's trials changed since it started in {files.path} "
        "(Ray Tune cannot resume a changed search space). Restore the file, or run it "
        "again with --fresh to start over (which deletes the old Ray results and MLflow runs)."
    )


def identity_base(study: StudySpec) -> dict[str, Any]:
    """The study's base config (``--set`` applied) without its placement fields: what every
    trial that ran shares, and what must not change for the study to grow."""
    return without_placement(study.base.model_dump(mode="json"))


def config_diff(old: Any, new: Any, path: str = "base") -> list[str]:
    """``base.epochs: 60 -> 80`` for every leaf where two config dumps differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            missing = "(not set)"
            out += config_diff(old.get(key, missing), new.get(key, missing), f"{path}.{key}")
        return out
    if old == new:
        return []
    return [f"{path}: {json.dumps(old)} -> {json.dumps(new)}"]


def _altered_message(
    study: StudySpec, files: ExperimentFiles, state: Mapping[str, Any], diff: Sequence[str]
) -> str:
    lines = [
        f"{study.path}: this change alters trials that already ran in {files.path}; field by "
        "field, as they ran -> as the file (and --set) now say:",
        *(f"  {line}" for line in diff),
    ]
    earlier = state.get("overrides", [])
    if earlier != study.overrides:
        lines.append(f"  (--set when it started: {earlier or '(none)'}; now: "
                     f"{study.overrides or '(none)'})")  # fmt: skip
    lines.append(
        "Adding seeds, grid values or grid blocks grows a study; changing what its trials are "
        "does not. Either restore these fields, run it again with --fresh to start over (which "
        "deletes the old Ray results and MLflow runs), or save the file under a new study name "
        "to run it as a new study beside this one."
    )
    return "\n".join(lines)


def segments(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's Tune experiments: ``{"name", "trial_ids"}``, the first (name ``""``) in the
    experiment folder itself, each growth's in a subfolder ``grow-N`` of it."""
    return state.setdefault("segments", [{"name": "", "trial_ids": list(state["trial_ids"])}])


def grow(state: dict[str, Any], study: StudySpec, ids: Sequence[str], fingerprint: str) -> Growth:
    """Fit the state to the study's trials now (``ids``): trials that are new get a new
    segment, trials no longer in the file are left alone. A state from before trial ids were
    recorded has the same trials as now (its fingerprint matched)."""
    if "trial_ids" not in state:
        state["trial_ids"] = sorted(ids)
    state["base"] = identity_base(study)
    known = [i for segment in segments(state) for i in segment["trial_ids"]]
    new = [i for i in ids if i not in set(known)]
    removed = [i for i in known if i not in set(ids)]
    if new:
        state["segments"].append({"name": f"grow-{len(state['segments'])}", "trial_ids": new})
        state["trial_ids"] = sorted({*known, *new})
        state["complete"] = False
    state["fingerprint"] = fingerprint
    state["sha256"] = study.sha256
    state["overrides"] = study.overrides
    return Growth(new, removed)


@dataclass(frozen=True)
class Growth:
    """What :func:`grow` found: trial ids new to the study, and those no longer in its file."""

    new: list[str]
    removed: list[str]


def new_state(study: StudySpec, fingerprint: str) -> dict[str, Any]:
    """The outcome record of a study that starts from scratch."""
    return {
        "study": study.name,
        "fingerprint": fingerprint,
        "sha256": study.sha256,
        "overrides": study.overrides,  # --set: part of what the trials are, with the file
        "complete": False,
        "trials": {},
        "base": identity_base(study),
    }


def save_state(files: ExperimentFiles, state: Mapping[str, Any]) -> None:
    """Write the state file."""
    files.write_text(STATE_FILE, json.dumps(state, indent=1))


def done_count(state: Mapping[str, Any], trial_ids: Sequence[str] | None = None) -> int:
    """Trials (of ``trial_ids``, default all recorded) that ended in a way a rerun does not
    start again."""
    recorded = state["trials"]
    ids = recorded if trial_ids is None else [i for i in trial_ids if i in recorded]
    return sum(1 for i in ids if recorded[i]["status"] in tags.DONE_STATUSES)


def outcome(study: StudySpec, trial_ids: Sequence[str], state: Mapping[str, Any]) -> str:
    """``complete`` (every trial done), ``failed`` (every trial ended, some failed) or
    ``interrupted``, from the recorded outcomes."""
    recorded = state.get("trials", {})
    if study.search is None:
        statuses = [recorded.get(t, {}).get("status") for t in trial_ids]
    else:
        statuses = [v.get("status") for v in recorded.values()]
        statuses += [None] * max(0, study.search.num_samples - len(statuses))
    if all(s in tags.DONE_STATUSES for s in statuses):
        return "complete"
    if all(s in tags.TERMINAL_STATUSES for s in statuses):
        return "failed"
    return "interrupted"


# -- reconcile MLflow with Tune's own results ------------------------------------------------


def tune_results(files: ExperimentFiles) -> Iterator[dict[str, Any]]:
    """Every result in the experiment's ``<trial folder>/result.json`` files (Tune's JSON
    logger); a line cut short by a kill is skipped."""
    for sub in files.subdirs():
        text = files.read_text(f"{sub}/result.json")
        for line in (text or "").splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def reconcile(
    files: ExperimentFiles, tracking: TrackingCallback, state: Mapping[str, Any] | None
) -> int:
    """Queue every epoch in Tune's ``result.json`` files (and the recorded outcomes) for MLflow;
    returns the epochs read. Logged epochs are skipped, so this only fills gaps."""
    return tracking.replay(tune_results(files), (state or {}).get("trials", {}))
