"""A throwaway PostgreSQL cluster: ``initdb`` + ``pg_ctl`` in a temporary directory.

Used by the multi-worker search tests and ``benchmarks/search.py``. The server listens on
127.0.0.1 on a free port (and a Unix socket in the same directory), trusts local connections,
runs without fsync (nothing in it outlives the test), and is stopped and deleted on exit.
``initdb`` refuses to run as root: as root, the cluster belongs to the ``postgres`` user that
Debian's package creates (else ``nobody``) and its programs run through ``runuser``/``su``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "slimline"
DRIVER = "psycopg"  # SQLAlchemy 2.1's default driver for postgresql:// URLs (psycopg 3)


def bin_dir() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def why_not() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if bin_dir() is None:
        return ("no PostgreSQL server programs (initdb, pg_ctl on PATH or in "
                "/usr/lib/postgresql/*/bin): install Debian's postgresql package (.ci/run does)")
    if importlib.util.find_spec(DRIVER) is None:
        return "no PostgreSQL driver for SQLAlchemy: pip install 'psycopg[binary]'"
    return None


def _owner() -> str | None:
    """The user the cluster runs as: None (this one) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run initdb as")


def _as_owner(owner: str | None, argv: list[str]) -> list[str]:
    if owner is None:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", owner, "--", *argv]
    import shlex

    return ["su", owner, "-s", "/bin/sh", "-c", shlex.join(argv)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Cluster:
    """A running throwaway server."""

    port: int
    directory: Path
    bin: Path
    owner: str | None

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        _run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
              "-U", SUPERUSER, name])
        return self.url(name)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """Start a cluster; stop it (immediate) and delete its directory on exit."""
    bin_path = bin_dir()
    if bin_path is None:
        raise RuntimeError(why_not() or "no PostgreSQL")
    owner = _owner()
    directory = Path(tempfile.mkdtemp(prefix="slimline-pg-"))
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    data, log = directory / "data", directory / "server.log"
    started = False
    try:
        _run(_as_owner(owner, [str(bin_path / "initdb"), "-D", str(data), "-U", SUPERUSER,
                               "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"]))
        port = _start(bin_path, owner, data, log, directory)
        started = True
        yield Cluster(port, directory, bin_path, owner)
    finally:
        if started:
            subprocess.run(_as_owner(owner, [str(bin_path / "pg_ctl"), "-D", str(data), "-m",
                                             "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(directory, ignore_errors=True)


def _start(bin_path: Path, owner: str | None, data: Path, log: Path, directory: Path) -> int:
    """``pg_ctl start`` on a free port; a second port if another process took the first."""
    error: RuntimeError | None = None
    for _ in range(3):
        port = free_port()
        options = f"-h 127.0.0.1 -p {port} -k {directory} -F -c max_connections=200"
        try:
            _run(_as_owner(owner, [str(bin_path / "pg_ctl"), "-D", str(data), "-l", str(log),
                                   "-o", options, "-w", "-t", "60", "start"]))
            return port
        except RuntimeError as failed:
            error = failed
    raise RuntimeError(f"{error}; server log: {log.read_text()[-2000:] if log.exists() else ''}")
