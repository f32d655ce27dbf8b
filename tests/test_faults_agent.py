"""The agent's no-loss guarantees under faults, on real processes, files and sockets.

A writer process killed with SIGKILL mid-commit, a collector stopped for days of
readings, a reply lost after the shard committed, and a buffer filled past its cap.
The collector is the real one, on real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from aiohttp import web

from collector import catalog
from collector.app import create_app
from collector.config import CollectorConfig
from edge_agent.buffer import Buffer, BufferLimits
from edge_agent.config import CollectorConfig as AgentCollectorConfig
from edge_agent.forwarder import Forwarder
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll
from edge_agent.retry import Backoff
from fake_collector import free_port

FAST = Backoff(initial=0.01, maximum=0.1)
LIMIT = 120.0  # seconds before a test gives up waiting
DEVICES = (DeviceInfo("inv-1", "127.0.0.1:502/1", "inverter 1"),
           DeviceInfo("inv-2", "127.0.0.1:502/2", "inverter 2"))
CHANNELS = tuple(Channel(f"160.module[{i}].DCW", "W") for i in range(1, 21))
MINUTE_MS = 60_000
DAY_MS = 86_400_000


def site_poll(device: DeviceInfo, time_ms: int) -> Poll:
    values = {c.name: float(time_ms // MINUTE_MS % 1000 + i)
              for i, c in enumerate(CHANNELS)}
    return Poll(device, time_ms, DeviceState.ONLINE, values, CHANNELS)


def generate(buffer: Buffer, start_ms: int, minutes: int) -> int:
    """Write a poll of each device every minute; return the readings written."""
    for minute in range(minutes):
        for device in DEVICES:
            buffer.add_poll(site_poll(device, start_ms + minute * MINUTE_MS))
    return minutes * len(DEVICES) * len(CHANNELS)


# --- SIGKILL during writes ----------------------------------------------------------

WRITER = """
import sys
from edge_agent.buffer import Buffer, BufferLimits
from edge_agent.readings import DeviceInfo, DeviceState, Poll

path, first, max_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limits = BufferLimits(max_bytes=max_bytes or None)
device = DeviceInfo("inv-1", "127.0.0.1:502/1")
with Buffer(path, gateway_id="gw-kill", limits=limits) as buffer:
    number = first
    while True:
        values = {f"160.module[{i}].DCW": float(number + i) for i in range(50)}
        buffer.add_poll(Poll(device, number, DeviceState.ONLINE, values))
        print(number, flush=True)
        number += 1
"""


def kill_writer(path: Path, first: int, max_bytes: int, rng: random.Random) -> list[int]:
    """Run the writer, SIGKILL it after a random number of commits; return them all."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(first), str(max_bytes)],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    reported = []
    try:
        for _ in range(rng.randint(20, 400)):
            reported.append(int(process.stdout.readline()))
        os.kill(process.pid, signal.SIGKILL)
        # Commits printed before the kill but not read yet are reported too.
        reported += [int(line) for line in process.stdout.read().split()]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return reported


def check_integrity(path: Path) -> list[int]:
    """Run SQLite's integrity checks on the file; return its poll times."""
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        return [row[0] for row in db.execute("SELECT time_ms FROM polls ORDER BY id")]


def test_sigkill_keeps_commits(tmp_path):
    path = tmp_path / "buffer.sqlite"
    rng = random.Random(20251204)
    reported: list[int] = []
    for round_number in range(6):
        reported += kill_writer(path, round_number * 1_000_000, 0, rng)
        present = check_integrity(path)
        # Every reported commit is there; at most the one in flight besides.
        assert set(reported) <= set(present)
        assert len(present) - len(reported) in (0, 1)

    with Buffer(path, gateway_id="gw-kill") as buffer:
        batch = buffer.next_batch(10**9)
    assert len(batch.readings) == 50 * len(check_integrity(path))


def test_sigkill_keeps_drop_counts(tmp_path):
    path = tmp_path / "buffer.sqlite"
    rng = random.Random(7)
    reported: list[int] = []
    for round_number in range(6):
        reported += kill_writer(path, round_number * 1_000_000, 128 * 1024, rng)
        present = check_integrity(path)
        with Buffer(path, gateway_id="gw-kill") as buffer:
            dropped = buffer.stats().dropped_polls
            gaps = [entry.gap for entry in buffer.gaps()]
        # Each committed poll is either in the file or counted as dropped.
        assert len(present) + dropped - len(reported) in (0, 1)
        missing = set(reported) - set(present)
        assert len(missing) <= dropped
        assert all(any(g.first_ms <= t <= g.last_ms for g in gaps) for t in missing)
    assert dropped > 0


# --- a real collector ---------------------------------------------------------------


@dataclass
class Site:
    """One installation's gateway on a collector that a test can stop and restart."""

    config: CollectorConfig
    shard_dsn: str
    installation_id: int
    gateway_id: str
    token: str
    port: int
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.runner = web.AppRunner(create_app(self.config))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port,
                          reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def count(self, query: str) -> int:
        with psycopg.connect(self.shard_dsn) as conn:
            row = conn.execute(query, (self.installation_id,)).fetchone()
        assert row is not None
        return int(row[0])

    def reading_times(self) -> dict[str, list[int]]:
        """Return the distinct reading times of each device, in Unix milliseconds."""
        with psycopg.connect(self.shard_dsn) as conn:
            rows = conn.execute(
                "SELECT d.device_id, (extract(epoch FROM r.time) * 1000)::bigint "
                "FROM readings r JOIN channels c ON c.id = r.channel_id "
                "JOIN devices d ON d.id = c.device_id "
                "WHERE r.installation_id = %s GROUP BY 1, 2 ORDER BY 1, 2",
                (self.installation_id,),
            ).fetchall()
        times: dict[str, list[int]] = {}
        for device_id, time_ms in rows:
            times.setdefault(device_id, []).append(time_ms)
        return times


@pytest.fixture
async def site(collector_databases) -> AsyncIterator[Site]:
    """A registered gateway and its collector, not started yet."""
    dsn = collector_databases.catalog_dsn
    owner = catalog.add_owner(dsn, "Fault Owner")
    installation = catalog.add_installation(dsn, "faults", owner.id, shard="shard-1")
    _, token = catalog.add_gateway(dsn, "gw-faults", installation.id)
    site = Site(collector_databases.config(), collector_databases.shard_dsn("shard-1"),
                installation.id, "gw-faults", token, free_port())
    yield site
    await site.stop()


def forwarder_for(buffer: Buffer, site: Site, url: str | None = None,
                  batch_size: int = 2000) -> Forwarder:
    settings = AgentCollectorConfig(url=url or site.url, token=site.token,
                               batch_size=batch_size, interval=0.05, timeout=10.0)
    return Forwarder(buffer, settings, site.gateway_id, FAST)


async def drain(forwarder: Forwarder, buffer: Buffer) -> None:
    """Run the forwarder until the buffer has no poll and no unsent gap left."""
    stop = asyncio.Event()
    task = asyncio.create_task(forwarder.run(stop))
    try:
        await wait_drained(buffer, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, LIMIT)


async def wait_drained(buffer: Buffer, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + LIMIT
    while not await asyncio.to_thread(_drained, buffer):
        assert time.monotonic() < deadline, "buffer did not drain in time"
        assert not task.done(), task
        await asyncio.sleep(0.05)


def _drained(buffer: Buffer) -> bool:
    pending = [e for e in buffer.gaps() if e.reported_ms is None]
    return buffer.stats().polls == 0 and not pending


READINGS = "SELECT count(*) FROM readings WHERE installation_id = %s"
DISTINCT = ("SELECT count(*) FROM (SELECT DISTINCT channel_id, time FROM readings "
            "WHERE installation_id = %s) AS r")
STORED = "SELECT coalesce(sum(stored), 0) FROM batches WHERE installation_id = %s"


@pytest.mark.postgres
async def test_outage_of_days(site, tmp_path):
    days = 2
    start_ms = (time.time_ns() // 1_000_000 - days * DAY_MS) // MINUTE_MS * MINUTE_MS
    with Buffer(tmp_path / "buffer.sqlite", "normal",
                gateway_id=site.gateway_id) as buffer:
        async with forwarder_for(buffer, site) as forwarder:
            # The collector runs, takes the first hour, and stops for two days.
            await site.start()
            generated = await asyncio.to_thread(generate, buffer, start_ms, 60)
            await drain(forwarder, buffer)
            await site.stop()

            # The forwarder retries against the stopped collector meanwhile.
            stop = asyncio.Event()
            retrying = asyncio.create_task(forwarder.run(stop))
            generated += await asyncio.to_thread(
                generate, buffer, start_ms + 60 * MINUTE_MS, days * 1440 - 60)
            assert buffer.stats().readings == generated - 60 * 2 * len(CHANNELS)

            await site.start()
            try:
                await wait_drained(buffer, retrying)
            finally:
                stop.set()
                await asyncio.wait_for(retrying, LIMIT)

    assert generated == days * 1440 * 2 * len(CHANNELS)
    assert site.count(READINGS) == generated
    assert site.count(DISTINCT) == generated
    assert site.count(STORED) == generated


class ReplyDroppingProxy:
    """A TCP proxy on 127.0.0.1 that cuts the connection instead of passing a reply.

    For the first `drop` requests, it waits for the first bytes of the collector's
    reply (sent only after the shard committed) and then closes both connections.
    """

    def __init__(self, target_port: int, drop: int) -> None:
        self.target_port = target_port
        self.drop = drop
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                             self.target_port)
        upstream = asyncio.create_task(self._pipe(reader, up_writer, drop=False))
        try:
            await self._pipe(up_reader, writer, drop=True)
        finally:
            upstream.cancel()
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    drop: bool) -> None:
        while data := await reader.read(65536):
            if drop and self.dropped < self.drop:
                self.dropped += 1
                return
            writer.write(data)
            await writer.drain()


@pytest.mark.postgres
async def test_lost_reply_resent_once(site, tmp_path):
    start_ms = (time.time_ns() // 1_000_000 - DAY_MS) // MINUTE_MS * MINUTE_MS
    await site.start()
    proxy = ReplyDroppingProxy(site.port, drop=3)
    await proxy.start()
    try:
        with Buffer(tmp_path / "buffer.sqlite", gateway_id=site.gateway_id) as buffer:
            generated = generate(buffer, start_ms, 100)
            url = f"http://127.0.0.1:{proxy.port}"
            async with forwarder_for(buffer, site, url, batch_size=800) as forwarder:
                await drain(forwarder, buffer)
    finally:
        await proxy.stop()

    assert proxy.dropped == 3
    assert site.count(READINGS) == generated
    assert site.count(DISTINCT) == generated
    assert site.count(STORED) == generated
    # 200 polls of 20 readings in batches of 800: 5 batches, each stored once.
    assert site.count("SELECT count(*) FROM batches WHERE installation_id = %s") == 5


@pytest.mark.postgres
async def test_cap_drops_reported(site, tmp_path):
    start_ms = (time.time_ns() // 1_000_000 - DAY_MS) // MINUTE_MS * MINUTE_MS
    minutes = 1440
    limits = BufferLimits(max_bytes=512 * 1024)
    with Buffer(tmp_path / "buffer.sqlite", "normal", gateway_id=site.gateway_id,
                limits=limits) as buffer:
        # The collector is down while a day of polls overfills the cap.
        generated = generate(buffer, start_ms, minutes)
        stats = buffer.stats()
        await site.start()
        async with forwarder_for(buffer, site) as forwarder:
            await drain(forwarder, buffer)
        gaps = {entry.gap.device_id: entry for entry in buffer.gaps()}

    assert stats.dropped_readings > 0
    assert stats.dropped_readings == stats.dropped_polls * len(CHANNELS)
    assert site.count(READINGS) == generated - stats.dropped_readings
    assert site.count(DISTINCT) == generated - stats.dropped_readings

    all_times = [start_ms + minute * MINUTE_MS for minute in range(minutes)]
    stored = site.reading_times()
    assert sorted(gaps) == ["inv-1", "inv-2"]
    for device_id, entry in gaps.items():
        missing = [t for t in all_times if t not in set(stored[device_id])]
        # Dropped oldest first: the missing polls are the device's oldest ones.
        assert missing == all_times[:len(missing)]
        assert entry.gap.first_ms == missing[0]
        assert entry.gap.last_ms == missing[-1]
        assert entry.gap.polls == len(missing)
        assert entry.gap.readings == len(missing) * len(CHANNELS)
        assert entry.gap.reason == "buffer-full"
        assert entry.reported_ms is not None
    assert sum(e.gap.polls for e in gaps.values()) == stats.dropped_polls
