"""Secrets stay out of what samstudy prints: ``paths.redact`` on URIs, DSNs and environment
secrets; study files may not hold a password; the readers' and settings' messages redact."""

from __future__ import annotations

from pathlib import Path

import pytest

from samstudy.analysis.readers import StudyNotFoundError, read_sql_store
from samstudy.paths import REDACTED, redact
from samstudy.settings import Tracking, TrackingError, check_tracking_uri
from samstudy.study.spec import StudyError, study_from_mapping


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "postgresql://mlflow:s3cr%40t-pw@db.lab:5432/mlflow",
            "postgresql://mlflow:***@db.lab:5432/mlflow",
        ),
        (
            "postgresql+psycopg://u:p4ss:word@127.0.0.1/db?sslmode=require",
            "postgresql+psycopg://u:***@127.0.0.1/db?sslmode=require",
        ),
        (
            "could not reach mysql://root:hunter22@h/x, retrying",
            "could not reach mysql://root:***@h/x, retrying",
        ),
        ("https://bob:tok3n@mlflow.lab/api", "https://bob:***@mlflow.lab/api"),
        (
            "dbname=mlflow user=u password=dsnpw123 host=h",
            "dbname=mlflow user=u password=*** host=h",
        ),
        (
            "s3://bucket/x?X-Amz-Signature=1&token=abcd1234",
            "s3://bucket/x?X-Amz-Signature=1&token=***",
        ),
        # nothing secret: unchanged
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://mlflow@db.lab/mlflow", "postgresql://mlflow@db.lab/mlflow"),
        ("sqlite:////srv/mlflow/mlflow.db", "sqlite:////srv/mlflow/mlflow.db"),
        ("user@example.org wrote http://h:80/a", "user@example.org wrote http://h:80/a"),
    ],
)
def test_redact_hides_passwords_in_uris_and_dsns(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_hides_environment_secrets_and_passwords_met_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPASSWORD", "pgEnvSecret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("LAB_DB_PASSWORD", "another-long-one")
    monkeypatch.setenv("LAB_FLAG", "not-a-secret-value")
    text = (
        "auth failed with pgEnvSecret; key wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY; "
        "another-long-one; not-a-secret-value"
    )
    assert (
        redact(text)
        == f"auth failed with {REDACTED}; key {REDACTED}; {REDACTED}; not-a-secret-value"
    )
    # a password seen in a URI is hidden wherever it shows up later, decoded or not
    redact("postgresql://u:only%2Fhere-42@h/db")
    assert redact("libpq said: bad password only/here-42") == f"libpq said: bad password {REDACTED}"
    assert redact(ValueError("x postgresql://u:pw1@h/db")) == "x postgresql://u:***@h/db"


def test_a_study_file_may_not_hold_a_password(tmp_path: Path) -> None:
    Tracking(tracking_uri="postgresql://mlflow@db.lab/mlflow")  # no password: fine
    with pytest.raises(StudyError) as caught:
        study_from_mapping(
            {
                "name": "leaky",
                "base": {"data": {"name": "digits"}, "model": {"name": "mlp"}},
                "tracking": {"tracking_uri": "postgresql://mlflow:fileSecret9@db.lab/mlflow"},
            },
            path=tmp_path / "leaky.yaml",
        )
    message = str(caught.value)
    assert "fileSecret9" not in message
    assert "tracking.tracking_uri" in message and "PGPASSWORD" in message


def test_settings_and_reader_messages_are_redacted(tmp_path: Path) -> None:
    with pytest.raises(TrackingError) as refused:
        check_tracking_uri("file://u:fileStore77@host/mlruns")
    assert "fileStore77" not in str(refused.value) and "file://u:***@host" in str(refused.value)
    # a sqlite URI has no password, but a message naming any store goes through redact
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    with pytest.raises(StudyNotFoundError, match="no MLflow database"):
        read_sql_store(missing, "x")
