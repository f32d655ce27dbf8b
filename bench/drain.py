"""Benchmark: drain a week of buffered polls into a real collector while live polls flow.

A five-device site (100 channels each by default) was cut off for seven days. Its
backlog is written into a fresh buffer file. Then the agent's forwarder sends it to a
collector in its own process, backed by an embedded PostgreSQL. Meanwhile a live
poller adds a poll round every poll interval, and the time until each round is in
the shard is the live delay. The figures are printed and written to the "Backlog
drain" section of docs/benchmarks.md.

The backlog keeps the week and the channel count but stores a round every
`--backlog-step` seconds (300 by default, not the 10 s poll interval), so that the run
takes about two minutes on two cores. The drain rate does not depend on the spacing of
the readings, so it is reported as a multiple of the site's production rate at the
real poll interval.

Run: .venv/bin/python bench/drain.py [--days 7] [--devices 5] [--channels 100]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import platform
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from aiohttp import web

from collector import catalog, embedded, migrate
from collector.app import create_app
from collector.config import CollectorConfig, DatabaseConfig, ServerConfig, ShardConfig
from collector.databases import create_database, dsn_for
from edge_agent.buffer import Buffer
from edge_agent.config import CollectorConfig as AgentCollectorConfig
from edge_agent.forwarder import Forwarder
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll
from edge_agent.retry import Backoff

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Backlog drain"
GATEWAY_ID = "gw-bench"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Site:
    """The simulated site: its devices, channels and poll interval."""

    devices: tuple[DeviceInfo, ...]
    channels: tuple[Channel, ...]
    poll_interval: float  # seconds

    @property
    def production_rate(self) -> float:
        """Readings a second that the site produces."""
        return len(self.devices) * len(self.channels) / self.poll_interval

    def poll_round(self, time_ms: int) -> list[Poll]:
        values = {c.name: float(time_ms // 1000 % 10_000 + i)
                  for i, c in enumerate(self.channels)}
        return [Poll(device, time_ms, DeviceState.ONLINE, values, self.channels)
                for device in self.devices]


@dataclass(frozen=True)
class Figures:
    """Figures of one run."""

    backlog_readings: int
    write_seconds: float
    buffer_bytes: int
    drain_seconds: float
    live_delays: list[float]  # seconds from commit to shard, one per live round
    batch_size: int


def build_site(devices: int, channels: int, poll_interval: float) -> Site:
    return Site(
        devices=tuple(DeviceInfo(f"inv-{n}", f"127.0.0.1:502/{n}", f"inverter {n}")
                      for n in range(1, devices + 1)),
        channels=tuple(Channel(f"160.module[{i}].DCW", "W")
                       for i in range(1, channels + 1)),
        poll_interval=poll_interval,
    )


# --- databases and collector -------------------------------------------------------


def prepare_databases(root: Path) -> tuple[embedded.EmbeddedPostgres, DatabaseConfig]:
    server = embedded.start(root / "pg")
    names = ["bench_catalog", "bench_shard_1", "bench_shard_2"]
    for name in names:
        create_database(server.admin_dsn, name)
    shards = (ShardConfig("shard-1", dsn_for(server.admin_dsn, names[1])),
              ShardConfig("shard-2", dsn_for(server.admin_dsn, names[2])))
    catalog_dsn = dsn_for(server.admin_dsn, names[0])
    migrate.migrate_all(migrate.Databases(catalog_dsn, shards))
    return server, DatabaseConfig(catalog=catalog_dsn, shards=shards)


def serve_collector(config: CollectorConfig) -> None:
    """Run the collector until terminated; the target of its own process."""
    logging.basicConfig(level=logging.WARNING)
    web.run_app(create_app(config), host=config.server.host, port=config.server.port,
                print=None)


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"collector did not listen on 127.0.0.1:{port} within "
                       f"{timeout:g} s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the run -----------------------------------------------------------------------


def write_backlog(buffer: Buffer, site: Site, days: float, step: float,
                  end_ms: int) -> int:
    """Write `days` of poll rounds every `step` seconds up to `end_ms`."""
    rounds = int(days * 86_400 / step)
    start_ms = end_ms - int(rounds * step * 1000)
    for number in range(rounds):
        for poll in site.poll_round(start_ms + int(number * step * 1000)):
            buffer.add_poll(poll)
    return rounds * len(site.devices) * len(site.channels)


async def live_poller(buffer: Buffer, site: Site, stop: asyncio.Event,
                      rounds: dict[int, float]) -> None:
    """Commit a poll round every poll interval; record when each was committed."""
    while not stop.is_set():
        time_ms = time.time_ns() // 1_000_000
        for poll in site.poll_round(time_ms):
            await asyncio.to_thread(buffer.add_poll, poll)
        rounds[time_ms] = time.monotonic()
        try:
            await asyncio.wait_for(stop.wait(), site.poll_interval)
        except TimeoutError:
            pass


def round_arrived(shard_dsn: str, site: Site, time_ms: int) -> bool:
    """Return whether every device's first channel has a reading at `time_ms`.

    A poll travels whole in one batch and is stored in one transaction, so one
    channel of each device shows that the round arrived. The lookup uses the
    primary key.
    """
    with psycopg.connect(shard_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM readings r JOIN channels c ON c.id = r.channel_id "
            "WHERE c.name = %s AND r.installation_id = c.installation_id "
            "AND r.time = %s",
            (site.channels[0].name, EPOCH + timedelta(milliseconds=time_ms)),
        ).fetchone()
    return row is not None and row[0] >= len(site.devices)


async def watch_live(shard_dsn: str, site: Site, rounds: dict[int, float],
                     delays: dict[int, float], stop: asyncio.Event) -> None:
    """Record the delay of each live round until it is in the shard."""
    while not stop.is_set() or len(delays) < len(rounds):
        for time_ms, committed in list(rounds.items()):
            if time_ms not in delays and await asyncio.to_thread(
                    round_arrived, shard_dsn, site, time_ms):
                delays[time_ms] = time.monotonic() - committed
        await asyncio.sleep(0.05)


async def drain(buffer: Buffer, site: Site, url: str, token: str, shard_dsn: str,
                batch_size: int) -> tuple[float, list[float]]:
    """Drain the buffer with live polls flowing; return drain seconds and delays."""
    settings = AgentCollectorConfig(url=url, token=token, batch_size=batch_size,
                                    interval=1.0, timeout=60.0)
    stop_forwarder, stop_live = asyncio.Event(), asyncio.Event()
    rounds: dict[int, float] = {}
    delays: dict[int, float] = {}
    async with Forwarder(buffer, settings, GATEWAY_ID,
                         Backoff(initial=0.1, maximum=2.0)) as forwarder:
        started = time.monotonic()
        tasks = [
            asyncio.create_task(forwarder.run(stop_forwarder)),
            asyncio.create_task(live_poller(buffer, site, stop_live, rounds)),
            asyncio.create_task(watch_live(shard_dsn, site, rounds, delays, stop_live)),
        ]
        while (await asyncio.to_thread(buffer.stats)).polls > 0:
            await asyncio.sleep(0.2)
        drained = time.monotonic() - started
        stop_live.set()
        await tasks[1]
        await tasks[2]
        stop_forwarder.set()
        await tasks[0]
    return drained, [delays[t] for t in sorted(delays)]


async def run(args: argparse.Namespace) -> tuple[Site, Figures]:
    site = build_site(args.devices, args.channels, args.poll_interval)
    root = Path(tempfile.mkdtemp(prefix="solarfleet-bench-"))
    server, database = await asyncio.to_thread(prepare_databases, root)
    collector = None
    try:
        owner = catalog.add_owner(database.catalog, "Bench Owner")
        installation = catalog.add_installation(database.catalog, "bench", owner.id,
                                                shard="shard-1")
        _, token = catalog.add_gateway(database.catalog, GATEWAY_ID, installation.id)
        port = free_port()
        config = CollectorConfig(ServerConfig(port=port), database)
        collector = multiprocessing.get_context("spawn").Process(
            target=serve_collector, args=(config,), daemon=True)
        collector.start()
        await asyncio.to_thread(wait_for_port, port)

        path = root / "buffer.sqlite"
        end_ms = time.time_ns() // 1_000_000 - 60_000
        started = time.monotonic()
        with Buffer(path, "normal", gateway_id=GATEWAY_ID) as buffer:
            readings = await asyncio.to_thread(write_backlog, buffer, site, args.days,
                                               args.backlog_step, end_ms)
        write_seconds = time.monotonic() - started
        size = path.stat().st_size

        with Buffer(path, gateway_id=GATEWAY_ID) as buffer:
            drained, delays = await drain(buffer, site, f"http://127.0.0.1:{port}",
                                          token, database.shards[0].dsn,
                                          args.batch_size)
        return site, Figures(readings, write_seconds, size, drained, delays,
                             args.batch_size)
    finally:
        if collector is not None:
            collector.terminate()
            collector.join(10)
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- reporting ---------------------------------------------------------------------


def report(site: Site, figures: Figures, args: argparse.Namespace) -> str:
    rate = figures.backlog_readings / figures.drain_seconds
    delays = figures.live_delays
    lines = [
        SECTION,
        "",
        f"Measured with `bench/drain.py` on {platform.machine()} Linux, "
        f"{multiprocessing.cpu_count()} cores, Python {platform.python_version()}; "
        "collector in its own process, embedded PostgreSQL, all on one machine.",
        "",
        f"- Site: {len(site.devices)} devices x {len(site.channels)} channels every "
        f"{site.poll_interval:g} s = {site.production_rate:g} readings/s.",
        f"- Backlog: {args.days:g} days, a poll round every {args.backlog_step:g} s: "
        f"{figures.backlog_readings} readings, written in "
        f"{figures.write_seconds:.1f} s with synchronous = normal; buffer file "
        f"{figures.buffer_bytes} bytes "
        f"({figures.buffer_bytes / figures.backlog_readings:.1f} bytes per reading).",
        f"- Drain: {figures.drain_seconds:.1f} s in batches of {figures.batch_size} "
        f"readings = {rate:,.0f} readings/s, "
        f"**{rate / site.production_rate:,.0f} x the site's production rate**.",
        f"- Live delay during the drain (commit to shard, {len(delays)} rounds): "
        f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s, "
        f"against a poll interval of {site.poll_interval:g} s.",
        "",
        "These figures hold for this machine only. On a gateway, the uplink and the",
        "SD card may bound the drain rate instead of the collector.",
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace the "Backlog drain" section of docs/benchmarks.md, keeping the others."""
    current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text + "\n", current).rstrip("\n") + "\n"
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    BENCHMARKS.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=10.0,
                        help="seconds between live poll rounds (default 10)")
    parser.add_argument("--backlog-step", type=float, default=300.0,
                        help="seconds between backlog poll rounds (default 300)")
    parser.add_argument("--batch-size", type=int, default=5000,
                        help="readings per batch (default 5000, the agent's default)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the figures without updating docs/benchmarks.md")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log each batch the forwarder sends")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format="%(relativeCreated)d ms %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("edge_agent.forwarder").setLevel(logging.DEBUG)

    site, figures = asyncio.run(run(args))
    text = report(site, figures, args)
    print(text)
    if args.verbose:
        print("live delays (s):", " ".join(f"{d:.2f}" for d in figures.live_delays))
    if not args.no_write:
        write_section(text)
        print(f"written to {BENCHMARKS}")


if __name__ == "__main__":
    main()
