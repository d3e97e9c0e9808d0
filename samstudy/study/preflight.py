"""Pre-flight: what ``plan`` and the start of ``study`` check before any trial runs.

Each refusal names the study file, the field, what was found and the fix. The checks:

* ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` and agrees with ``resources.gpus``
  (:func:`static_problems`, no Ray, no torch);
* ``storage_path`` in the study file is absolute or a URI, and ``storage_endpoint`` goes with
  an ``s3://`` one;
* storage: an ``s3://`` storage path's bucket answers at its endpoint and takes a small probe
  object, written and deleted (:func:`storage_problem`);
* resources: a trial's CPUs and GPUs exist on at least one node of the cluster (or on this
  machine), with the concurrency they allow (:func:`resource_problems`);
* data: every file a trial reads is where the trials run: on this machine, or on every node of
  the cluster through one small Ray task per node (:func:`data_problems`);
* tracking: the MLflow store answers and the study's experiment can be written
  (:func:`tracking_problem`).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from samstudy.paths import absolute_path, is_uri, redact
from samstudy.study.storage import S3, filesystem, resolve_endpoint

if TYPE_CHECKING:
    from samstudy.study.spec import StudySpec

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class PreflightError(ValueError):
    """A study that would fail once launched (the message lists every problem found)."""


# -- static: the study file alone -----------------------------------------------------------


def static_problems(spec: StudySpec) -> list[str]:
    """Problems visible in the study file itself: device against resources, storage path."""
    lines: list[str] = []
    gpus = spec.resources.gpus
    devices = sorted({str(t.config.get("device", "auto")) for t in spec.expand()})
    for device in devices:
        if not _DEVICE.match(device):
            lines.append(
                f"device: {device!r} is not a device; allowed: auto, cpu, cuda, cuda:N "
                "(auto takes the GPU Ray gives the trial, else the CPU)"
            )
        elif device.startswith("cuda") and gpus == 0:
            lines.append(
                f"device: {device!r} but resources.gpus is 0, so Ray gives the trial no GPU; "
                "set resources.gpus (e.g. 1, or 0.25 to share one GPU by four trials) or "
                "device: auto"
            )
        elif device == "cpu" and gpus > 0:
            lines.append(
                f"device: 'cpu' but resources.gpus is {gpus:g}: each trial would hold a GPU it "
                "never uses; set resources.gpus: 0, or device: auto"
            )
    storage = spec.storage_path
    if storage is not None and not is_uri(storage) and not Path(storage).expanduser().is_absolute():
        lines.append(
            f"storage_path: {storage!r} is relative; Tune needs an absolute path or a URI "
            f"(e.g. {absolute_path(storage)} or s3://bucket/samstudy)"
        )
    if spec.storage_endpoint and storage is not None and not storage.startswith(S3):
        lines.append(
            f"storage_endpoint: {spec.storage_endpoint!r} is for an s3:// storage_path, but "
            f"storage_path is {storage!r}; remove storage_endpoint or use s3://BUCKET/PREFIX"
        )
    return lines


# -- storage ----------------------------------------------------------------------------------


def storage_problem(storage: str | None, study_endpoint: str | None = None) -> str | None:
    """None when ``storage`` is not on S3, or its bucket answers and a probe object can be
    written and deleted there; else the problem and the fix (credentials never shown)."""
    import pyarrow.fs

    if storage is None or not storage.startswith(S3):
        return None
    where = resolve_endpoint(study_endpoint).describe()
    bucket = storage[len(S3) :].split("/", 1)[0]
    step = "reach"
    try:
        fs, base = filesystem(storage, study_endpoint, probe=True)
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            return (
                f"storage_path: the bucket {bucket!r} of {storage} does not exist at {where}; "
                f"create it (e.g. `aws s3 mb s3://{bucket}`), or fix storage_path, or point "
                "storage_endpoint / AWS_ENDPOINT_URL at the store that has it"
            )
        step = "write to"
        probe = f"{base}/.samstudy-preflight-{uuid.uuid4().hex[:12]}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"samstudy pre-flight probe; safe to delete\n")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
        text = " ".join(str(exc).split())[:300]
        return f"storage_path: cannot {step} {storage} at {where} ({type(exc).__name__}: " + (
            f"{redact(text)}); {_storage_fix(text)}"
        )
    return None


def _storage_fix(text: str) -> str:
    """What to do about an S3 error, from its text."""
    upper = text.upper()
    if any(k in upper for k in ("NETWORK_CONNECTION", "COULD NOT CONNECT", "TIMEOUT", "RESOLVE")):
        return (
            "start the store, or set storage_endpoint in the study file or AWS_ENDPOINT_URL "
            "(AWS_ENDPOINT_URL_S3) to where it listens"
        )
    return (
        "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
        "~/.aws/credentials, or the instance role) and that they may write to the bucket"
    )


# -- resources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """What the trials may run on: each node's CPUs and GPUs."""

    nodes: list[tuple[str, float, float]]  # (node, CPUs, GPUs)
    where: str  # "this machine" or "the Ray cluster at ADDRESS"

    def slots(self, cpus: float, gpus: float) -> int:
        """Trials of ``cpus`` / ``gpus`` that fit at once over all nodes."""
        total = 0
        for _, node_cpus, node_gpus in self.nodes:
            fit = math.floor(node_cpus / cpus + 1e-9) if cpus else 10**6
            if gpus:
                fit = min(fit, math.floor(node_gpus / gpus + 1e-9))
            total += fit
        return total


def local_capacity() -> Capacity:
    """This machine: its CPUs and the GPUs torch sees."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return Capacity([("this machine", float(os.cpu_count() or 1), float(gpus))], "this machine")


def node_name(node: Mapping[str, Any]) -> str:
    """``ADDRESS (node ID6)``: nodes of one machine share an address."""
    return f"{node['NodeManagerAddress']} (node {node['NodeID'][:6]})"


def cluster_capacity(where: str) -> Capacity:
    """The alive nodes of the connected Ray cluster."""
    import ray

    nodes = [
        (node_name(n), n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return Capacity(nodes, where)


def resource_problems(spec: StudySpec, capacity: Capacity) -> tuple[list[str], str]:
    """(problems, a line on the concurrency) of the study's per-trial resources."""
    cpus, gpus = spec.resources.cpus, spec.resources.gpus
    fits = [n for n, c, g in capacity.nodes if c + 1e-9 >= cpus and g + 1e-9 >= gpus]
    if not fits:
        have = ", ".join(f"{n}: {c:g} CPU, {g:g} GPU" for n, c, g in capacity.nodes)
        fix = (
            "lower resources.cpus / resources.gpus, or run on a cluster that has them (RAY_ADDRESS)"
            if capacity.where == "this machine"
            else "lower resources.cpus / resources.gpus, or add nodes that have them"
        )
        return [
            f"resources: a trial asks for {cpus:g} CPU and {gpus:g} GPU, but no node of "
            f"{capacity.where} has that ({have}); {fix}"
        ], ""
    slots = capacity.slots(cpus, gpus)
    limit = f", capped at {spec.max_concurrent} by max_concurrent" if spec.max_concurrent else ""
    running = min(slots, spec.max_concurrent or slots)
    total_c = sum(c for _, c, _ in capacity.nodes)
    total_g = sum(g for _, _, g in capacity.nodes)
    return [], (
        f"concurrency: {running} trials at once on {capacity.where} ({slots} fit in "
        f"{total_c:g} CPU, {total_g:g} GPU over {len(capacity.nodes)} node(s){limit})"
    )


# -- data -----------------------------------------------------------------------------------


def needed_files(configs: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the trials read from disk, keyed by a readable name: the CIFAR folders and CIFAR-N
    label files, with the data set's ``download`` setting."""
    needs: dict[str, dict[str, Any]] = {}
    for config in configs:
        data = config.get("data", {})
        name = data.get("name", "digits")
        if name.startswith("cifar"):
            root = str(absolute_path(data.get("root", "data")))
            needs.setdefault(
                f"{name} in {root}",
                {"kind": name, "root": root, "download": bool(data.get("download"))},
            )
        label_file = (config.get("noise") or {}).get("label_file")
        if label_file:
            path = str(absolute_path(label_file))
            needs.setdefault(f"label file {path}", {"kind": "file", "path": path})
    return needs


def missing(needs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The keys of ``needs`` absent on this machine (runs on each node as a Ray task)."""
    gone = []
    for key, need in needs.items():
        if need["kind"] == "file":
            ok = Path(need["path"]).is_file()
        else:
            from samstudy.data.sources import cifar_class

            cls = cifar_class(need["kind"])
            folder = Path(need["root"]) / cls.base_folder
            files = [f for f, _ in [*cls.train_list, *cls.test_list]]
            ok = need["download"] or all((folder / f).is_file() for f in files)
        if not ok:
            gone.append(key)
    return gone


def data_problems(spec: StudySpec, on_cluster: bool) -> list[str]:
    """Data a trial needs but that is missing where trials run (each node of a cluster)."""
    needs = needed_files(t.config for t in spec.expand())
    if not needs:
        return []
    by_key: dict[str, list[str]] = {}
    if on_cluster:
        for node, gone in _missing_per_node(needs).items():
            for key in gone:
                by_key.setdefault(key, []).append(node)
    else:
        for key in missing(needs):
            by_key[key] = ["this machine"]
    lines = []
    for key, nodes in sorted(by_key.items()):
        need = needs[key]
        where = ", ".join(nodes)
        if need["kind"] == "file":
            fix = "copy it there (or to a shared mount) and point noise.label_file at it"
        else:
            fix = (
                "stage it there (a shared mount at the same path on every node), or set "
                "data.download: true where the nodes reach the internet"
            )
        lines.append(f"data: {key} is missing on {where}; {fix}")
    return lines


def _missing_per_node(needs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """{node address: missing keys}, one small Ray task pinned to each alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(missing)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(dict(needs))
        for n in nodes
    ]
    results = ray.get(refs, timeout=120)
    return {node_name(n): gone for n, gone in zip(nodes, results, strict=True)}


# -- tracking -------------------------------------------------------------------------------


def tracking_problem(uri: str, experiment: str) -> str | None:
    """None when the MLflow store answers and ``experiment`` can be written, else the problem
    and the fix. An existing experiment gets a tag written; a new one is not made here (the
    study makes it), so for a sqlite store its folder must be writable."""
    from mlflow import MlflowClient

    from samstudy.paths import SQLITE_PREFIX

    saved = {k: os.environ.get(k) for k in _FAST_MLFLOW}
    os.environ.update(_FAST_MLFLOW)  # one quick try: the outbox retries during a study
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            client.set_experiment_tag(found.experiment_id, "samstudy.preflight", "writable")
        elif uri.startswith(SQLITE_PREFIX):
            folder = Path(uri[len(SQLITE_PREFIX) :]).parent
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"cannot write in {folder}")
    except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
        text = " ".join(str(exc).split())[:300]
        return (
            f"tracking: the MLflow store {redact(uri)} cannot record experiment {experiment!r} "
            f"({type(exc).__name__}: {redact(text)}); start the server or fix tracking.tracking_uri / "
            "MLFLOW_TRACKING_URI / --tracking-uri"
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return None


_FAST_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def raise_if(path: Path, lines: Sequence[str]) -> None:
    """:class:`PreflightError` naming the study file, when there are ``lines``."""
    if lines:
        body = "\n".join(f"  {line}" for line in lines)
        raise PreflightError(f"{path}: the study would fail once launched:\n{body}")


def environment_problems(
    spec: StudySpec,
    uri: str,
    experiment: str,
    cluster: str | None,
    ray_up: bool = False,
    check_storage: bool = True,
) -> tuple[list[str], list[str]]:
    """(problems, notes) of the resources, data, storage and tracking checks. ``cluster``: the
    address of the Ray cluster, None for this machine; ``ray_up``: Ray is connected (then its
    view of the nodes is used, and data is checked by a task on each node of a cluster);
    ``check_storage``: probe the study file's ``storage_path`` (the runner probes the one it
    uses before it reads anything there)."""
    if ray_up:
        capacity = cluster_capacity(f"the Ray cluster at {cluster}" if cluster else "this machine")
    else:
        capacity = local_capacity()
    problems, concurrency = resource_problems(spec, capacity)
    problems += data_problems(spec, on_cluster=ray_up and cluster is not None)
    storage = storage_problem(spec.storage_path, spec.storage_endpoint) if check_storage else None
    if storage:
        problems.append(storage)
    tracking = tracking_problem(uri, experiment)
    if tracking:
        problems.append(tracking)
    return problems, [concurrency] if concurrency else []
