"""`GET /metrics`: ingest counters, rejections, write latency and open alerts."""

from __future__ import annotations

import dataclasses
import json

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from collector.config import ShardConfig
from collector.metrics import CONTENT_TYPE, Histogram
from collector_http import READINGS_A, Fleet, add_fleet, make_batch, post, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


async def scrape(client: TestClient) -> list[str]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE
    return (await response.text()).splitlines()


async def post_rejections(client: TestClient, fleet: Fleet) -> list[int]:
    """Post one batch of each rejected kind; return the statuses."""
    statuses = [
        (await post(client, "no-such-token", make_batch("gw-a", READINGS_A)))[0],
        (await post(client, fleet.token_a, b"{not json"))[0],
        (await post(client, fleet.token_a, make_batch("gw-b", READINGS_A)))[0],
    ]
    large = make_batch("gw-a", READINGS_A) | {"padding": "x" * 2048}
    statuses.append((await post(client, fleet.token_a, json.dumps(large).encode()))[0])
    return statuses


async def test_metrics_ingest_counters(fleet: Fleet) -> None:
    client = await start_client(fleet.dbs.config(max_batch_bytes=1024))
    try:
        batch = make_batch("gw-a", READINGS_A)
        first = await post(client, fleet.token_a, batch)
        again = await post(client, fleet.token_a, batch)
        statuses = await post_rejections(client, fleet)
        lines = await scrape(client)
    finally:
        await client.close()

    assert first[0] == again[0] == 200
    assert statuses == [401, 400, 403, 413]
    assert 'solarfleet_ingest_batches_total{shard="shard-1"} 2' in lines
    assert 'solarfleet_ingest_batches_total{shard="shard-2"} 0' in lines
    assert 'solarfleet_ingest_readings_total{outcome="stored"} 4' in lines
    assert 'solarfleet_ingest_readings_total{outcome="duplicate"} 4' in lines
    assert 'solarfleet_ingest_readings_total{outcome="rejected"} 0' in lines
    assert 'solarfleet_ingest_rejected_batches_total{reason="malformed"} 1' in lines
    assert 'solarfleet_ingest_rejected_batches_total{reason="unauthorized"} 1' in lines
    assert 'solarfleet_ingest_rejected_batches_total{reason="forbidden"} 1' in lines
    assert 'solarfleet_ingest_rejected_batches_total{reason="too_large"} 1' in lines
    assert 'solarfleet_ingest_rejected_batches_total{reason="unavailable"} 0' in lines
    assert 'solarfleet_ingest_rejected_batches_total{reason="other"} 0' in lines
    assert "# TYPE solarfleet_ingest_batches_total counter" in lines
    assert "# TYPE solarfleet_shard_write_seconds histogram" in lines
    assert 'solarfleet_shard_write_seconds_count{shard="shard-1"} 2' in lines
    assert 'solarfleet_shard_write_seconds_bucket{shard="shard-1",le="+Inf"} 2' in lines
    assert 'solarfleet_shard_write_seconds_count{shard="shard-2"} 0' in lines
    assert 'solarfleet_shard_write_seconds_sum{shard="shard-2"} 0.0' in lines
    assert 'solarfleet_shard_write_seconds_bucket{shard="shard-2",le="10.0"} 0' in lines
    assert "solarfleet_open_alerts 0" in lines
    assert 'solarfleet_shard_up{shard="shard-1"} 1' in lines


async def test_metrics_shard_unavailable(fleet: Fleet, proxy_factory) -> None:
    proxy = proxy_factory(fleet.dbs.shard_dsn("shard-2"))
    shards = (fleet.dbs.shards[0], ShardConfig("shard-2", proxy.dsn))
    config = fleet.dbs.config(shard_timeout=1.0)
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, shards=shards)
    )
    client = await start_client(config)
    try:
        proxy.stop()
        down = await post(client, fleet.token_b, make_batch("gw-b", READINGS_A))
        lines = await scrape(client)
    finally:
        await client.close()

    assert down[0] == 503
    assert 'solarfleet_ingest_rejected_batches_total{reason="unavailable"} 1' in lines
    assert 'solarfleet_ingest_batches_total{shard="shard-2"} 0' in lines
    assert 'solarfleet_shard_up{shard="shard-1"} 1' in lines
    assert 'solarfleet_shard_up{shard="shard-2"} 0' in lines


def _open_alert(dsn: str, installation_id: int, kind: str, resolved: bool) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO alerts (installation_id, kind, severity, message, opened_at,"
            " resolved_at) VALUES (%s, %s, 'critical', 'test', now(),"
            " CASE WHEN %s THEN now() END)",
            (installation_id, kind, resolved),
        )


def _has_alerts_table(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass('public.alerts') IS NOT NULL").fetchone()
    return bool(row and row[0])


async def test_metrics_open_alerts(fleet: Fleet) -> None:
    if not _has_alerts_table(fleet.dbs.shard_dsn("shard-1")):
        pytest.skip("the shard schema has no alerts table yet")
    _open_alert(fleet.dbs.shard_dsn("shard-1"), fleet.installation_a, "a", False)
    _open_alert(fleet.dbs.shard_dsn("shard-1"), fleet.installation_a, "b", True)
    _open_alert(fleet.dbs.shard_dsn("shard-2"), fleet.installation_b, "a", False)
    _open_alert(fleet.dbs.shard_dsn("shard-2"), fleet.installation_b, "b", False)
    client = await start_client(fleet.dbs.config())
    try:
        lines = await scrape(client)
    finally:
        await client.close()

    assert "# TYPE solarfleet_open_alerts gauge" in lines
    assert "solarfleet_open_alerts 3" in lines


def test_histogram_buckets_cumulative() -> None:
    histogram = Histogram()

    histogram.observe(0.003)
    histogram.observe(0.3)
    histogram.observe(60.0)

    assert histogram.buckets == [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert histogram.count == 3
    assert histogram.total == pytest.approx(60.303)
