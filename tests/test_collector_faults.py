"""Faults between gateway and shard: resends, lost replies, a stopped shard, bad clocks.

Real HTTP on 127.0.0.1 and real PostgreSQL; every count is exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp.test_utils import TestClient

from collector.config import ShardConfig
from collector_http import T0, Fleet, add_fleet, make_batch, post, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config())
    yield client
    await client.close()


def watts(first: int, count: int) -> list[list[Any]]:
    """Readings of sn-1 701.W at T0 + 10 s * i for i in first..first+count-1."""
    return [
        ["sn-1", "701.W", T0 + i * 10_000, float(1000 + i)]
        for i in range(first, first + count)
    ]


def stored_watts(dsn: str) -> list[tuple[int, float]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT (extract(epoch FROM time) * 1000)::bigint, value FROM readings "
            "ORDER BY time"
        ).fetchall()


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def reply(batch: dict[str, Any], stored: int, duplicates: int, rejected: int = 0):
    return (
        200,
        {
            "batch_id": batch["batch_id"],
            "stored": stored,
            "duplicates": duplicates,
            "rejected": rejected,
        },
    )


async def test_resend_reversed_stored_once(client: TestClient, fleet: Fleet) -> None:
    first = make_batch("gw-a", watts(0, 6))
    again = make_batch("gw-a", watts(0, 6)[::-1])

    assert await post(client, fleet.token_a, first) == reply(first, 6, 0)
    assert await post(client, fleet.token_a, again) == reply(again, 0, 6)

    assert stored_watts(fleet.dbs.shard_dsn("shard-1")) == [
        (T0 + i * 10_000, 1000.0 + i) for i in range(6)
    ]


async def test_resend_half_old_half_new(client: TestClient, fleet: Fleet) -> None:
    first = make_batch("gw-a", watts(0, 4))
    mixed = make_batch("gw-a", (watts(2, 2) + watts(4, 2))[::-1])

    assert await post(client, fleet.token_a, first) == reply(first, 4, 0)
    assert await post(client, fleet.token_a, mixed) == reply(mixed, 2, 2)

    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 6


async def test_resend_interleaved_with_new(client: TestClient, fleet: Fleet) -> None:
    # Newer polls arrive first, then the backlog, with resends of both in between.
    live = make_batch("gw-a", watts(10, 4))
    backlog = make_batch("gw-a", watts(0, 4))
    half_live = make_batch("gw-a", watts(12, 2)[::-1] + watts(14, 2))
    half_backlog = make_batch("gw-a", watts(4, 2) + watts(0, 2)[::-1])
    older = make_batch("gw-a", watts(6, 4)[::-1])

    replies = [
        await post(client, fleet.token_a, batch)
        for batch in (live, half_live, backlog, half_backlog, live, older)
    ]

    assert replies == [
        reply(live, 4, 0),
        reply(half_live, 2, 2),
        reply(backlog, 4, 0),
        reply(half_backlog, 2, 2),
        reply(live, 0, 4),
        reply(older, 4, 0),
    ]
    assert stored_watts(fleet.dbs.shard_dsn("shard-1")) == [
        (T0 + i * 10_000, 1000.0 + i) for i in range(16)
    ]
    assert count(fleet.dbs.shard_dsn("shard-1"), "batches") == 5


async def test_latest_value_after_reorder(client: TestClient, fleet: Fleet) -> None:
    await post(client, fleet.token_a, make_batch("gw-a", watts(5, 1)))
    await post(client, fleet.token_a, make_batch("gw-a", watts(0, 5)))

    with psycopg.connect(fleet.dbs.shard_dsn("shard-1")) as conn:
        latest = conn.execute(
            "SELECT (extract(epoch FROM last_time) * 1000)::bigint, last_value "
            "FROM channels"
        ).fetchall()
    assert latest == [(T0 + 50_000, 1005.0)]


async def test_bad_clock_readings_counted(
    client: TestClient, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    now_ms = time.time_ns() // 1_000_000
    readings = [
        ["sn-1", "701.W", T0, 1.0],
        ["sn-1", "701.W", now_ms + 60_000, 2.0],  # within the 300 s tolerance
        ["sn-1", "701.W", now_ms + 3_600_000, 3.0],
        ["sn-1", "701.W", 1_000, 4.0],
        ["sn-1", "701.W", 0, 5.0],
    ]
    states = [["sn-1", T0, "online"], ["sn-1", 1_000, "online"]]
    batch = make_batch("gw-a", readings, states=states)

    with caplog.at_level(logging.WARNING, logger="collector.app"):
        status, body = await post(client, fleet.token_a, batch)

    assert (status, body) == reply(batch, 2, 0, rejected=3)
    shard = fleet.dbs.shard_dsn("shard-1")
    assert [value for _, value in stored_watts(shard)] == [1.0, 2.0]
    assert count(shard, "device_states") == 1
    with psycopg.connect(shard) as conn:
        row = conn.execute("SELECT readings, stored, rejected FROM batches").fetchone()
    assert row == (2, 2, 3)
    messages = [r.getMessage() for r in caplog.records if r.name == "collector.app"]
    assert messages == [
        f"gateway gw-a batch {batch['batch_id']}: left out 1 readings stamped more "
        "than 300 s ahead of the collector's clock, 2 readings stamped before "
        "2000-01-01, 1 states and 0 gaps with such times: check the gateway's clock"
    ]


async def test_bad_clock_tolerance_configurable(fleet: Fleet) -> None:
    client = await start_client(fleet.dbs.config(future_tolerance=7200.0))
    now_ms = time.time_ns() // 1_000_000
    batch = make_batch("gw-a", [["sn-1", "701.W", now_ms + 3_600_000, 3.0]])
    try:
        result = await post(client, fleet.token_a, batch)
    finally:
        await client.close()

    assert result == reply(batch, 1, 0)


class ReplyDropper:
    """An HTTP proxy on 127.0.0.1 that forwards requests but never a reply.

    When the upstream server starts to reply, the proxy cuts the client's connection
    and sets `replied`, so the client sees the connection drop after the server did
    all its work.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.replied = asyncio.Event()
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        forward = asyncio.create_task(self._forward(reader, up_writer))
        await up_reader.read(1)  # the first byte of the reply
        self.replied.set()
        forward.cancel()
        writer.transport.abort()
        up_writer.transport.abort()

    @staticmethod
    async def _forward(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def test_lost_reply_resend_stored_once(client: TestClient, fleet: Fleet) -> None:
    batch = make_batch("gw-a", watts(0, 5))
    data = gzip.compress(json.dumps(batch).encode())
    headers = {
        "Authorization": f"Bearer {fleet.token_a}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    dropper = ReplyDropper(client.port)
    await dropper.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{dropper.port}/api/v1/batches"
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.post(url, data=data, headers=headers)
    finally:
        await dropper.close()
    assert dropper.replied.is_set()
    shard = fleet.dbs.shard_dsn("shard-1")
    assert count(shard, "readings") == 5

    resent = await post(client, fleet.token_a, batch)

    assert resent == reply(batch, 0, 5)
    assert count(shard, "readings") == 5
    assert count(shard, "batches") == 1


async def test_stopped_shard_resend_once(fleet: Fleet, proxy_factory) -> None:
    proxy = proxy_factory(fleet.dbs.shard_dsn("shard-1"))
    shards = (ShardConfig("shard-1", proxy.dsn), fleet.dbs.shards[1])
    config = fleet.dbs.config(shard_timeout=3.0)
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, shards=shards)
    )
    held = make_batch("gw-a", watts(0, 3) + watts(3, 3))
    other = make_batch("gw-b", watts(0, 4))
    client = await start_client(config)
    try:
        before = await post(client, fleet.token_a, make_batch("gw-a", watts(0, 3)))
        proxy.stop()
        down = await post(client, fleet.token_a, held)
        elsewhere = await post(client, fleet.token_b, other)
        proxy.start()
        resent = await post(client, fleet.token_a, held)
        again = await post(client, fleet.token_a, held)
    finally:
        await client.close()

    assert before[0] == 200
    assert down == (503, {"error": "shard shard-1 is unavailable, retry later"})
    assert elsewhere == reply(other, 4, 0)
    assert resent == reply(held, 3, 3)
    assert again == reply(held, 0, 6)
    assert stored_watts(fleet.dbs.shard_dsn("shard-1")) == [
        (T0 + i * 10_000, 1000.0 + i) for i in range(6)
    ]
    assert count(fleet.dbs.shard_dsn("shard-2"), "readings") == 4
