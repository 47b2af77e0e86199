"""A throwaway PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temporary directory,
listening on 127.0.0.1 (a free port) with its unix socket in that directory, trust auth, no fsync.

PostgreSQL refuses to run as root: as root, the server runs as an unprivileged user (``postgres``,
else ``nobody``) through ``runuser``; otherwise as the current user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

USER = "nestar"  # the server's superuser (trust auth: no password)
DATABASE = "nestar_test"


def server_bin() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl``, ``postgres`` (newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates = [Path(p) for p in reversed(found)]
    which = shutil.which("initdb")
    if which:
        candidates.append(Path(os.path.realpath(which)).parent)
    for path in candidates:
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def run_as() -> tuple[list[str], pwd.struct_passwd | None] | None:
    """The command prefix running the server as an unprivileged user, and that user (None: as
    ourselves); None when running as root without a usable account or ``runuser``."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if not runuser:
        return None
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return [runuser, "-u", name, "--"], user
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``start()`` returns a SQLAlchemy URL (``postgresql://nestar@127.0.0.1:PORT/nestar_test``),
    ``stop()`` stops the server and removes its directory."""

    def __init__(self, bin_dir: Path, prefix: list[str], user: pwd.struct_passwd | None):
        self.bin, self.prefix, self.user = bin_dir, prefix, user
        self.root = Path(tempfile.mkdtemp(prefix="nestar-pg-"))  # under /tmp: the server user can reach it
        self.data = self.root / "data"
        self.port: int | None = None
        self.started = False

    def _as_server(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run([*self.prefix, *cmd], capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=self.root)  # fmt: skip

    def start(self) -> str:
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        out = self._as_server(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust",
                              "-E", "UTF8", "--no-locale", "--no-sync")  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"initdb failed: {out.stderr.strip() or out.stdout.strip()}")
        for _ in range(3):  # a port taken between choosing it and binding it: choose again
            self.port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")  # fmt: skip
            out = self._as_server(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                                  "-w", "-t", "60", "-o", opts, "start")  # fmt: skip
            if out.returncode == 0:
                self.started = True
                break
        else:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").is_file() else ""
            raise RuntimeError(f"pg_ctl start failed: {out.stderr.strip()} {log[-2000:]}")
        createdb = self.bin / "createdb"
        cmd = [str(createdb)] if createdb.is_file() else None
        if cmd is None:
            raise RuntimeError(f"no createdb in {self.bin}")
        out = subprocess.run([*cmd, "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DATABASE],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"createdb failed: {out.stderr.strip()}")
        return self.url

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self) -> None:
        try:
            if self.started:
                self._as_server(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
