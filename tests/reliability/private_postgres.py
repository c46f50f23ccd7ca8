"""A Postgres server of a test's own (``initdb`` and ``pg_ctl`` on a free port), so that the test may stop and
start it; the machine's own server is never touched.

As root (Postgres refuses to run as root) the server runs as the ``postgres`` user, in a folder under the
system's temp folder that user may enter; otherwise as the current user. Without the binaries (looked up
under ``/usr/lib/postgresql/*/bin``, then on ``PATH``) the test is skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from align.ports import free_port

SERVER_USER = "postgres"


def postgres_bin() -> Path | None:
    """The newest installed Postgres's binaries folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PrivatePostgres:
    """One server: :meth:`start` (``initdb`` on the first start), :meth:`stop` (``-m fast``: open connections are
    ended, as when a server is shut down or fails over), :meth:`close` (stopped and its files removed)."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            pytest.skip("no Postgres server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH")
        self.as_user = SERVER_USER if os.geteuid() == 0 else None
        if self.as_user is not None:
            try:
                account = pwd.getpwnam(self.as_user)
            except KeyError:
                pytest.skip(f"running as root and there is no {self.as_user!r} user to run a Postgres server as")
        self.root = Path(tempfile.mkdtemp(prefix="align-pg-"))
        if self.as_user is not None:
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False

    def _run(self, *command: str, timeout: float = 60) -> None:
        words = [str(self.bin / command[0]), *command[1:]]
        if self.as_user is not None:
            words = ["runuser", "-u", self.as_user, "--", *words]
        done = subprocess.run(words, check=False, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command[:1])} failed ({done.returncode}): {done.stderr or done.stdout}"
                               f"\n{log}")

    def start(self) -> None:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        # TCP on loopback only, no Unix socket; no fsync: the data is thrown away with the test.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.running = True

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        self.running = False

    def close(self) -> None:
        try:
            if self.running:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
                self.running = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
