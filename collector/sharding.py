"""Shard routing: one connection pool per shard database.

A request for an installation gets a connection of the installation's shard. A shard
that cannot be reached raises `ShardUnavailable`, which affects only its installations.
A shard that could not be migrated at startup is migrated before its first use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from collector.config import ShardConfig
from collector.errors import DatabaseError, ShardUnavailable
from collector.outage import Outage, filter_pool_warnings

logger = logging.getLogger(__name__)

POOL_MAX_SIZE = 10


class ShardPools:
    """Connection pools of every configured shard, by shard name.

    A pool retries a failed connection with growing delays, and gives up after
    `reconnect_timeout`; the next request then starts a fresh attempt at once. Setting
    it to the request timeout bounds how long a recovered shard waits to be used again.

    NOTE: after a network cut every pooled connection fails its check, and psycopg_pool
    3.3 waits about a second between such checks. A timeout under about 2 seconds can
    therefore fail the first request after a cut although the shard is reachable again.
    """

    def __init__(
        self,
        shards: Sequence[ShardConfig],
        timeout: float,
        pending: Collection[str] = (),
        migrate_shard: Callable[[ShardConfig], object] | None = None,
    ) -> None:
        """`pending` names shards to migrate with `migrate_shard`, a blocking call
        run in a thread, before they lend their first connection."""
        self._timeout = timeout
        self._configs = {shard.name: shard for shard in shards}
        self._pending = set(pending) if migrate_shard is not None else set()
        self._migrate_shard = migrate_shard
        self._migrations = {name: asyncio.Lock() for name in self._pending}
        # psycopg_pool warns on each failed connect, so only the first of an outage
        # passes. The outage itself is logged by `Outage` on the request path.
        self._pool_warnings = filter_pool_warnings()
        self._pools = {
            shard.name: AsyncConnectionPool(
                shard.dsn,
                min_size=1,
                max_size=POOL_MAX_SIZE,
                open=False,
                name=shard.name,
                timeout=timeout,
                reconnect_timeout=timeout,
                check=AsyncConnectionPool.check_connection,
                configure=self._connect_hook(shard.name),
            )
            for shard in shards
        }
        self._outages = {name: Outage(logger, f"shard {name}") for name in self._pools}

    @property
    def names(self) -> list[str]:
        """Names of the configured shards."""
        return list(self._pools)

    async def open(self) -> None:
        """Start the pools. They connect in the background, so a down shard waits."""
        for name, pool in self._pools.items():
            self._pool_warnings.register(name)
            await pool.open(wait=False)

    def _connect_hook(
        self, shard: str
    ) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
        """Return the pool's `configure` callback: a new connection ends an outage."""

        async def connected(conn: psycopg.AsyncConnection[Any]) -> None:
            self._pool_warnings.recovered(shard)

        return connected

    async def close(self) -> None:
        """Close every pool, ending its connections."""
        for pool in self._pools.values():
            await pool.close()

    def is_down(self, shard: str) -> bool:
        """True if the last request to `shard` failed to reach it, or it is not
        migrated yet."""
        return shard in self._pending or self._outages[shard].down

    @asynccontextmanager
    async def connection(
        self, shard: str
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Lend a connection of `shard`.

        :raises ShardUnavailable: the shard is not configured, no connection came within
            the timeout, or the connection broke while in use.
        """
        pool = self._pools.get(shard)
        if pool is None:
            raise ShardUnavailable(f"shard {shard!r} is not in the collector's config")
        outage = self._outages[shard]
        if shard in self._pending:
            await self._migrate(shard)
        try:
            async with pool.connection() as conn:
                yield conn
        except (
            psycopg.OperationalError
        ) as err:  # includes PoolTimeout, lost connections
            outage.failed(err)
            raise ShardUnavailable(
                f"shard {shard} is unavailable, retry later"
            ) from err
        outage.recovered()

    async def _migrate(self, shard: str) -> None:
        """Migrate a shard that was unreachable at startup, once.

        :raises ShardUnavailable: the migration failed; the next request tries again.
        """
        assert self._migrate_shard is not None
        async with self._migrations[shard]:
            if shard not in self._pending:
                return  # migrated by a concurrent request
            try:
                await asyncio.to_thread(self._migrate_shard, self._configs[shard])
            except DatabaseError as err:
                self._outages[shard].failed(err)
                raise ShardUnavailable(
                    f"shard {shard} is not migrated yet, retry later"
                ) from err
            self._pending.discard(shard)
        logger.info("migrated shard %s, which was unreachable at startup", shard)
