"""The one place that decides where samstudy's files live.

Rule: every relative path samstudy reads from a config, a study file or the command line (a
data root, a label file, Tune's storage path, a relative ``sqlite:///x.db`` tracking store, the
results folder) is relative to the **project root**, never to the working directory. The project
root is the checkout holding ``pyproject.toml`` next to the ``samstudy`` package (an editable
install); for any other install it is the working directory. Ray workers run trials in their own
folders, so this is what makes every process see the same files.

Only the standard library is imported here: every package (``samstudy.train`` included) may use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

SQLITE_PREFIX = "sqlite:///"
SPOOL_FILE = "samstudy_mlflow_spool.json"  # MLflow operations a study could not send yet
REDACTED = "***"
# Secrets samstudy may meet in the environment (read there, never from study files). Any other
# variable whose name ends like one of _SECRET_SUFFIXES counts too.
SECRET_ENV_VARS = (
    "PGPASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RAY_AUTH_TOKEN",
)
_SECRET_SUFFIXES = re.compile(
    r"(PASSWORD|PASSWD|SECRET|TOKEN|SECRET_KEY|ACCESS_KEY|API_KEY)$", re.I
)
# scheme://user:PASSWORD@host: a password in a URI must be percent-encoded, so it holds no "@",
# "/" or blank; user names hold no ":" either.
_URI_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)([^\s@/]+)@")
# password=... in a query string or a libpq DSN (psycopg2 errors may quote one)
_KEY_VALUE = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|aws_secret_access_key|secret_access_key)"
    r"(\s*=\s*)('[^']*'|[^&\s'\";,)]+)"
)
_seen_secrets: set[str] = set()  # passwords met in URIs: also hidden where they appear alone


def project_root() -> Path:
    """The samstudy checkout (the folder with ``pyproject.toml`` above the package), else the cwd."""
    candidate = Path(__file__).resolve().parents[1]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd().resolve()


def absolute_path(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """``path`` with ``~`` expanded; a relative one is taken from ``base`` (default: project root)."""
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return expanded
    return ((base or project_root()) / expanded).resolve()


def results_root() -> Path:
    """``<project root>/results``: where exports (Parquet) and Tune's storage go by default."""
    return project_root() / "results"


def default_tracking_uri(root: Path | None = None) -> str:
    """``sqlite:///<project root>/mlflow.db``: where studies log and ``samstudy ui`` looks."""
    return f"{SQLITE_PREFIX}{(root or project_root()) / 'mlflow.db'}"


def absolute_sqlite_uri(uri: str, root: Path | None = None) -> str:
    """A relative ``sqlite:///x.db`` made absolute against the project root (or ``root``);
    absolute sqlite URIs (``sqlite:////abs/x.db``) and every other URI are returned unchanged."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        return f"{SQLITE_PREFIX}{absolute_path(uri[len(SQLITE_PREFIX) :], root)}"
    return uri


def resolve_tracking_uri(explicit: str | None = None, root: Path | None = None) -> str:
    """``explicit``, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`; a relative
    sqlite path is made absolute against the project root (:func:`absolute_sqlite_uri`)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)
    return absolute_sqlite_uri(uri, root)


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``: storage that every node reaches by itself."""
    return "://" in path


def resolve_storage_path(path: str | None, root: Path | None = None) -> str:
    """Absolute storage path (Tune requires it): relative paths are taken from the project."""
    if path is None:
        return str((root or project_root()) / "results" / "ray")
    if is_uri(path):
        return path.rstrip("/")
    return str(absolute_path(path, root))


def experiment_path(storage: str, name: str) -> str:
    """``<storage>/<name>``, on a URI or a local disk."""
    return f"{storage}/{name}" if is_uri(storage) else str(Path(storage) / name)


def spool_path(experiment: str, name: str, root: Path) -> Path:
    """Where MLflow operations that could not be sent wait for the next run: in the experiment,
    or on this machine when the experiment is on a URI (the spool is a local file)."""
    if is_uri(experiment):
        return root / "results" / "ray" / f"{name}.{SPOOL_FILE}"
    return Path(experiment) / SPOOL_FILE


def _env_secrets() -> list[str]:
    found = []
    for name, value in os.environ.items():
        if name in SECRET_ENV_VARS:
            shortest = 3
        elif _SECRET_SUFFIXES.search(name):
            shortest = 8  # an unlisted variable: only values that cannot be common words
        else:
            continue
        if len(value) >= shortest:
            found.append(value)
    return found


def redact(text: object) -> str:
    """``text`` (a URI, a message, an exception) with every secret replaced by ``***``.

    Hidden: the password of any ``scheme://user:PASSWORD@host`` URI (``postgresql://``,
    ``mysql://``, ``http://``...), ``password=`` / ``token=`` values in query strings and DSNs,
    the values of secret environment variables (``SECRET_ENV_VARS``, and any variable named
    ``*_PASSWORD``, ``*_SECRET``, ``*_TOKEN``, ``*_SECRET_KEY``, ``*_ACCESS_KEY``), and a
    password met in an earlier URI wherever it appears again, percent-decoded or not.
    Call it on everything printed, logged or raised that may hold a tracking or storage URI.
    """
    out = str(text)

    def hide_uri_password(match: re.Match[str]) -> str:
        _seen_secrets.update({match[2], unquote(match[2])} - {"", REDACTED})
        return f"{match[1]}{REDACTED}@"

    out = _URI_PASSWORD.sub(hide_uri_password, out)
    out = _KEY_VALUE.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", out)
    # longest first: a secret that contains another is hidden whole
    for secret in sorted({*_seen_secrets, *_env_secrets()}, key=len, reverse=True):
        if len(secret) >= 3:
            out = out.replace(secret, REDACTED)
    return out
