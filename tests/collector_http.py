"""Helpers for collector HTTP tests: a two-shard fleet, batches, and posting them."""

from __future__ import annotations

import gzip
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from collector import catalog
from collector.app import create_app
from collector.config import CollectorConfig
from conftest import CollectorDatabases

T0 = 1_764_864_000_000  # 2025-12-04 16:00:00 UTC

READINGS_A = [
    ["sn-1", "701.W", T0, 9800.0],
    ["sn-1", "701.W", T0 + 10_000, 9750.5],
    ["sn-1", "701.PhVphB", T0, None],
    ["sn-2", "160.module[2].DCW", T0, 1234],
]


@dataclass(frozen=True)
class Fleet:
    """Two installations, one per shard, each with one gateway, and an operator key."""

    dbs: CollectorDatabases
    installation_a: int
    installation_b: int
    token_a: str
    token_b: str
    operator_key: str


async def start_client(config: CollectorConfig) -> TestClient:
    """Start the collector app on a free port of 127.0.0.1 and a client for it."""
    client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    return client


def make_batch(
    gateway_id: str,
    readings: list[list[Any]],
    *,
    batch_id: str | None = None,
    states: list[list[Any]] | None = None,
) -> dict[str, Any]:
    channels = sorted({(r[0], r[1]) for r in readings})
    devices = sorted({r[0] for r in readings} | {s[0] for s in states or []})
    return {
        "format": 1,
        "batch_id": batch_id or str(uuid.uuid4()),
        "gateway_id": gateway_id,
        "devices": [
            {
                "device_id": d,
                "name": f"inverter {d}",
                "manufacturer": "SunSpecTest",
                "model": "Test-1547-1",
                "serial": d,
                "version": "1.2.3",
                "address": "127.0.0.1:5020/1",
            }
            for d in devices
        ],
        "channels": [
            {"device_id": d, "name": c, "unit": "W" if c.endswith("W") else "V"}
            for d, c in channels
        ],
        "readings": readings,
        "states": states or [],
    }


async def post(
    client: TestClient,
    token: str,
    body: dict[str, Any] | bytes,
    *,
    gzipped: bool = True,
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if gzipped:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    response = await client.post("/api/v1/batches", data=data, headers=headers)
    return response.status, await response.json()


def add_fleet(dbs: CollectorDatabases) -> Fleet:
    """Add an owner, installations on shard-1 and shard-2, their gateways and a key."""
    dsn = dbs.catalog_dsn
    owner = catalog.add_owner(dsn, "Alice Meyer")
    site_a = catalog.add_installation(dsn, "Roof A", owner.id, shard="shard-1")
    site_b = catalog.add_installation(dsn, "Barn B", owner.id, shard="shard-2")
    _, token_a = catalog.add_gateway(dsn, "gw-a", site_a.id)
    _, token_b = catalog.add_gateway(dsn, "gw-b", site_b.id)
    _, key = catalog.add_key(dsn, "ops")
    return Fleet(dbs, site_a.id, site_b.id, token_a, token_b, key)
