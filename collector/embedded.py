"""Embedded PostgreSQL (pgserver) for a first start, the demo and tests.

pgserver ships the PostgreSQL binaries in its wheel, runs the server from a data
directory and listens only on a Unix socket inside it. Run as root, it runs the server
as a system user named `pgserver`, which it creates.
"""

from __future__ import annotations

import logging
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

# pgserver keeps its lock file in the user's runtime directory. Without XDG_RUNTIME_DIR
# (systemd services, containers, CI) platformdirs falls back to /tmp/runtime-<uid>, which
# works, but warns at import time on every start.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pgserver

from collector import databases
from collector.errors import DatabaseError

logger = logging.getLogger(__name__)

# pgserver keeps one handle per data directory and process, so nested start() calls in
# one process share it. The handle is released when the last of them stops.
_handles: dict[Path, int] = {}


@dataclass(frozen=True, slots=True)
class EmbeddedPostgres:
    """A running embedded PostgreSQL server and its data directory."""

    datadir: Path
    server: pgserver.PostgresServer

    @property
    def admin_dsn(self) -> str:
        """Connection string of the `postgres` database, as superuser."""
        return self.server.get_uri()

    def dsn(self, dbname: str) -> str:
        """Return the connection string of database `dbname` on this server."""
        return self.server.get_uri(dbname)

    def create_database(self, dbname: str) -> str:
        """Create `dbname` unless it exists and return its connection string."""
        databases.create_database(self.admin_dsn, dbname)
        return self.dsn(dbname)

    def stop(self) -> None:
        """Release this handle. The last handle of the last process stops the server."""
        _handles[self.datadir] -= 1
        if _handles[self.datadir] > 0:
            return
        del _handles[self.datadir]
        self.server.cleanup()
        logger.info("released embedded PostgreSQL at %s", self.datadir)


def start(datadir: Path | str) -> EmbeddedPostgres:
    """Start (or attach to) the embedded PostgreSQL whose data lives in `datadir`.

    The directory is created, with its parents, and initialised on first use; its data
    is kept when the server stops.

    :raises DatabaseError: the server cannot be initialised or started.
    """
    path = Path(datadir).expanduser().resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(path, cleanup_mode="stop")
    except (OSError, subprocess.SubprocessError) as err:
        raise DatabaseError(
            f"cannot start embedded PostgreSQL in {path}: {err}; "
            f"check that the directory is writable and see {path / 'log'}"
        ) from err
    _handles[path] = _handles.get(path, 0) + 1
    logger.info("embedded PostgreSQL running in %s", path)
    return EmbeddedPostgres(datadir=path, server=server)
