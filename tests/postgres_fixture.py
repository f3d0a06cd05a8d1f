"""A real PostgreSQL for the journal's tests: `initdb` in a temporary directory, `postgres` on
a free loopback port as an unprivileged user (as root: the `postgres` system user, or
`nobody`, set on the process itself so that stopping it signals postgres and no wrapper), a
fresh database per test. Password authentication over TCP, so the URL carries a
password as a deployment's does. Missing binaries = a failing fixture naming the install
command (never a silent skip)."""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from helpers import end_process, free_port, server_in_temp_dir

INSTALL = "apt-get install -y postgresql"
USER, PASSWORD = "gateway", "pg-secret-for-tests-7731"
_databases = itertools.count(1)


def _binaries() -> tuple[str, str]:
    """initdb and postgres: on PATH, or in Debian's versioned folder."""
    found = shutil.which("initdb"), shutil.which("postgres")
    if all(found):
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        initdb, postgres = os.path.join(folder, "initdb"), os.path.join(folder, "postgres")
        if os.access(initdb, os.X_OK) and os.access(postgres, os.X_OK):
            return initdb, postgres
    pytest.fail(f"PostgreSQL is not installed; install it with: {INSTALL} "
                f"(or run scripts/system-deps.sh as root)", pytrace=False)


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as an unprivileged system user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root with neither a 'postgres' nor a 'nobody' user to run PostgreSQL as",
                pytrace=False)


class PostgresServer:
    def __init__(self, directory: Path) -> None:
        """`directory`: an empty folder the unprivileged user can reach (not under pytest's
        tmp_path, whose parents only root may enter)."""
        self.initdb, self.postgres = _binaries()
        self.user = _run_as()
        self.directory, self.port = directory, free_port()
        self.data = directory / "data"
        self.process: subprocess.Popen | None = None
        if self.user:  # the unprivileged user owns the directory it writes
            os.chown(directory, self.user.pw_uid, self.user.pw_gid)
            os.chmod(directory, 0o700)

    def _as_user(self) -> dict:
        """Popen arguments that run a process as the unprivileged user (nothing if not root)."""
        if not self.user:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": str(self.directory), "USER": self.user.pw_name}}

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """initdb (the first time), then postgres; returns once it accepts connections."""
        if not self.data.exists():
            self._initdb()
        with open(self.directory / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.postgres, "-D", str(self.data), "-p", str(self.port), "-k", str(self.directory),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=300"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.directory,
                **self._as_user())
        self._wait_until_ready()

    def _initdb(self) -> None:
        password_file = self.directory / "password"
        password_file.write_text(PASSWORD)
        if self.user:
            os.chown(password_file, self.user.pw_uid, self.user.pw_gid)
        subprocess.run([self.initdb, "-D", str(self.data), "-U", USER, "--pwfile", str(password_file),
                        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, cwd=self.directory, **self._as_user())

    def _wait_until_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.directory / "postgres.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"postgres did not accept connections on port {self.port}:\n{output}")
            time.sleep(0.1)

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"test_{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is None:
            return
        end_process(self.process, signal.SIGINT, 10)  # "fast" shutdown: clients are disconnected, not waited for
        self.process = None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with server_in_temp_dir(PostgresServer, "postgres-test-") as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL, for this test."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, which it may stop and start again."""
    with server_in_temp_dir(PostgresServer, "postgres-test-") as server:
        yield server
