"""A throwaway PostgreSQL server on 127.0.0.1, for the study on a real database server.

initdb into a fresh temporary folder, pg_ctl start on a free port (TCP on 127.0.0.1 only, the
Unix socket inside the data folder), password authentication for every TCP connection, and
pg_ctl stop afterwards, whatever happened. initdb and postgres refuse to run as root: as root the
server runs as the ``postgres`` system user (Debian's packages create it), else as ``nobody``;
its folder is made under the system temporary folder, which that user can reach (pytest's own
temporary folders are private to root).

Use as a pytest fixture (``postgres_server``, module scope: one server per test module; it skips
naming the install commands when the binaries or the driver are missing) or by hand:
``python tests/postgres_server.py`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL = 'bash .ci/install-postgresql.sh (Debian\'s postgresql) and pip install -e ".[postgres]" (psycopg 3)'
ADMIN = "abliterate_admin"
USER = "abliterate"
DRIVER = "postgresql+psycopg"


def find_bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")
             if (Path(p) / "initdb").exists() and (Path(p) / "pg_ctl").exists()]
    found.sort(key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    return found[-1] if found else None


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if find_bin_dir() is None:
        return f"PostgreSQL is not installed (no initdb/pg_ctl); install it with {INSTALL}"
    if importlib.util.find_spec("psycopg") is None:
        return f"the psycopg driver is not installed; install it with {INSTALL}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """Who runs initdb and postgres: None for the current (unprivileged) user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no postgres or nobody user to run the server")


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="abliterate-pg-")))
    port: int = field(default_factory=_free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        user = _server_user()
        ids = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        done = subprocess.run([str(self.bin_dir / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=self.root, **ids)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                               + self.log_tail())
        return done

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def init(self) -> None:
        user = _server_user()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if user is not None:
            for path in (self.root, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", ADMIN, f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions")
        pwfile.unlink()

    def start(self) -> None:
        # fsync off: a test server; an immediate stop still keeps every commit (the kernel has them).
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='{self.data}' "
                   "-c fsync=off -c full_page_writes=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``; ``immediate`` is a crash (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql://{ADMIN}:{self.password}@127.0.0.1:{self.port}/{database}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.admin_url(database), autocommit=True, connect_timeout=10) as conn:
            for statement in statements:
                conn.execute(statement)

    def create_user(self) -> None:
        self.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'")

    def new_database(self, name: str) -> str:
        """A fresh, empty database owned by the workflow's user; its SQLAlchemy URL."""
        name = re.sub(r"\W", "_", name.lower())[:50]
        self.execute(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name} OWNER {USER}")
        return self.url(name)

    def url(self, database: str, password: str | None = None, port: int | None = None) -> str:
        return (f"{DRIVER}://{USER}:{self.password if password is None else password}"
                f"@127.0.0.1:{self.port if port is None else port}/{database}")

    def cleanup(self) -> None:
        if self.running():
            try:
                self.stop("fast")
            except (RuntimeError, subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def started() -> PostgresServer:
    server = PostgresServer(find_bin_dir())
    try:
        server.init()
        server.start()
        server.create_user()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="module")
def postgres_server():
    """A running server with the workflow's user; skips (naming the install commands) where
    PostgreSQL or psycopg is missing. Always stopped and removed afterwards."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    server = started()
    try:
        yield server
    finally:
        server.cleanup()


if __name__ == "__main__":
    import time

    reason = missing()
    if reason:
        raise SystemExit(reason)
    server = started()
    try:
        print(f"study.storage: {server.new_database('abliterate')}\n(Ctrl-C stops and removes the server)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.cleanup()
