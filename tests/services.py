"""The services a team runs beside vaelab (docs/scale.md), started by the tests on 127.0.0.1 and
stopped afterwards: a PostgreSQL server (Debian's `postgresql` package, which .ci/run installs)
and an S3-compatible server (moto's, from the dev extras) holding one bucket.

conftest.py starts each once per test session (session fixtures ``postgres`` and ``s3``); the
tests that use them share a worker under `make test` (xdist group "tracking_server"). A missing
PostgreSQL skips those tests with the reason and how to install it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 60
PORT_TRIES = 3  # a port found free can be taken by another process before the server binds it
# Credentials the S3 server accepts (moto takes any); given only to the processes that talk to
# the bucket themselves: the tracking server and DVC, never the pipeline's MLflow client.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vaelab-test",
    "AWS_SECRET_ACCESS_KEY": "vaelab-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MISSING_POSTGRES = (
    "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
    "apt-get install postgresql (.ci/run does), or see README's Tests"
)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: PATH first, else Debian's versioned folder (its
    packages keep them out of PATH), the newest version; None when PostgreSQL is missing."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return versions[-1].parent if versions else None


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str  # the database superuser (trust authentication, 127.0.0.1 only)
    folder: Path

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its postgresql:// URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url(database)) as connection:
            return connection.execute(sql).fetchall()


def _server_account() -> dict:
    """subprocess arguments that run PostgreSQL's programs as an unprivileged user when the
    tests run as root (PostgreSQL refuses to run as root): Debian's `postgres` account, else
    `nobody`. As any other user, nothing."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            account = pwd.getpwnam(name)
            return {"user": account.pw_uid, "group": account.pw_gid}
    pytest.fail("running as root and no unprivileged account (postgres, nobody) for PostgreSQL")


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster in a temporary folder, on a free port of 127.0.0.1 (and a
    Unix socket in that folder); stopped and removed on exit."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip(MISSING_POSTGRES)
    account = _server_account()
    # Not pytest's tmp_path: its folders are private to the user running the tests, and the
    # server may run as another one.
    folder = Path(tempfile.mkdtemp(prefix="vaelab-postgres-"))
    try:
        if account:
            os.chown(folder, account["user"], account["group"])
        data, log = folder / "data", folder / "server.log"

        def as_server(*command: str) -> subprocess.CompletedProcess:
            done = subprocess.run(
                command, cwd=folder, capture_output=True, text=True, timeout=120, **account
            )
            if done.returncode != 0:
                tail = log.read_text()[-3000:] if log.exists() else ""
                pytest.fail(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}\n{tail}")
            return done

        # --no-sync: a throwaway cluster needs no fsync (initdb 3 s instead of 6 s here).
        as_server(
            str(binaries / "initdb"), "-D", str(data), "-U", "vaelab", "--auth=trust",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        for _ in range(PORT_TRIES):
            port = free_port()
            options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
            started = subprocess.run(
                [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
                 "-w", "-t", str(START_TIMEOUT_S), "start"],
                cwd=folder, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30,
                **account,
            )  # fmt: skip
            if started.returncode == 0:
                break
            if "already in use" not in log.read_text():
                pytest.fail(f"PostgreSQL did not start:\n{started.stderr}\n{log.read_text()}")
        else:
            pytest.fail(f"no free port for PostgreSQL after {PORT_TRIES} tries")
        try:
            yield Postgres("127.0.0.1", port, "vaelab", folder)
        finally:
            # immediate: a throwaway cluster needs no clean shutdown, and clients may linger.
            subprocess.run(
                [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                cwd=folder, capture_output=True, timeout=60, **account,
            )  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class S3:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def read(self, key: str) -> bytes:
        """The bytes of the bucket's object ``key``."""
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> dict[str, int]:
        """{key: size} of the bucket's objects under ``prefix``."""
        found: dict[str, int] = {}
        pages = self.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
            found |= {entry["Key"]: entry["Size"] for entry in page.get("Contents", [])}
        return found


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to a server's whole process group (it may have forked workers), then SIGKILL to
    whatever is left of it after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)


def _answers(process: subprocess.Popen, endpoint: str) -> bool:
    """Wait until moto's own status page answers at ``endpoint`` (only moto has that page);
    False when the process exits or START_TIMEOUT_S passes first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5):
                return True
        except OSError:
            time.sleep(0.3)
    return False


@contextlib.contextmanager
def running_s3(folder: Path, bucket: str = "vaelab-team") -> Iterator[S3]:
    """moto's S3 server (objects in memory) on a free port of 127.0.0.1 with ``bucket``
    created; stopped on exit. Its log is ``folder``/s3.log."""
    folder.mkdir(parents=True, exist_ok=True)
    moto = Path(sys.executable).parent / "moto_server"
    log_path = folder / "s3.log"
    for _ in range(PORT_TRIES):
        port = free_port()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        endpoint = f"http://127.0.0.1:{port}"
        if _answers(process, endpoint):
            break
        output = log_path.read_text()
        stop_group(process)
        if "address already in use" not in output.lower():
            pytest.fail(f"the S3 server did not start in {START_TIMEOUT_S} s:\n{output[-3000:]}")
    else:
        pytest.fail(f"no free port for the S3 server after {PORT_TRIES} tries")
    try:
        s3 = S3(endpoint, bucket)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        stop_group(process)
