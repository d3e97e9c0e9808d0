"""A study's Ray storage on S3 (or an S3-compatible store), through pyarrow's filesystems.

* Endpoint: the study file's ``storage_endpoint``, else ``$AWS_ENDPOINT_URL_S3``, else
  ``$AWS_ENDPOINT_URL``, else AWS itself (:func:`resolve_endpoint`). With an endpoint the
  filesystem is a ``pyarrow.fs.S3FileSystem`` pointed there (:func:`filesystem`); Tune gets it
  as ``RunConfig(storage_filesystem=...)`` and pickles it to every worker, endpoint included.
* Credentials: never from a study file (:func:`credential_fields` finds fields that look like
  one, and the study is refused). pyarrow's AWS SDK reads them on each node from the standard
  places: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` and ``~/.aws/credentials``, or an instance role. A pickled filesystem holds
  no key (only keys passed explicitly would travel, and none are).

Local paths and other URIs (``gs://``...) keep pyarrow's own resolution (``from_uri``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

S3 = "s3://"
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # what the AWS SDKs read
# Field names a credential goes by (aws_secret_access_key, secret_key, access_key_id,
# session_token, password, api_key, token...), compared per word of a key.
_CREDENTIAL = re.compile(
    r"(?i)(secret|passw|credential|access_?key|session_?token|api_?key|(^|[_.-])token($|[_.-]))"
)


@dataclass(frozen=True)
class Endpoint:
    """Where S3 requests go: ``url`` (None: AWS) and where that setting came from."""

    url: str | None
    source: str

    def describe(self) -> str:
        """The endpoint in words, for messages."""
        if self.url is None:
            return "AWS S3 (no storage_endpoint, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL set)"
        return f"the endpoint {self.url} ({self.source})"


def check_endpoint(url: str) -> str:
    """``url`` when it is ``http(s)://HOST[:PORT]`` without credentials, else ``ValueError``."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError(
            "holds credentials; a study file is no place for secrets: give the endpoint as "
            "http(s)://HOST:PORT and the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(or ~/.aws/credentials)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an endpoint; expected http(s)://HOST[:PORT]")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: expected http(s)://HOST[:PORT] without a path or query")
    return url.rstrip("/")


def resolve_endpoint(study_endpoint: str | None = None) -> Endpoint:
    """The S3 endpoint by the precedence of the module docstring."""
    if study_endpoint:
        return Endpoint(study_endpoint.rstrip("/"), "storage_endpoint in the study file")
    for name in ENDPOINT_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return Endpoint(value.rstrip("/"), f"${name}")
    return Endpoint(None, "AWS")


def filesystem(
    path: str, study_endpoint: str | None = None, probe: bool = False
) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a local path or a URI.

    ``s3://`` with an endpoint (:func:`resolve_endpoint`) goes to that endpoint; ``probe``:
    one attempt with short timeouts (a pre-flight check answers in seconds).
    """
    import pyarrow.fs

    endpoint = resolve_endpoint(study_endpoint).url if path.startswith(S3) else None
    if endpoint is None:
        return pyarrow.fs.FileSystem.from_uri(path)
    parts = urlsplit(endpoint)
    options: dict[str, Any] = {}
    if probe:
        options = {
            "connect_timeout": 3,
            "request_timeout": 10,
            "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
        }
    fs = pyarrow.fs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, **options)
    return fs, path[len(S3) :].rstrip("/")


def credential_fields(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in ``data`` (a study file's mapping) that name a credential."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            where = f"{prefix}.{key}" if prefix else str(key)
            if _CREDENTIAL.search(str(key)):
                found.append(where)
            found += credential_fields(value, where)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found += credential_fields(item, f"{prefix}[{i}]")
    return found


def credential_message(fields: list[str]) -> str:
    """The refusal of a study file that holds credential-looking fields (values not shown)."""
    more = f" (also {', '.join(fields[1:])})" if len(fields) > 1 else ""
    return (
        f"{fields[0]}: looks like a credential{more}; a study file is committed and shared, "
        "so it holds none: remove it and give S3 keys through the environment "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), AWS_PROFILE and "
        "~/.aws/credentials, or an instance role"
    )
