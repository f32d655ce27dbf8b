"""Batch ingest over real HTTP into real PostgreSQL shards."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from collector import catalog
from collector_http import (
    READINGS_A,
    T0,
    Fleet,
    add_fleet,
    make_batch,
    post,
    start_client,
)
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config(max_batch_bytes=4096))
    yield client
    await client.close()


def stored_readings(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT r.installation_id, d.device_id, c.name, "
            "(extract(epoch FROM r.time) * 1000)::bigint, r.value "
            "FROM readings r JOIN channels c ON c.id = r.channel_id "
            "JOIN devices d ON d.id = c.device_id ORDER BY 2, 3, 4"
        ).fetchall()


def count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


async def test_batch_stored_on_own_shard_only(client: TestClient, fleet: Fleet) -> None:
    batch = make_batch("gw-a", READINGS_A)

    status, reply = await post(client, fleet.token_a, batch)

    assert status == 200
    assert reply == {
        "batch_id": batch["batch_id"],
        "stored": 4,
        "duplicates": 0,
        "rejected": 0,
    }
    assert stored_readings(fleet.dbs.shard_dsn("shard-1")) == [
        (fleet.installation_a, "sn-1", "701.PhVphB", T0, None),
        (fleet.installation_a, "sn-1", "701.W", T0, 9800.0),
        (fleet.installation_a, "sn-1", "701.W", T0 + 10_000, 9750.5),
        (fleet.installation_a, "sn-2", "160.module[2].DCW", T0, 1234.0),
    ]
    assert count(fleet.dbs.shard_dsn("shard-2"), "readings") == 0
    assert count(fleet.dbs.shard_dsn("shard-2"), "devices") == 0


async def test_batch_registers_devices_and_channels(
    client: TestClient, fleet: Fleet
) -> None:
    await post(client, fleet.token_a, make_batch("gw-a", READINGS_A))

    with psycopg.connect(fleet.dbs.shard_dsn("shard-1")) as conn:
        devices = conn.execute(
            "SELECT installation_id, device_id, name, manufacturer, model, serial, "
            "version, address FROM devices ORDER BY device_id"
        ).fetchall()
        channels = conn.execute(
            "SELECT c.installation_id, d.device_id, c.name, c.parameter, c.unit "
            "FROM channels c JOIN devices d ON d.id = c.device_id ORDER BY 2, 3"
        ).fetchall()
    inst = fleet.installation_a
    assert devices == [
        (
            inst,
            "sn-1",
            "inverter sn-1",
            "SunSpecTest",
            "Test-1547-1",
            "sn-1",
            "1.2.3",
            "127.0.0.1:5020/1",
        ),
        (
            inst,
            "sn-2",
            "inverter sn-2",
            "SunSpecTest",
            "Test-1547-1",
            "sn-2",
            "1.2.3",
            "127.0.0.1:5020/1",
        ),
    ]
    assert channels == [
        (inst, "sn-1", "701.PhVphB", "PhVphB", "V"),
        (inst, "sn-1", "701.W", "W", "W"),
        (inst, "sn-2", "160.module[2].DCW", "DCW", "W"),
    ]


async def test_batch_identity_encoding(client: TestClient, fleet: Fleet) -> None:
    status, reply = await post(
        client, fleet.token_a, make_batch("gw-a", READINGS_A), gzipped=False
    )

    assert status == 200
    assert reply["stored"] == 4


async def test_resent_batch_stored_once(client: TestClient, fleet: Fleet) -> None:
    batch = make_batch("gw-a", READINGS_A)

    first = await post(client, fleet.token_a, batch)
    second = await post(client, fleet.token_a, batch)

    assert first == (
        200,
        {"batch_id": batch["batch_id"], "stored": 4, "duplicates": 0, "rejected": 0},
    )
    assert second == (
        200,
        {"batch_id": batch["batch_id"], "stored": 0, "duplicates": 4, "rejected": 0},
    )
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 4
    assert count(fleet.dbs.shard_dsn("shard-1"), "batches") == 1


async def test_half_resent_batch_stores_new_half(
    client: TestClient, fleet: Fleet
) -> None:
    old = READINGS_A[:2]
    new = [
        ["sn-1", "701.W", T0 + 20_000, 9700.0],
        ["sn-1", "701.W", T0 + 30_000, 9650.0],
    ]
    await post(client, fleet.token_a, make_batch("gw-a", old))

    status, reply = await post(client, fleet.token_a, make_batch("gw-a", old + new))

    assert status == 200
    assert reply["stored"] == 2
    assert reply["duplicates"] == 2
    values = [row[3:] for row in stored_readings(fleet.dbs.shard_dsn("shard-1"))]
    assert values == [
        (T0, 9800.0),
        (T0 + 10_000, 9750.5),
        (T0 + 20_000, 9700.0),
        (T0 + 30_000, 9650.0),
    ]


async def test_repeated_reading_in_batch_stored_once(
    client: TestClient, fleet: Fleet
) -> None:
    readings = [["sn-1", "701.W", T0, 1.0], ["sn-1", "701.W", T0, 1.0]]

    status, reply = await post(client, fleet.token_a, make_batch("gw-a", readings))

    assert status == 200
    assert reply["stored"] == 1
    assert reply["duplicates"] == 1


async def test_same_batch_id_other_installation(
    client: TestClient, fleet: Fleet
) -> None:
    batch_id = str(uuid.uuid4())

    status_a, _ = await post(
        client, fleet.token_a, make_batch("gw-a", READINGS_A, batch_id=batch_id)
    )
    status_b, reply_b = await post(
        client, fleet.token_b, make_batch("gw-b", READINGS_A, batch_id=batch_id)
    )

    assert status_a == 200
    assert status_b == 200
    assert reply_b["stored"] == 4


async def test_readings_across_months(client: TestClient, fleet: Fleet) -> None:
    end_of_november = T0 - 4 * 86_400_000 + 7 * 3_600_000 + 59 * 60_000  # 11-30 22:59
    readings = [["sn-1", "701.W", end_of_november, 1.0], ["sn-1", "701.W", T0, 2.0]]

    status, _ = await post(client, fleet.token_a, make_batch("gw-a", readings))

    assert status == 200
    with psycopg.connect(fleet.dbs.shard_dsn("shard-1")) as conn:
        rows = conn.execute(
            "SELECT tableoid::regclass::text, count(*) FROM readings "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert rows == [("readings_2025_11", 1), ("readings_2025_12", 1)]


async def test_other_gateway_id_forbidden(client: TestClient, fleet: Fleet) -> None:
    status, reply = await post(client, fleet.token_a, make_batch("gw-b", READINGS_A))

    assert status == 403
    assert reply == {"error": "gateway_id 'gw-b' does not match the token's gateway"}
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0
    assert count(fleet.dbs.shard_dsn("shard-2"), "readings") == 0


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
async def test_unknown_token_unauthorized(
    client: TestClient, fleet: Fleet, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    data = json.dumps(make_batch("gw-a", READINGS_A)).encode()

    response = await client.post("/api/v1/batches", data=data, headers=headers)

    assert response.status == 401
    reply = await response.json()
    assert list(reply) == ["error"]
    assert "\n" not in reply["error"]
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0


async def test_revoked_token_unauthorized(fleet: Fleet) -> None:
    client = await start_client(fleet.dbs.config(auth_cache_seconds=0.001))
    try:
        catalog.revoke_gateway(fleet.dbs.catalog_dsn, "gw-a")
        status, reply = await post(
            client, fleet.token_a, make_batch("gw-a", READINGS_A)
        )
    finally:
        await client.close()

    assert status == 401
    assert reply == {"error": "unknown or revoked gateway token"}


MALFORMED = [
    (
        b"{not json",
        "body is not valid JSON: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)",
    ),
    (b"[]", "batch must be a JSON object"),
    (b'{"format": 2}', "format 2 is not supported: send format 1"),
    (
        json.dumps(make_batch("gw-a", [["sn-1", "701.W", T0, "high"]])).encode(),
        "readings[0]: value must be a number or null, got 'high'",
    ),
    (
        json.dumps(make_batch("gw-a", READINGS_A) | {"channels": []}).encode(),
        "readings[0]: channel '701.W' of 'sn-1' is not listed in channels",
    ),
    (
        b'{"format": 1, "batch_id": "b", "gateway_id": "gw-a", "readings": [["sn-1", '
        b'"701.W", 1764864000000, NaN]]}',
        "body is not valid JSON: NaN is not a JSON number",
    ),
]


@pytest.mark.parametrize(("body", "expected"), MALFORMED)
async def test_malformed_batch_rejected(
    client: TestClient, fleet: Fleet, body: bytes, expected: str
) -> None:
    status, reply = await post(client, fleet.token_a, body)

    assert status == 400
    assert reply["error"].startswith(expected)
    assert "\n" not in reply["error"]
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0
    assert count(fleet.dbs.shard_dsn("shard-1"), "batches") == 0


async def test_oversized_batch_rejected(client: TestClient, fleet: Fleet) -> None:
    readings = [["sn-1", "701.W", T0 + i * 1000, float(i)] for i in range(200)]
    body = json.dumps(make_batch("gw-a", readings)).encode()
    assert len(gzip.compress(body)) < 4096 < len(body)

    status, reply = await post(client, fleet.token_a, body)

    assert status == 413
    assert reply == {
        "error": "body exceeds the limit of 4096 bytes after "
        "decompression: send smaller batches"
    }
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0


async def test_gzip_bomb_cut_at_limit(client: TestClient, fleet: Fleet) -> None:
    bomb = gzip.compress(b" " * 50_000_000)

    response = await client.post(
        "/api/v1/batches",
        data=bomb,
        headers={
            "Authorization": f"Bearer {fleet.token_a}",
            "Content-Encoding": "gzip",
        },
    )

    assert response.status == 413


async def test_bad_gzip_rejected(client: TestClient, fleet: Fleet) -> None:
    response = await client.post(
        "/api/v1/batches",
        data=b"this is not gzip data",
        headers={
            "Authorization": f"Bearer {fleet.token_a}",
            "Content-Encoding": "gzip",
        },
    )

    assert response.status == 400
    assert await response.json() == {"error": "body cannot be decoded as gzip"}
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0


async def test_truncated_gzip_rejected(client: TestClient, fleet: Fleet) -> None:
    data = gzip.compress(json.dumps(make_batch("gw-a", READINGS_A)).encode())

    response = await client.post(
        "/api/v1/batches",
        data=data[: len(data) // 2],
        headers={
            "Authorization": f"Bearer {fleet.token_a}",
            "Content-Encoding": "gzip",
        },
    )

    assert response.status == 400
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0


async def test_gzip_trailing_data_rejected(client: TestClient, fleet: Fleet) -> None:
    data = gzip.compress(json.dumps(make_batch("gw-a", READINGS_A)).encode())

    response = await client.post(
        "/api/v1/batches",
        data=data + b"trailing",
        headers={
            "Authorization": f"Bearer {fleet.token_a}",
            "Content-Encoding": "gzip",
        },
    )

    assert response.status == 400
    assert await response.json() == {"error": "body cannot be decoded as gzip"}
    assert count(fleet.dbs.shard_dsn("shard-1"), "readings") == 0


@pytest.mark.parametrize("encoding", ["br", "zstd", "deflate", "compress", "x-snappy"])
async def test_other_encoding_rejected(
    client: TestClient, fleet: Fleet, encoding: str
) -> None:
    response = await client.post(
        "/api/v1/batches",
        data=b"{}",
        headers={
            "Authorization": f"Bearer {fleet.token_a}",
            "Content-Encoding": encoding,
        },
    )

    assert response.status == 415
    assert response.content_type == "application/json"
    assert await response.json() == {
        "error": f"unsupported Content-Encoding {encoding!r}: send gzip or identity"
    }
