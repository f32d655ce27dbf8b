"""Fleet reads: the latest-values endpoint at fleet scale, against its bare queries.

A fleet of 1,000 installations of 10 devices of 20 channels each is written straight
into the catalog and the two shards, every channel with a latest value. The endpoint
`GET /api/v1/installations/{id}/latest` (operator key, shard lookup, two queries,
JSON) is timed one request at a time for random installations, against the same two
queries sent by psycopg on an open connection to the installation's shard.

The status of one installation and a 24-hour power chart need routes that read the
rollups, which the collector does not have yet, so they are listed as not measured.
The latest values come from `channels.last_value`, so the 30 days of five-minute
readings that the fleet would hold do not change this query's work, and they are
not written.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import statistics
import time
from typing import Any

import aiohttp
import psycopg

from bench.common import Goal, Section, alternate, free_port, median_of, wait_for_port
from bench.ingest import serve_collector
from collector import catalog
from collector.config import CollectorConfig, DatabaseConfig, ServerConfig

INSTALLATIONS = 1_000
DEVICES = 10
CHANNELS = 20
REQUESTS = 300
REPEATS = 3

# The endpoint's two queries (collector/fleet.py), sent without the collector.
_DEVICES = """
SELECT device_id, name, state, (extract(epoch FROM state_time) * 1000)::bigint
FROM devices WHERE installation_id = %s ORDER BY device_id
"""
_CHANNELS = """
SELECT d.device_id, c.name, c.unit, (extract(epoch FROM c.last_time) * 1000)::bigint,
       c.last_value
FROM channels c JOIN devices d ON d.id = c.device_id
WHERE c.installation_id = %s ORDER BY d.device_id, c.name
"""
_FILL_DEVICES = """
INSERT INTO devices (installation_id, device_id, name, state, state_time)
SELECT i, 'inv-' || i || '-' || d, 'inverter ' || d, 'online', now()
FROM unnest(%s::bigint[]) AS i, generate_series(1, %s) AS d
"""
_FILL_CHANNELS = """
INSERT INTO channels (installation_id, device_id, name, parameter, unit, last_time,
                      last_value)
SELECT d.installation_id, d.id, '160.module[' || c || '].DCW', 'DCW', 'W', now(),
       c * 10.5
FROM devices d, generate_series(1, %s) AS c
"""


def add_fleet(database: DatabaseConfig,
              installations: int) -> tuple[dict[int, str], str]:
    """Add installations with devices and channels; return their shards and a key."""
    owner = catalog.add_owner(database.catalog, "Fleet Owner")
    shard_of: dict[int, str] = {}
    with psycopg.connect(database.catalog) as conn:
        for shard in database.shards:
            count = installations // len(database.shards)
            rows = conn.execute(
                "INSERT INTO installations (owner_id, name, shard_id) "
                "SELECT %s, 'site ' || n, s.id FROM generate_series(1, %s) AS n, "
                "shards s WHERE s.name = %s RETURNING id",
                (owner.id, count, shard.name)).fetchall()
            shard_of.update((row[0], shard.name) for row in rows)
    for shard in database.shards:
        ids = [i for i, name in shard_of.items() if name == shard.name]
        with psycopg.connect(shard.dsn) as conn:
            conn.execute(_FILL_DEVICES, (ids, DEVICES))
            conn.execute(_FILL_CHANNELS, (CHANNELS,))
            conn.execute("ANALYZE devices")
            conn.execute("ANALYZE channels")
    _, key = catalog.add_key(database.catalog, "bench")
    return shard_of, key


async def endpoint_latencies(url: str, key: str, ids: list[int]) -> list[float]:
    headers = {"Authorization": f"Bearer {key}"}
    latencies = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for installation_id in ids:
            started = time.perf_counter()
            async with session.get(
                    f"{url}/api/v1/installations/{installation_id}/latest") as response:
                body = await response.json()
            latencies.append(time.perf_counter() - started)
            if response.status != 200 or len(body["channels"]) != DEVICES * CHANNELS:
                raise RuntimeError(f"installation {installation_id}: "
                                   f"{response.status} {str(body)[:200]}")
    return latencies


def query_latencies(database: DatabaseConfig, shard_of: dict[int, str],
                    ids: list[int]) -> list[float]:
    conns = {s.name: psycopg.connect(s.dsn) for s in database.shards}
    latencies = []
    try:
        for installation_id in ids:
            conn = conns[shard_of[installation_id]]
            started = time.perf_counter()
            conn.execute(_DEVICES, (installation_id,)).fetchall()
            rows: list[Any] = conn.execute(_CHANNELS, (installation_id,)).fetchall()
            latencies.append(time.perf_counter() - started)
            if len(rows) != DEVICES * CHANNELS:
                raise RuntimeError(f"installation {installation_id}: {len(rows)} rows")
        return latencies
    finally:
        for conn in conns.values():
            conn.close()


def run(database: DatabaseConfig, quick: bool = False) -> Section:
    installations = 100 if quick else INSTALLATIONS
    requests = 50 if quick else REQUESTS
    repeats = 1 if quick else REPEATS
    shard_of, key = add_fleet(database, installations)
    picks = random.Random(1)
    samples = [picks.sample(sorted(shard_of), min(requests, len(shard_of)))
               for _ in range(repeats)]

    port = free_port()
    config = CollectorConfig(ServerConfig(port=port), database)
    collector = multiprocessing.get_context("spawn").Process(
        target=serve_collector, args=(config,), daemon=True)
    collector.start()
    try:
        wait_for_port(port, alive=collector.is_alive)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(endpoint_latencies(url, key, samples[0][:10]))  # warm caches
        endpoint, direct = alternate(
            repeats,
            lambda i: statistics.median(asyncio.run(
                endpoint_latencies(url, key, samples[i]))),
            lambda i: statistics.median(query_latencies(database, shard_of,
                                                        samples[i])))
    finally:
        collector.terminate()
        collector.join(10)
    return report(installations, requests, endpoint, direct)


def report(installations: int, requests: int, endpoint: list[float],
           direct: list[float]) -> Section:
    endpoint_ms = median_of(endpoint) * 1e3
    direct_ms = median_of(direct) * 1e3
    section = Section("Fleet reads")
    section.lines += [
        f"{installations:,} installations x {DEVICES} devices x {CHANNELS} channels "
        f"({installations * DEVICES * CHANNELS:,} channels) over two shards. "
        f"{requests} requests a run for random installations, one at a time; "
        f"medians of {len(endpoint)} alternated runs.",
        "",
        f"- Latest values of one installation ({DEVICES * CHANNELS} channels): "
        f"endpoint {endpoint_ms:.2f} ms, its two queries alone {direct_ms:.2f} ms: "
        f"the queries take **{direct_ms / endpoint_ms:.2f}** of the endpoint's time.",
        "- Not measured: the status of one installation and a 24-hour power chart "
        "over 1,000 installations x 10 devices x 30 days of five-minute data. The "
        "shards keep five-minute, hourly and daily rollups at ingest, but the "
        "collector has no route that reads them yet, and without one there is "
        "nothing of the product to time. Measuring them needs those routes and a "
        "fleet written through the rollups: 30 days of five-minute rollups are "
        "8,640 rows per channel.",
    ]
    section.goals += [
        Goal("fleet status of one installation", None, 0.0,
             reason="no route reads the rollups yet"),
        Goal("fleet 24 h power chart", None, 0.0,
             reason="no route reads the rollups yet"),
    ]
    return section
