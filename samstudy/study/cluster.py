"""The Ray this study runs on: a local one of its own, or a cluster probed before joining it.

``init_ray`` starts a local Ray bound to 127.0.0.1 (never joining one that ``ray start`` left on
the machine) or joins ``RAY_ADDRESS`` after :func:`probe_cluster` checked, in seconds, that a Ray
head answers there and accepts this driver's token. ``check_storage`` refuses a node-local
storage path on a cluster of several nodes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from samstudy.study.state import RunnerError, is_uri

SHARED_STORAGE_ENV = "SAMSTUDY_SHARED_STORAGE"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / ``RAY_ADDRESS`` or start a local Ray; True if this call started
    (or connected) it, so the caller shuts it down. An already initialised Ray is reused.

    Without an address the Ray is this process's own (``address="local"``: never one that
    ``ray start`` left on the machine), bound to 127.0.0.1. A cluster is probed first
    (:func:`probe_cluster`), so a wrong address or token fails in seconds with one line.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        # Through Ray Client, Tune runs the experiment (and so the MLflow tracking callbacks)
        # in a remote actor; the driver-side tracking needs a real driver on the cluster.
        raise RunnerError(
            f"RAY_ADDRESS {address!r} is a Ray Client address; run `samstudy study` on a node "
            "of the cluster with RAY_ADDRESS=HEAD_IP:6379 (the GCS address) instead"
        )
    # Ray's notice that token authentication is on (local Ray: always) is not for the user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if address:
        probe_cluster(address)
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    from ray._private import ray_constants

    # Ray binds its servers to every interface unless its node address is the loopback one,
    # which it picks only when "clusters" are off; restored right after start-up (a started
    # node keeps its address).
    # The workers' own INFO lines ("Restored on ... from checkpoint" per resumed trial) reach
    # the driver's console; they stay in Ray's log files.
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # No dashboard: nothing listens beyond what Ray itself needs.
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=num_cpus,
            logging_level=logging.WARNING,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters
    return True


def _token_available() -> bool:
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (C++ logging writes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def probe_cluster(address: str, timeout_s: float = 3.0) -> None:
    """Refuse, in seconds and with the fix, a cluster this driver cannot join.

    With ``RAY_AUTH_MODE`` unset and a token on this machine, the token is used (mode
    ``token``) when the cluster requires one. A driver in token mode joins a cluster without
    authentication, but that cluster then cancels its actors, so every trial fails. So a child
    process asks the cluster without a token first; where it needs one, the mode is set here
    and Ray's config, which read it at import, is read again (as Ray does when it turns tokens
    on), before anything in this process talks to the cluster.
    Raises :class:`RunnerError` when nothing answers at ``address`` or the cluster refuses.
    """
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RunnerError(
            f"Ray address {address!r} (RAY_ADDRESS or --address) is not HOST:PORT; use the "
            "head's GCS address, e.g. 10.0.0.1:6379, or unset it to run on a local Ray"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RunnerError(
            f"cannot reach the Ray cluster at {address} (RAY_ADDRESS or --address): {exc}. "
            f"Start its head (`ray start --head --port {port}`), check the address and the "
            "firewall, or unset RAY_ADDRESS to run on a local Ray"
        ) from None
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        if _needs_token(address, timeout_s):
            os.environ["RAY_AUTH_MODE"] = "token"
            with contextlib.suppress(ImportError):  # Ray read the mode at import: again
                from ray._raylet import Config

                Config.initialize("")
    try:
        from ray._raylet import GcsClient  # Ray's own client: fails at once on a bad token
    except ImportError:  # a Ray without it: ray.init reports for itself
        return
    try:
        with _native_stderr_muted():  # Ray's C++ client logs each refusal on its own
            GcsClient(address=address).internal_kv_get(b"samstudy-probe", None, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - any refusal is reported the same way
        text = " ".join(str(exc).split())
        if "auth" in text.lower() or "token" in text.lower():
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            raise RunnerError(
                f"the Ray cluster at {address} refused this driver's authentication "
                f"(RAY_AUTH_MODE={mode}; {type(exc).__name__}). Give this machine the "
                "cluster's token (copy the head's ~/.ray/auth_token, or export "
                "RAY_AUTH_TOKEN=...) and export RAY_AUTH_MODE=token, as every node of the "
                "cluster does (docs/running.md, 'On a Ray cluster')"
            ) from None
        raise RunnerError(
            f"the Ray cluster at {address} did not answer as a Ray head ({type(exc).__name__}: "
            f"{text[:300]}); check RAY_ADDRESS (the head's GCS port, 6379 by default)"
        ) from None


_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"samstudy-probe", None, timeout=float(sys.argv[2]))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def _needs_token(address: str, timeout_s: float) -> bool:
    """Whether the cluster at ``address`` refuses a driver without a token (asked from a child
    process, so this one's auth mode is still unread)."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE, address, str(timeout_s)],
            env=env, capture_output=True, text=True, timeout=timeout_s + 30,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return True  # no answer without a token: try with it
    text = probe.stdout.lower()
    return "auth" in text or "token" in text


def check_storage(storage: str, shared: bool | None = None) -> None:
    """Refuse a node-local storage path on a cluster of several nodes.

    Trials on other nodes write their checkpoints to ``storage``; a restored trial must find
    them wherever it is placed, so the path has to be shared (a URI, or a network filesystem
    mounted at the same path on every node, declared with ``--shared-storage`` or
    ``SAMSTUDY_SHARED_STORAGE=1``).
    """
    import ray

    if shared is None:
        shared = os.environ.get(SHARED_STORAGE_ENV, "").lower() in ("1", "true", "yes")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not is_uri(storage) and not shared:
        raise RunnerError(
            f"the Ray cluster has {len(nodes)} nodes but the storage path {storage} is a local "
            "folder: checkpoints written on one node would be missing when a trial resumes on "
            "another. Use shared storage: a URI (s3://bucket/path, gs://...) or a network "
            "filesystem mounted at the same path on every node, then pass --storage-path PATH "
            f"and --shared-storage (or set {SHARED_STORAGE_ENV}=1)."
        )
