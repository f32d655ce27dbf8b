"""Shared fixtures: a PostgreSQL server, fresh collector databases, a stoppable proxy.

The server is the one named by SOLARFLEET_TEST_PG_DSN (an admin connection string), or
else an embedded pgserver in a temporary directory. Every database a test creates is
dropped after it, and any left over is dropped at the end of the session.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from collector import embedded, migrate
from collector.config import CollectorConfig, DatabaseConfig, ServerConfig, ShardConfig
from collector.databases import create_database, drop_database, dsn_for

TEST_PG_DSN_ENV = "SOLARFLEET_TEST_PG_DSN"
_created_databases: set[str] = set()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """Admin connection string of the PostgreSQL server the tests use."""
    dsn = os.environ.get(TEST_PG_DSN_ENV)
    if dsn:
        yield dsn
        _drop_leftovers(dsn)
        return
    # Not under pytest's tmp_path: pytest keeps that 0700 for root, and the embedded
    # server, which runs as the `pgserver` user, shuts down once it cannot reach its
    # data directory.
    root = Path(tempfile.mkdtemp(prefix="solarfleet-test-pg-"))
    server = embedded.start(root / "data")
    try:
        yield server.admin_dsn
        _drop_leftovers(server.admin_dsn)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _drop_leftovers(admin_dsn: str) -> None:
    for name in sorted(_created_databases):
        drop_database(admin_dsn, name)
    _created_databases.clear()


@dataclass(frozen=True)
class CollectorDatabases:
    """A migrated catalog and two shards, named uniquely for one test."""

    admin_dsn: str
    catalog_dsn: str
    shards: tuple[ShardConfig, ...]

    @property
    def names(self) -> list[str]:
        return [conninfo_to_dict(d)["dbname"] for d in self.dsns]

    @property
    def dsns(self) -> list[str]:
        return [self.catalog_dsn, *(s.dsn for s in self.shards)]

    def config(self, **server: object) -> CollectorConfig:
        """A collector config for these databases, with [server] keys overridden."""
        options = {"port": 0, "shard_timeout": 1.0} | server
        database = DatabaseConfig(catalog=self.catalog_dsn, shards=self.shards)
        return CollectorConfig(ServerConfig(**options), database)  # type: ignore[arg-type]

    def shard_dsn(self, name: str) -> str:
        return next(s.dsn for s in self.shards if s.name == name)


_SESSION = secrets.token_hex(4)
_KEEP_TABLES = ("schema_migrations", "shards")


def _create_set(admin_dsn: str) -> CollectorDatabases:
    prefix = f"sf_test_{_SESSION}_{secrets.token_hex(3)}"
    names = [f"{prefix}_catalog", f"{prefix}_shard_1", f"{prefix}_shard_2"]
    for name in names:
        _created_databases.add(name)
        create_database(admin_dsn, name)
    shards = (
        ShardConfig("shard-1", dsn_for(admin_dsn, names[1])),
        ShardConfig("shard-2", dsn_for(admin_dsn, names[2])),
    )
    return CollectorDatabases(admin_dsn, dsn_for(admin_dsn, names[0]), shards)


def _empty_tables(dsn: str) -> None:
    """Delete every row except the schema's version and the shard map; restart ids."""
    with psycopg.connect(dsn) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> ALL(%s)",
                (list(_KEEP_TABLES),),
            )
        ]
        if tables:
            names = sql.SQL(", ").join(sql.Identifier(t) for t in tables)
            conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(names))


def _drop_set(dbs: CollectorDatabases) -> None:
    for name in dbs.names:
        drop_database(dbs.admin_dsn, name)
        _created_databases.discard(name)


@pytest.fixture
def empty_databases(pg_admin_dsn: str) -> Iterator[CollectorDatabases]:
    """A catalog and two shard databases without schema, dropped after the test."""
    dbs = _create_set(pg_admin_dsn)
    yield dbs
    _drop_set(dbs)


@pytest.fixture(scope="module")
def module_databases(pg_admin_dsn: str) -> Iterator[CollectorDatabases]:
    """A migrated catalog and two shards for one test module, dropped after it."""
    dbs = _create_set(pg_admin_dsn)
    migrate.migrate_all(migrate.Databases(dbs.catalog_dsn, dbs.shards))
    yield dbs
    _drop_set(dbs)


@pytest.fixture
def collector_databases(module_databases: CollectorDatabases) -> CollectorDatabases:
    """The module's migrated catalog (shard-1 and shard-2 registered) and shards, with
    every other table emptied and ids restarting at 1."""
    for dsn in module_databases.dsns:
        _empty_tables(dsn)
    return module_databases


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of a PostgreSQL server, that a test can stop.

    Stopping closes the listener and cuts every open connection, as a network outage
    would; starting again listens on the same port.
    """

    def __init__(self, target_dsn: str) -> None:
        params = conninfo_to_dict(target_dsn)
        self._target_dsn = target_dsn
        host = str(params.get("host") or "127.0.0.1")
        port = int(params.get("port") or 5432)
        self._unix_path = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._address = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def dsn(self) -> str:
        """The target's connection string, through this proxy."""
        return make_conninfo(self._target_dsn, host="127.0.0.1", port=str(self.port))

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            if self._unix_path:
                up_reader, up_writer = await asyncio.open_unix_connection(
                    self._unix_path
                )
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._address)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # stopped while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


@pytest.fixture
def proxy_factory() -> Iterator[type[TcpProxy]]:
    """Make started TcpProxy instances for target DSNs, closed after the test."""
    proxies: list[TcpProxy] = []

    def make(target_dsn: str) -> TcpProxy:
        proxy = TcpProxy(target_dsn)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make  # type: ignore[misc]
    for proxy in proxies:
        proxy.close()
