"""Versioned schema for the catalog and the shards, and preparing the databases.

Each database has a `schema_migrations` table. A file `schema/<kind>/NNNN_<name>.sql` is
applied once, in version order, in a transaction of its own that also records it. An
advisory lock serialises collectors migrating the same database at the same time.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from collector import catalog
from collector.config import (
    EMBEDDED_CATALOG,
    EMBEDDED_SHARDS,
    DatabaseConfig,
    ShardConfig,
)
from collector.databases import dbname_of, dsn_without_password
from collector.errors import DatabaseError

if TYPE_CHECKING:
    from collector import embedded

logger = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).parent / "schema"
KINDS = ("catalog", "shard")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('solarfleet.schema_migrations'))"
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    path: Path

    @property
    def label(self) -> str:
        """The file name without `.sql`, for example `0001_catalog`."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class Databases:
    """Connection strings of the catalog and shards, and the embedded server if any.

    `pending_shards` names the shards that `prepare` skipped because they could not
    be migrated; `migrate_shard` migrates each once it is reachable.
    """

    catalog_dsn: str
    shards: tuple[ShardConfig, ...]
    server: embedded.EmbeddedPostgres | None = None
    pending_shards: frozenset[str] = frozenset()

    def close(self) -> None:
        """Release the embedded server, if this process started or attached to one."""
        if self.server is not None:
            self.server.stop()


def migrations(kind: str) -> list[Migration]:
    """Return the migrations of `kind` ("catalog" or "shard") in version order."""
    found = []
    for path in sorted((SCHEMA_DIR / kind).glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise DatabaseError(f"schema file {path} is misnamed: use NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path))
    return found


def migrate(dsn: str, kind: str) -> list[Migration]:
    """Apply the pending migrations of `kind` to the database at `dsn`.

    Returns the migrations applied now; an up-to-date database gives an empty list.

    :raises DatabaseError: the database cannot be reached or a migration fails.
    """
    label = dsn_without_password(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            _create_migrations_table(conn)
            return [m for m in migrations(kind) if _apply(conn, m)]
    except psycopg.Error as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hint = ""
        if "does not exist" in first_line:
            hint = f"; create it first (createdb {dbname_of(dsn)}) and run migrate again"
        raise DatabaseError(
            f"cannot migrate {kind} database {label}: {first_line}{hint}"
        ) from err


def _create_migrations_table(conn: psycopg.Connection) -> None:
    with conn.transaction():
        conn.execute(_LOCK)
        conn.execute(_CREATE_TABLE)


def _apply(conn: psycopg.Connection, migration: Migration) -> bool:
    with conn.transaction():
        conn.execute(_LOCK)
        applied = conn.execute(
            "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
        ).fetchone()
        if applied:
            return False
        conn.execute(migration.path.read_text())  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )
    logger.info("applied %s to %s", migration.label, dbname_of(conn.info.dsn))
    return True


def open_databases(config: DatabaseConfig) -> Databases:
    """Resolve the catalog and shard databases, starting the embedded server if needed.

    With an embedded server, the catalog and shard databases are created when missing.
    Configured servers are used as they are: their databases must exist.
    """
    if not config.embedded:
        assert config.catalog is not None
        return Databases(config.catalog, config.shards)
    # Imported only here because importing pgserver is slow and warns without
    # XDG_RUNTIME_DIR.
    from collector import embedded

    server = embedded.start(config.embedded_dir)
    catalog_dsn = server.create_database(EMBEDDED_CATALOG)
    shards = tuple(
        ShardConfig(name, server.create_database(dbname))
        for name, dbname in EMBEDDED_SHARDS
    )
    return Databases(catalog_dsn, shards, server)


def migrate_all(
    dbs: Databases, *, skip_unreachable_shards: bool = False
) -> dict[str, list[Migration]]:
    """Migrate the catalog and every shard, and register the shards in the catalog.

    Returns the migrations applied, by database ("catalog" or the shard's name). With
    `skip_unreachable_shards`, a shard that fails is logged and left out of the
    result, so one shard that is down does not keep the collector from serving the
    others.

    :raises DatabaseError: the catalog, or a shard when not skipped, cannot be migrated.
    """
    applied = {"catalog": migrate(dbs.catalog_dsn, "catalog")}
    for shard in dbs.shards:
        try:
            applied[shard.name] = migrate_shard(dbs.catalog_dsn, shard)
        except DatabaseError as err:
            if not skip_unreachable_shards:
                raise
            logger.warning("shard %s left unmigrated: %s", shard.name, err)
    return applied


def migrate_shard(catalog_dsn: str, shard: ShardConfig) -> list[Migration]:
    """Migrate one shard, then register it in the catalog's shard map.

    A shard is registered only once migrated, because `installations add` places new
    installations on registered shards.

    :raises DatabaseError: the shard cannot be migrated or the catalog not updated.
    """
    applied = migrate(shard.dsn, "shard")
    catalog.register_shard(catalog_dsn, shard.name, dsn_without_password(shard.dsn))
    return applied


def is_migrated(dsn: str, kind: str) -> bool:
    """True if the database at `dsn` is reachable and has every migration of `kind`."""
    latest = max(m.version for m in migrations(kind))
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    except psycopg.Error as err:
        logger.debug("%s database %s not ready: %s", kind, dbname_of(dsn), err)
        return False
    return row is not None and row[0] == latest


def prepare(
    config: DatabaseConfig, *, skip_unreachable_shards: bool = False
) -> Databases:
    """Open (see `open_databases`) and migrate the catalog and the shards.

    The shards skipped with `skip_unreachable_shards` are named in `pending_shards`.
    """
    dbs = open_databases(config)
    try:
        applied = migrate_all(dbs, skip_unreachable_shards=skip_unreachable_shards)
    except BaseException:
        dbs.close()
        raise
    pending = frozenset(s.name for s in dbs.shards if s.name not in applied)
    return dataclasses.replace(dbs, pending_shards=pending)
