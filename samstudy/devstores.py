"""Throwaway local stores for tests and benchmarks: a PostgreSQL cluster in a temporary folder, an
``mlflow server`` and an S3 API server (moto), all listening on 127.0.0.1 only.

PostgreSQL refuses to run as root: as root, :class:`LocalPostgres` runs ``initdb`` / ``pg_ctl``
as the unprivileged system user ``samstudy-pg`` (created with ``useradd`` when missing); as any
other user, as that user. The cluster takes password authentication over TCP (the superuser
``samstudy`` with a random password) and is tuned for throwaway speed (no fsync): never a
place for real data. :class:`PostgresUnavailable` says why a cluster cannot start (no
binaries, no driver, no user), so that tests can skip with the reason.

:class:`LocalS3` runs ``moto``'s S3 server (the ``moto[server]`` dev extra) in its own process
group; :class:`S3Unavailable` says why it cannot start. Its keys are made up (moto takes any);
tests put them in the environment, where samstudy reads S3 credentials.

Only the standard library is imported at module level (``psycopg``, MLflow and pyarrow on
first use).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

PG_USER = "samstudy-pg"  # the system user the cluster runs as when samstudy runs as root
PG_SUPERUSER = "samstudy"  # the database role the URIs log in as
MLFLOW_TEMPLATE = "samstudy_mlflow_template"  # a migrated MLflow schema, copied per database


class PostgresUnavailable(RuntimeError):
    """A local PostgreSQL cannot run here; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise PostgresUnavailable(
            f"PostgreSQL's {name} is neither on PATH nor in /usr/lib/postgresql"
        )
    return candidates[-1]


def _pg_account() -> pwd.struct_passwd:
    """The account to run PostgreSQL as: ``samstudy-pg`` when root (created if missing)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PostgresUnavailable(f"running as root and no useradd to create {PG_USER!r}")
    made = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
        capture_output=True,
        text=True,
    )
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"could not create the system user {PG_USER!r} (PostgreSQL refuses root): "
            f"{made.stderr.strip()}"
        ) from None


class LocalPostgres:
    """A PostgreSQL cluster in a temporary folder on 127.0.0.1 (``start`` / ``stop``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.password = "pgSecret-" + secrets.token_hex(10)
        self.folder: Path | None = None
        self._account: pwd.struct_passwd | None = None

    # -- URIs ------------------------------------------------------------------------------

    def uri(self, database: str = "postgres", password: bool = True) -> str:
        """``postgresql://samstudy[:PASSWORD]@127.0.0.1:PORT/DATABASE``; without the password,
        libpq takes it from ``PGPASSWORD`` (see :attr:`env`)."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{PG_SUPERUSER}{secret}@127.0.0.1:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        """The environment that gives libpq the password (for URIs without one)."""
        return {"PGPASSWORD": self.password}

    # -- life ------------------------------------------------------------------------------

    def _run(self, *command: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        account = self._account
        assert account is not None and self.folder is not None
        as_other = account.pw_uid != os.geteuid()
        return subprocess.run(
            list(command),
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=account.pw_uid if as_other else None,
            group=account.pw_gid if as_other else None,
            extra_groups=[] if as_other else None,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )

    def start(self) -> LocalPostgres:
        """initdb and start the cluster; :class:`PostgresUnavailable` when that fails."""
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self._account = _pg_account()
        # Not under pytest's tmp folders: those are private to root, and the server user
        # must reach its data folder.
        self.folder = Path(tempfile.mkdtemp(prefix="samstudy-pg-"))
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        for path in (self.folder, pwfile):
            os.chown(path, self._account.pw_uid, self._account.pw_gid)
        pwfile.chmod(0o600)
        data = self.folder / "data"
        made = self._run(
            initdb, "-D", str(data), "-U", PG_SUPERUSER, "--pwfile", str(pwfile),
            "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
            "--no-locale", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        if made.returncode != 0:
            self._cleanup()
            raise PostgresUnavailable(f"initdb failed: {made.stderr.strip()[-800:]}")
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.folder} "
            # throwaway data: durability costs seconds per test for nothing
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = self.folder / "postgres.log"
        started = self._run(
            pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"
        )
        if started.returncode != 0:
            tail = log.read_text()[-800:] if log.exists() else started.stderr
            self.stop()
            raise PostgresUnavailable(f"pg_ctl start failed on port {self.port}: {tail.strip()}")
        return self

    def stop(self) -> None:
        """``pg_ctl stop`` (fast mode) and remove the folder."""
        if self.folder is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            self._run(_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        self._cleanup()

    def _cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -------------------------------------------------------------------------

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement (autocommit) and return its rows (none for DDL)."""
        try:
            import psycopg  # SQLAlchemy 2.1's default driver for postgresql:// URIs
        except ImportError:
            raise PostgresUnavailable(
                "no PostgreSQL driver (psycopg): `make setup` installs the dev extras"
            ) from None
        conn = psycopg.connect(self.uri(database), autocommit=True)
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()

    def create_database(self, name: str, template: str | None = None) -> str:
        """``CREATE DATABASE name`` (a copy of ``template``); returns its URI."""
        clause = f' TEMPLATE "{template}"' if template else ""
        self.execute(f'CREATE DATABASE "{name}"{clause}')
        return self.uri(name)

    def mlflow_database(self, name: str) -> str:
        """A new database holding MLflow's schema; returns its URI (with the password).

        MLflow's migrations take seconds: they run once, in a separate process (so no pooled
        connection stays open on the template), and each database is a copy of the result.
        """
        exists = self.execute(f"SELECT 1 FROM pg_database WHERE datname = '{MLFLOW_TEMPLATE}'")
        if not exists:
            self.create_database(MLFLOW_TEMPLATE)
            code = "import sys; from mlflow import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()"
            migrated = subprocess.run(
                [sys.executable, "-c", code, self.uri(MLFLOW_TEMPLATE)],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            )
            if migrated.returncode != 0:
                self.execute(f'DROP DATABASE "{MLFLOW_TEMPLATE}"')
                raise RuntimeError(f"MLflow's migrations failed: {migrated.stderr[-1500:]}")
        return self.create_database(name, template=MLFLOW_TEMPLATE)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own process group (its workers stop with it)."""

    def __init__(
        self,
        backend_uri: str,
        artifacts: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.backend_uri, self.artifacts = backend_uri, artifacts
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        command += ["--backend-store-uri", self.backend_uri]
        command += ["--default-artifact-root", str(self.artifacts)]
        # The job runner (a dozen huey workers for GenAI jobs) doubles the start time.
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **self.extra_env,
        }
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} not ready after {timeout} s")

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after 20 s)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


class S3Unavailable(RuntimeError):
    """A local S3 API server cannot run here; the message says why."""


class LocalS3:
    """moto's S3 API server on 127.0.0.1 in its own process group (``start`` / ``stop``).

    :attr:`env` holds made-up keys (``AWS_SECRET_ACCESS_KEY`` is ``s3Secret-`` and random hex,
    easy to look for in output) and :attr:`endpoint` the URL for ``AWS_ENDPOINT_URL``.
    """

    def __init__(self, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.secret = "s3Secret-" + secrets.token_hex(12)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Credentials and region for the server (the standard AWS variables)."""
        return {
            "AWS_ACCESS_KEY_ID": "AKIASAMSTUDYTEST",
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> LocalS3:
        """Start the server and wait until it answers; :class:`S3Unavailable` when it cannot."""
        try:
            import moto.server  # noqa: F401 - only its presence is checked here
        except ImportError:
            raise S3Unavailable(
                "moto[server] is not installed (`make setup` installs the dev extras)"
            ) from None
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                command, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            if self.log:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise S3Unavailable(f"moto's S3 server exited with {code} on {self.endpoint}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise S3Unavailable(f"moto's S3 server on {self.endpoint} not ready after {timeout} s")

    def filesystem(self) -> Any:
        """A pyarrow S3 filesystem on this server that may create and delete buckets."""
        import pyarrow.fs

        env = self.env
        return pyarrow.fs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_DEFAULT_REGION"],
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        self.filesystem().create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        """SIGTERM to its process group (SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
