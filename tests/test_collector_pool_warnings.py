"""Shard pools: psycopg_pool's connect warnings, one per outage of each pool."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from collector.config import ShardConfig
from collector.errors import ShardUnavailable
from collector.sharding import ShardPools


async def select_one(pools: ShardPools, shard: str) -> bool:
    """Run SELECT 1 on the shard; False when the shard is unavailable."""
    try:
        async with pools.connection(shard) as conn:
            await conn.execute("SELECT 1")
    except ShardUnavailable:
        return False
    return True


async def test_pool_warnings_once_per_outage(
    pg_admin_dsn: str, proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    proxy = proxy_factory(pg_admin_dsn)
    pools = ShardPools([ShardConfig("shard-warn", proxy.dsn)], timeout=1.0)
    await pools.open()
    try:
        before = await select_one(pools, "shard-warn")
        proxy.stop()
        # Each failed request waits 1 s, while the pool retries its connection.
        outage = [await select_one(pools, "shard-warn") for _ in range(3)]
        proxy.start()
        after = await select_one(pools, "shard-warn")
        proxy.stop()
        second_outage = await select_one(pools, "shard-warn")
    finally:
        await pools.close()

    assert before is True
    assert outage == [False, False, False]
    assert after is True
    assert second_outage is False
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "psycopg.pool" and "'shard-warn'" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("error connecting in 'shard-warn': ")
    assert warnings[1].startswith("error connecting in 'shard-warn': ")
