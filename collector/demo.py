"""`make demo`: a whole solarfleet on one machine, from simulated devices to two shards.

It starts an embedded PostgreSQL holding the catalog and two shards, and creates three
installations spread over both shards. For each installation it serves one simulated site
gateway from the device images in `config/demo/` and runs one `solarfleet-agent run`
process. It runs the collector in this process and prints what arrives until Ctrl-C.
It prints the dashboard's address with an operator key, and after `--outage-after`
seconds it stops the Charlie Storage simulator. Every agent poll interval each
simulated inverter and meter gets a new AC power along a compressed day, and its
lifetime energy counters grow by that power (`edge_agent.sim_live`). Its agent then reports the devices
unreachable, and the alert evaluator, with short `[alerts]` thresholds, opens alerts.

Each start begins from empty databases and buffers under the work directory.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import psycopg
from aiohttp import web

from collector import catalog, databases, embedded, migrate
from collector.app import create_app
from collector.config import (
    EMBEDDED_CATALOG,
    EMBEDDED_SHARDS,
    AlertsConfig,
    CollectorConfig,
    DatabaseConfig,
    ServerConfig,
)
from collector.errors import CollectorError
from edge_agent.images import load_image
from edge_agent.sim_live import LiveSite
from edge_agent.simulator import Simulator

logger = logging.getLogger(__name__)


class DemoError(Exception):
    """The demo cannot start; the message names what to change."""


IMAGES_DIR = Path(__file__).resolve().parent.parent / "config" / "demo"
# AC power channels of the inverter models: integer, float and IEEE 1547 families.
AC_POWER_CHANNELS = ("101.W", "102.W", "103.W", "111.W", "112.W", "113.W", "701.W")
AGENT_STOP_SECONDS = 15.0
POLL_INTERVAL = 2.0  # seconds between the agents' polls and the simulators' updates
# Alert thresholds for the demo: evaluated every 5 s, so that a stopped site shows up in
# the dashboard within a minute instead of the production defaults' quarter hour.
DEMO_ALERTS = AlertsConfig(interval=5.0, gateway_silent_after=60.0, max_sleep=30.0)
OUTAGE_SITE = "Charlie Storage"


@dataclass(frozen=True, slots=True)
class DemoSite:
    """One simulated installation: its name, shard, gateway and device image."""

    name: str
    shard: str
    gateway_id: str
    image: str


SITES = (
    DemoSite("Alpha Solar Farm", "shard-1", "gw-alpha", "site-alpha-1547.json"),
    DemoSite("Bravo Rooftop", "shard-2", "gw-bravo", "site-bravo.json"),
    DemoSite("Charlie Storage", "shard-1", "gw-charlie", "site-charlie.json"),
)


@dataclass
class RunningSite:
    """A demo site with its simulator and agent process."""

    site: DemoSite
    installation_id: int
    simulator: Simulator
    agent: subprocess.Popen[bytes]
    log_path: Path
    live: asyncio.Task[None]


def reset_databases(pg_dir: Path) -> None:
    """Drop the demo's catalog and shard databases so that every run starts empty."""
    server = embedded.start(pg_dir)
    try:
        for dbname in (EMBEDDED_CATALOG, *(db for _, db in EMBEDDED_SHARDS)):
            databases.drop_database(server.admin_dsn, dbname)
    finally:
        server.stop()


def register_sites(catalog_dsn: str) -> list[tuple[DemoSite, int, str]]:
    """Create the demo owner, installations and gateways; return ids and tokens."""
    owner = catalog.add_owner(catalog_dsn, "Demo Solar Ltd", organization="solarfleet demo")
    registered = []
    for site in SITES:
        installation = catalog.add_installation(
            catalog_dsn, site.name, owner.id, shard=site.shard, timezone="Europe/Berlin"
        )
        _, token = catalog.add_gateway(catalog_dsn, site.gateway_id, installation.id)
        registered.append((site, installation.id, token))
    return registered


def add_operator_key(catalog_dsn: str) -> str:
    """Create the demo's operator key, which reads the whole fleet, and return it."""
    _, secret = catalog.add_key(catalog_dsn, "demo-operator")
    return secret


async def stop_site_later(sites: list[RunningSite], delay: float,
                          stop: asyncio.Event) -> None:
    """Stop the `OUTAGE_SITE` simulator after `delay` seconds unless `stop` is set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
        return
    except TimeoutError:
        pass
    running = next(site for site in sites if site.site.name == OUTAGE_SITE)
    await running.simulator.stop()
    click.echo(
        f"stopped the simulator of {OUTAGE_SITE!r} after {delay:g} s: its agent now "
        "reports its devices unreachable, and within about "
        f"{3 * DEMO_ALERTS.interval:g} s the dashboard shows a device-not-reporting "
        "alert"
    )


def write_agent_config(directory: Path, site: DemoSite, url: str, token: str,
                       simulator_port: int, unit_ids: tuple[int, ...]) -> Path:
    """Write the agent config of one demo site and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    units = ", ".join(str(unit) for unit in unit_ids)
    path = directory / "agent.toml"
    path.write_text(
        f'[gateway]\nid = "{site.gateway_id}"\n\n'
        f'[collector]\nurl = "{url}"\ntoken = "{token}"\ninterval = 1.0\n\n'
        f'[buffer]\npath = "buffer.sqlite"\n\n'
        f'[[devices]]\nname = "site-gateway"\ntransport = "tcp"\n'
        f'host = "127.0.0.1"\nport = {simulator_port}\nunit_ids = [{units}]\n'
        f"poll_interval = {POLL_INTERVAL}\ntimeout = 1.0\n"
    )
    return path


def start_agent(config_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `solarfleet-agent run` for one site, logging to a file beside its config."""
    log_path = config_path.with_name("agent.log")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config_path)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    return process, log_path


def stop_agents(sites: list[RunningSite]) -> None:
    """Send SIGTERM to every agent and wait for each, killing one that hangs."""
    for running in sites:
        if running.agent.poll() is None:
            running.agent.send_signal(signal.SIGTERM)
    for running in sites:
        try:
            running.agent.wait(timeout=AGENT_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("agent of %s did not stop in %.0f s; killing it",
                           running.site.name, AGENT_STOP_SECONDS)
            running.agent.kill()
            running.agent.wait()


def shard_summary(dsn: str) -> tuple[int, int, int, int, dict[str, tuple[str, float | None]]]:
    """Count installations, devices, channels and readings on one shard.

    Also returns the latest AC power of each inverter by device id, with its channel.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        installations, devices = conn.execute(
            "SELECT count(DISTINCT installation_id), count(*) FROM devices"
        ).fetchone() or (0, 0)
        channels = (conn.execute("SELECT count(*) FROM channels").fetchone() or (0,))[0]
        readings = (conn.execute("SELECT count(*) FROM readings").fetchone() or (0,))[0]
        rows = conn.execute(
            "SELECT d.device_id, c.name, c.last_value FROM channels c"
            " JOIN devices d ON d.id = c.device_id WHERE c.name = ANY(%s)"
            " ORDER BY d.device_id",
            (list(AC_POWER_CHANNELS),),
        ).fetchall()
    power = {device_id: (name, value) for device_id, name, value in rows}
    return installations, devices, channels, readings, power


def open_alerts(dsn: str) -> list[str]:
    """Return one line per open alert on one shard: installation, kind and message."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT installation_id, kind, message FROM alerts"
            " WHERE resolved_at IS NULL ORDER BY opened_at"
        ).fetchall()
    return [f"  installation {iid} {kind}: {message}" for iid, kind, message in rows]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_summary(elapsed: float, shards: tuple[tuple[str, str], ...]) -> str:
    """Render one summary block of what has arrived in every shard."""
    lines = [f"--- {elapsed:5.0f} s ---"]
    power_parts = []
    alert_parts = []
    for name, dsn in shards:
        try:
            installations, devices, channels, readings, power = shard_summary(dsn)
            alert_parts.extend(open_alerts(dsn))
        except psycopg.Error as err:
            lines.append(f"{name}: unreachable ({str(err).splitlines()[0]})")
            continue
        lines.append(
            f"{name}: {_plural(installations, 'installation')}, "
            f"{_plural(devices, 'device')}, {_plural(channels, 'channel')}, "
            f"{_plural(readings, 'reading')}"
        )
        for device_id, (channel, value) in power.items():
            shown = "no value" if value is None else f"{value:g} W"
            power_parts.append(f"  {device_id} ({name}) {channel} = {shown}")
    if power_parts:
        lines.append("latest AC power:")
        lines.extend(power_parts)
    if alert_parts:
        lines.append("open alerts:")
        lines.extend(alert_parts)
    return "\n".join(lines)


async def start_sites(workdir: Path, url: str,
                      registered: list[tuple[DemoSite, int, str]]) -> list[RunningSite]:
    """Serve each site's simulated gateway and start its agent."""
    running = []
    for site, installation_id, token in registered:
        image = load_image(IMAGES_DIR / site.image)
        simulator = Simulator(image, port=0)
        await simulator.start()
        config_path = write_agent_config(
            workdir / "agents" / site.gateway_id, site, url, token,
            simulator.port, tuple(image.units),
        )
        agent, log_path = start_agent(config_path)
        live = asyncio.create_task(LiveSite(simulator).run(POLL_INTERVAL))
        running.append(
            RunningSite(site, installation_id, simulator, agent, log_path, live)
        )
        click.echo(
            f"site {site.name!r}: installation {installation_id} on {site.shard}, "
            f"simulator on 127.0.0.1:{simulator.port} units "
            f"{', '.join(map(str, image.units))}, agent log {log_path}"
        )
    return running


async def watch(shards: tuple[tuple[str, str], ...], sites: list[RunningSite],
                stop: asyncio.Event, interval: float, duration: float | None) -> None:
    """Print a summary every `interval` seconds until `stop` or `duration` runs out."""
    started = time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
        elapsed = time.monotonic() - started
        click.echo(await asyncio.to_thread(format_summary, elapsed, shards))
        for running in sites:
            if running.agent.poll() is not None:
                click.echo(f"agent of {running.site.name!r} exited with status "
                           f"{running.agent.returncode}; see {running.log_path}")
                stop.set()
        if duration is not None and elapsed >= duration:
            stop.set()


def lock_workdir(workdir: Path) -> int:
    """Take an exclusive lock on the work directory, held until this process exits.

    A second demo on the same directory would drop the first one's databases.

    :raises DemoError: another demo holds the lock.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(workdir / "demo.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(descriptor)
        raise DemoError(
            f"another demo is running in {workdir}: stop it, or start this one with "
            "--workdir DIR and --port N"
        ) from err
    return descriptor


def check_port_free(port: int) -> None:
    """Raise DemoError unless 127.0.0.1:`port` can be bound now."""
    with socket.socket() as probe:
        # As the collector's listener does, so that connections in TIME_WAIT from a
        # previous run do not count as in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise DemoError(
                f"port {port} on 127.0.0.1 is in use ({err.strerror}): "
                "start the demo with --port N"
            ) from err


async def run_demo(workdir: Path, port: int, interval: float,
                   duration: float | None, outage_after: float) -> None:
    """Run the whole demo until Ctrl-C (or `duration` seconds) and shut it down."""
    lock_workdir(workdir)
    check_port_free(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    shutil.rmtree(workdir / "agents", ignore_errors=True)
    pg_dir = workdir / "pg"
    click.echo(f"starting embedded PostgreSQL in {pg_dir}")
    await asyncio.to_thread(reset_databases, pg_dir)
    config = CollectorConfig(
        server=ServerConfig(host="127.0.0.1", port=port),
        database=DatabaseConfig(embedded_dir=pg_dir),
        alerts=DEMO_ALERTS,
    )
    dbs = await asyncio.to_thread(migrate.prepare, config.database)
    runner = web.AppRunner(create_app(config))
    sites: list[RunningSite] = []
    outage: asyncio.Task[None] | None = None
    try:
        registered = await asyncio.to_thread(register_sites, dbs.catalog_dsn)
        key = await asyncio.to_thread(add_operator_key, dbs.catalog_dsn)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        click.echo(f"collector listening on {url}")
        sites = await start_sites(workdir, url, registered)
        click.echo(f"dashboard: {url}/#key={key}")
        click.echo("waiting for readings; press Ctrl-C to stop")
        shards = tuple((shard.name, shard.dsn) for shard in dbs.shards)
        if outage_after > 0:
            outage = asyncio.create_task(stop_site_later(sites, outage_after, stop))
        await watch(shards, sites, stop, interval, duration)
    finally:
        click.echo("stopping agents, simulators and collector")
        if outage is not None:
            outage.cancel()
        await asyncio.to_thread(stop_agents, sites)
        for running in sites:
            running.live.cancel()
            await running.simulator.stop()
        await runner.cleanup()
        await asyncio.to_thread(dbs.close)
        click.echo("demo stopped")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("var/demo"), show_default=True,
              help="Directory for the embedded PostgreSQL, agent configs and buffers.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="TCP port of the collector on 127.0.0.1.")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0,
              show_default=True, help="Seconds between summaries.")
@click.option("--duration", type=click.FloatRange(min=1.0), default=None,
              help="Stop after this many seconds instead of waiting for Ctrl-C.")
@click.option("--outage-after", type=click.FloatRange(min=0.0), default=60.0,
              show_default=True,
              help=f"Seconds after which the {OUTAGE_SITE} simulator stops, so that "
              "alerts open; 0 keeps it running.")
def main(workdir: Path, port: int, interval: float, duration: float | None,
         outage_after: float) -> None:
    """Run simulated sites, agents, the collector and PostgreSQL, and show what arrives."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_demo(workdir, port, interval, duration, outage_after))
    except (CollectorError, DemoError, OSError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
