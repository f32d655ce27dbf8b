"""A shard that is down when the collector starts is migrated once it is back."""

from __future__ import annotations

import dataclasses

import pytest

from collector import catalog, migrate
from collector.config import ShardConfig
from conftest import CollectorDatabases
from collector_http import READINGS_A, make_batch, post, start_client

pytestmark = pytest.mark.postgres


async def test_down_shard_migrated_later(
    empty_databases: CollectorDatabases, proxy_factory
) -> None:
    dbs = empty_databases
    proxy = proxy_factory(dbs.shard_dsn("shard-2"))
    shards = (dbs.shards[0], ShardConfig("shard-2", proxy.dsn))
    migrate.migrate(dbs.catalog_dsn, "catalog")
    # A shard map written before shards were registered only once migrated.
    catalog.register_shard(dbs.catalog_dsn, "shard-2", proxy.dsn)
    owner = catalog.add_owner(dbs.catalog_dsn, "Alice Meyer")
    site_b = catalog.add_installation(dbs.catalog_dsn, "Barn B", owner.id, "shard-2")
    _, token_b = catalog.add_gateway(dbs.catalog_dsn, "gw-b", site_b.id)
    proxy.stop()
    client = await start_client(dataclasses.replace(dbs, shards=shards).config())
    try:
        while_down = await post(client, token_b, make_batch("gw-b", READINGS_A))
        proxy.start()
        after = await post(client, token_b, make_batch("gw-b", READINGS_A))
    finally:
        await client.close()

    assert while_down == (
        503,
        {"error": "shard shard-2 is not migrated yet, retry later"},
    )
    assert after[0] == 200
    assert after[1]["stored"] == len(READINGS_A)
