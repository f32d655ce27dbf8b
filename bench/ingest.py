"""Collector ingest: batches over HTTP through the whole path, against raw COPY.

Ten installations of five devices of 100 channels each, alternately on the two
shards, send batches of ten poll rounds (5,000 readings and 50 states), gzip JSON,
from one concurrent client: each installation's gateway sends its batches one after
another, and all gateways at once. The collector runs in its own process, so it has
a core of its own, as the client and PostgreSQL share the other one.

The limit is psycopg's binary COPY of the same rows straight into the shards'
readings tables from one connection per shard, one transaction per batch. The floor
is psycopg's `executemany` INSERT of the same rows, one transaction per batch.
"""

from __future__ import annotations

import asyncio
import cProfile
import gzip
import json
import logging
import multiprocessing
import pstats
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from bench.common import (
    ROOT,
    Goal,
    Section,
    alternate,
    cpu_seconds,
    free_port,
    median_of,
    postgres_pids,
    wait_for_port,
)
from collector import batch as wire
from collector import catalog, ingest
from collector.app import create_app
from collector.config import CollectorConfig, DatabaseConfig, ServerConfig

INSTALLATIONS = 10
DEVICES = 5
CHANNELS = 100
ROUNDS_PER_BATCH = 10
BATCHES_PER_INSTALLATION = 4
REPEATS = 3
ROUND_STEP_MS = 1_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_COPY = ("COPY readings (installation_id, channel_id, time, value) "
         "FROM STDIN (FORMAT BINARY)")
_INSERT = ("INSERT INTO readings (installation_id, channel_id, time, value) "
           "VALUES (%s, %s, %s, %s)")


@dataclass(frozen=True)
class Site:
    """One installation of the benchmark: its shard, gateway and devices."""

    installation_id: int
    shard: str
    gateway_id: str
    token: str

    def device_ids(self) -> list[str]:
        return [f"inv-{self.installation_id}-{d}" for d in range(1, DEVICES + 1)]


def channel_names() -> list[str]:
    return [f"160.module[{c}].DCW" for c in range(1, CHANNELS + 1)]


def batch_body(site: Site, first_ms: int) -> dict[str, Any]:
    """Build a batch of ROUNDS_PER_BATCH poll rounds from `first_ms` on."""
    devices = site.device_ids()
    names = channel_names()
    times = [first_ms + r * ROUND_STEP_MS for r in range(ROUNDS_PER_BATCH)]
    return {
        "format": 1,
        "batch_id": str(uuid.uuid4()),
        "gateway_id": site.gateway_id,
        "devices": [{"device_id": d, "name": f"inverter {d}", "manufacturer": "Bench",
                     "model": "B-1", "serial": d, "version": "1.0",
                     "address": f"127.0.0.1:502/{n}"}
                    for n, d in enumerate(devices, 1)],
        "channels": [{"device_id": d, "name": c, "unit": "W"}
                     for d in devices for c in names],
        "readings": [[d, c, t, float((t // 1000 + i) % 10_000) + 0.5]
                     for t in times for d in devices for i, c in enumerate(names)],
        "states": [[d, t, "online"] for t in times for d in devices],
    }


# --- setting up ---------------------------------------------------------------------


def add_sites(database: DatabaseConfig) -> list[Site]:
    owner = catalog.add_owner(database.catalog, "Bench Owner")
    sites = []
    for number in range(INSTALLATIONS):
        shard = database.shards[number % 2].name
        installation = catalog.add_installation(
            database.catalog, f"bench site {number + 1}", owner.id, shard=shard)
        gateway_id = f"gw-bench-{number + 1}"
        _, token = catalog.add_gateway(database.catalog, gateway_id, installation.id)
        sites.append(Site(installation.id, shard, gateway_id, token))
    return sites


def serve_collector(config: CollectorConfig) -> None:
    """Run the collector until terminated; the target of its own process."""
    logging.basicConfig(level=logging.WARNING)
    web.run_app(create_app(config), host="127.0.0.1", port=config.server.port,
                print=None)


def ensure_partitions(database: DatabaseConfig, first_ms: int, last_ms: int) -> None:
    months = {to_datetime(first_ms), to_datetime(last_ms)}
    for shard in database.shards:
        with psycopg.connect(shard.dsn) as conn:
            for month in months:
                conn.execute("SELECT ensure_readings_partition(%s)", (month,))


def channel_ids(database: DatabaseConfig) -> dict[tuple[str, str], int]:
    """Map (device id, channel) to the channel's row id, over both shards."""
    ids: dict[tuple[str, str], int] = {}
    for shard in database.shards:
        with psycopg.connect(shard.dsn) as conn:
            rows = conn.execute(
                "SELECT d.device_id, c.name, c.id FROM channels c "
                "JOIN devices d ON d.id = c.device_id")
            ids.update(((device_id, name), id_) for device_id, name, id_ in rows)
    return ids


def to_datetime(time_ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=time_ms)


# --- the three ways in --------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The batches of one measured run, as bodies and as rows per shard."""

    sites: list[Site]
    bodies: dict[str, list[bytes]]  # gateway id -> gzip bodies, in sending order
    rows: list[tuple[str, list[tuple[int, int, datetime, float | None]]]]
    readings: int


def workload(sites: list[Site], first_ms: int, ids: dict[tuple[str, str], int],
             batches_per_site: int) -> Workload:
    bodies: dict[str, list[bytes]] = {}
    rows = []
    readings = 0
    span = ROUNDS_PER_BATCH * ROUND_STEP_MS
    for site in sites:
        bodies[site.gateway_id] = []
        for number in range(batches_per_site):
            body = batch_body(site, first_ms + number * span)
            bodies[site.gateway_id].append(gzip.compress(json.dumps(body).encode()))
            rows.append((site.shard, [
                (site.installation_id, ids[(d, c)], to_datetime(t), v)
                for d, c, t, v in body["readings"]]))
            readings += len(body["readings"])
    return Workload(sites, bodies, rows, readings)


async def send_all(url: str, work: Workload) -> float:
    """Send every batch, one gateway after another per site, all sites at once."""
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(
            _send_site(session, url, site, work.bodies[site.gateway_id])
            for site in work.sites))
        return time.perf_counter() - started


async def _send_site(session: aiohttp.ClientSession, url: str, site: Site,
                     bodies: list[bytes]) -> None:
    headers = {"Authorization": f"Bearer {site.token}",
               "Content-Type": "application/json", "Content-Encoding": "gzip"}
    for body in bodies:
        async with session.post(f"{url}/api/v1/batches", data=body,
                                headers=headers) as response:
            reply = await response.json()
            if response.status != 200 or reply["duplicates"]:
                raise RuntimeError(f"batch of {site.gateway_id}: {response.status} "
                                   f"{reply}")


@contextmanager
def shard_connections(database: DatabaseConfig) -> Iterator[
        dict[str, psycopg.Connection[Any]]]:
    conns = {s.name: psycopg.connect(s.dsn) for s in database.shards}
    try:
        yield conns
    finally:
        for conn in conns.values():
            conn.close()


def copy_all(conns: dict[str, psycopg.Connection[Any]], work: Workload) -> float:
    """COPY every batch's rows into its shard, one transaction per batch."""
    started = time.perf_counter()
    for shard, rows in work.rows:
        conn = conns[shard]
        with conn.cursor() as cur, cur.copy(_COPY) as copy:
            copy.set_types(["int8", "int8", "timestamptz", "float8"])
            for row in rows:
                copy.write_row(row)
        conn.commit()
    return time.perf_counter() - started


def insert_all(conns: dict[str, psycopg.Connection[Any]], work: Workload) -> float:
    """INSERT every batch's rows with executemany, one transaction per batch."""
    started = time.perf_counter()
    for shard, rows in work.rows:
        conn = conns[shard]
        with conn.cursor() as cur:
            cur.executemany(_INSERT, rows)
        conn.commit()
    return time.perf_counter() - started


# --- profile ------------------------------------------------------------------------


async def _store_in_process(database: DatabaseConfig, work: Workload) -> None:
    shard_of = {site.gateway_id: site for site in work.sites}
    conns = {s.name: await psycopg.AsyncConnection.connect(s.dsn)
             for s in database.shards}
    try:
        for gateway_id, bodies in work.bodies.items():
            site = shard_of[gateway_id]
            for body in bodies:
                batch = wire.parse(gzip.decompress(body))
                await ingest.store_batch(conns[site.shard], site.installation_id,
                                         batch)
    finally:
        for conn in conns.values():
            await conn.close()


def profile(database: DatabaseConfig, work: Workload, top: int = 10) -> list[str]:
    """Profile parsing and storing in this process; return the top functions.

    Time spent waiting for PostgreSQL shows as the selector's poll.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(_store_in_process(database, work))
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = sorted(stats.stats.items(),  # type: ignore[attr-defined]
                     key=lambda item: item[1][2], reverse=True)[:top]
    lines = []
    for (path, line, name), (_, _, own, cumulative, _) in entries:
        where = "built-in" if path == "~" else f"{_short_path(path)}:{line}"
        lines.append(f"| `{name}` ({where}) | {100 * own / total:.1f} % "
                     f"| {100 * cumulative / total:.1f} % |")
    return lines


# --- the run ------------------------------------------------------------------------


def run(database: DatabaseConfig, quick: bool = False) -> Section:
    sites = add_sites(database)
    repeats = 1 if quick else REPEATS
    batches = 2 if quick else BATCHES_PER_INSTALLATION
    span = ROUNDS_PER_BATCH * ROUND_STEP_MS * batches
    # Every run writes new times, one span apart, ending an hour before now.
    runs_needed = 2 + repeats * 3 + 2
    now_ms = time.time_ns() // 1_000_000
    first_ms = now_ms - 3_600_000 - runs_needed * span
    ensure_partitions(database, first_ms, now_ms)

    port = free_port()
    config = CollectorConfig(ServerConfig(port=port), database)
    collector = multiprocessing.get_context("spawn").Process(
        target=serve_collector, args=(config,), daemon=True)
    collector.start()
    try:
        wait_for_port(port, alive=collector.is_alive)
        url = f"http://127.0.0.1:{port}"
        # The first batches register the devices and channels; they are not timed.
        warm_up = _registering_workload(sites, first_ms)
        asyncio.run(send_all(url, warm_up))
        ids = channel_ids(database)
        slot = iter(range(1, runs_needed))

        def next_work(per_site: int = batches) -> Workload:
            return workload(sites, first_ms + next(slot) * span, ids, per_site)

        works = [(next_work(), next_work()) for _ in range(repeats)]
        cpu: dict[str, list[tuple[float, float]]] = {"whole": [], "raw": []}

        def whole_run(index: int) -> float:
            work = works[index][0]
            with cpu_per_reading(cpu["whole"], work.readings, collector.pid):
                seconds = asyncio.run(send_all(url, work))
            return work.readings / seconds

        def raw_run(index: int) -> float:
            work = works[index][1]
            with shard_connections(database) as conns, cpu_per_reading(
                    cpu["raw"], work.readings, None):
                seconds = copy_all(conns, work)
            return work.readings / seconds

        whole, raw = alternate(repeats, whole_run, raw_run)
        few = next_work(1)
        with shard_connections(database) as conns:
            executemany = few.readings / insert_all(conns, few)
    finally:
        collector.terminate()
        collector.join(10)
    table = profile(database, next_work(1))
    return report(median_of(whole), median_of(raw), executemany, whole, raw, table,
                  works[0][0].readings, cpu)


@contextmanager
def cpu_per_reading(results: list[tuple[float, float]], readings: int,
                    pid: int | None) -> Iterator[None]:
    """Append the CPU microseconds per reading of the client side and of PostgreSQL.

    The client side is process `pid`, or this process when None.
    """
    servers = postgres_pids()

    def client() -> float:
        return time.process_time() if pid is None else cpu_seconds([pid])

    before = client(), cpu_seconds(servers)
    yield
    after = client(), cpu_seconds(servers)
    results.append(((after[0] - before[0]) * 1e6 / readings,
                    (after[1] - before[1]) * 1e6 / readings))


def _registering_workload(sites: list[Site], first_ms: int) -> Workload:
    bodies = {site.gateway_id: [gzip.compress(json.dumps(
        batch_body(site, first_ms)).encode())] for site in sites}
    return Workload(sites, bodies, [], INSTALLATIONS * DEVICES * CHANNELS
                    * ROUNDS_PER_BATCH)


def report(whole: float, raw: float, executemany: float, whole_runs: list[float],
           raw_runs: list[float], profile_lines: list[str], readings: int,
           cpu: dict[str, list[tuple[float, float]]]) -> Section:
    runs = len(whole_runs)
    section = Section("Collector ingest")
    section.lines += [
        f"{INSTALLATIONS} installations (alternately on two shards) x {DEVICES} "
        f"devices x {CHANNELS} channels. A batch holds {ROUNDS_PER_BATCH} poll "
        f"rounds = {DEVICES * CHANNELS * ROUNDS_PER_BATCH} readings and "
        f"{DEVICES * ROUNDS_PER_BATCH} states, as gzip JSON over HTTP on 127.0.0.1, "
        f"and a run sends {readings} readings. Each installation's gateway sends "
        "its batches one after another, and all gateways send at once. The "
        "collector runs in its own process. Raw COPY and executemany run from the "
        "benchmark's process with one connection per shard, one transaction per "
        "batch. Medians of "
        f"{runs} runs, alternated.",
        "",
        "| path | readings/s | runs | ratio to raw COPY |",
        "|---|---:|---|---:|",
        f"| whole path: HTTP, gzip, auth, validate, register, COPY, insert, commit "
        f"| {whole:,.0f} | {_runs(whole_runs)} | {whole / raw:.2f} |",
        f"| raw binary COPY into readings | {raw:,.0f} | {_runs(raw_runs)} | 1.00 |",
        f"| executemany INSERT into readings | {executemany:,.0f} | 1 "
        f"| {executemany / raw:.2f} |",
        "",
        "CPU time per reading (medians, microseconds): the collector process "
        f"{_median(cpu['whole'], 0):.1f} and PostgreSQL {_median(cpu['whole'], 1):.1f} "
        f"on the whole path; the copying process {_median(cpu['raw'], 0):.1f} and "
        f"PostgreSQL {_median(cpu['raw'], 1):.1f} for raw COPY.",
        "",
        "What limits the whole path on this machine:",
        "",
        "- PostgreSQL: per reading it copies the row into a staging table, joins it "
        "to its channel, sorts and inserts it into readings, and aggregates it into "
        "the rollups; per batch it updates each channel's latest value and merges "
        "one row per channel into each of the three rollup tables (a batch of 10 "
        "rounds of 500 channels updates 2,000 rows for 5,000 readings). Raw COPY "
        "only inserts. On two cores PostgreSQL's CPU per reading now bounds the "
        "whole path, and the collector's own CPU competes with it.",
        "- The collector is one Python process: gzip and HTTP, JSON parsing (the "
        "standard library's `json`), checking each row and psycopg's `write_row` "
        "into the staging table. Raw COPY starts from rows that are ready.",
        "- What would close the gap: fewer rollup row updates per reading, which "
        "larger batches (more rounds per channel) give directly, or rollups merged "
        "from readings after commit by a background job instead of in the batch's "
        "transaction; on a machine with more cores, several collector processes "
        "(SO_REUSEPORT) and PostgreSQL on cores of its own; a wire format with "
        "values per channel as arrays, which cuts JSON parsing and `write_row`.",
        "- The goal against executemany cannot be met as measured: psycopg 3 "
        "sends `executemany` in pipeline mode, which ran at "
        f"{executemany / raw:.2f} x raw COPY in this run, so 5 x executemany is "
        f"{5 * executemany / raw:.2f} x raw COPY. The goal assumed an INSERT with "
        "a round trip per row.",
        "",
        "Where the collector's own time goes, parsing and storing in one process "
        "(cProfile, share of the profiled time; waiting for PostgreSQL shows as "
        "`select` / `poll`):",
        "",
        "| function | own time | with callees |",
        "|---|---:|---:|",
        *profile_lines,
    ]
    section.goals += [
        Goal("collector ingest / raw COPY", whole / raw, 0.60),
        Goal("collector ingest / raw COPY (stretch)", whole / raw, 0.80),
        Goal("collector ingest / executemany INSERT", whole / executemany, 5.0),
    ]
    return section


def _short_path(path: str) -> str:
    """Shorten a module path to the part under site-packages, the stdlib or the repo."""
    for marker in ("/site-packages/", f"/lib/python{sys.version_info[0]}."
                   f"{sys.version_info[1]}/", f"{ROOT}/"):
        if marker in path:
            return path.rsplit(marker, 1)[-1]
    return path


def _median(pairs: list[tuple[float, float]], index: int) -> float:
    return median_of([pair[index] for pair in pairs])


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)
