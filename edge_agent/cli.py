"""The `solarfleet-agent` command: thin click commands over the agent's library."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click

from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import AgentError, ConfigError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class _Group(click.Group):
    """Turn every AgentError into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AgentError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def main(verbose: bool) -> None:
    """Poll Modbus devices on a solar site and forward their readings."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pymodbus logs every failed connect and unanswered request itself. The transport
    # translates those and logs an outage once, so pymodbus logs only with -v.
    pymodbus_level = logging.DEBUG if verbose else logging.CRITICAL
    logging.getLogger("pymodbus").setLevel(pymodbus_level)


_CONFIG_FILE = click.Path(dir_okay=False, path_type=Path)


@main.command()
@click.option("--config", "config_path", required=True, type=_CONFIG_FILE,
              help="Agent config file (TOML).")
def run(config_path: Path) -> None:
    """Poll, buffer and forward until SIGTERM or Ctrl-C.

    Example: solarfleet-agent run --config /etc/solarfleet/agent.toml
    """
    config = _load_one_line(config_path)
    from edge_agent.agent import run_agent

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_agent(config, stop)

    asyncio.run(serve())


@main.command("check-config")
@click.argument("config_path", metavar="FILE", type=_CONFIG_FILE)
def check_config_command(config_path: Path) -> None:
    """Check an agent config file; print one line per problem.

    Exits with status 1 when there is a problem.

    Example: solarfleet-agent check-config /etc/solarfleet/agent.toml
    """
    try:
        config = load_config(config_path)
    except ConfigError as err:
        click.echo(str(err), err=True)
        sys.exit(1)
    click.echo(f"ok: {len(config.devices)} device groups, {config.unit_count} units")


@main.command("buffer")
@click.option("--config", "config_path", required=True, type=_CONFIG_FILE,
              help="Agent config file (TOML) that names the buffer file.")
def buffer_command(config_path: Path) -> None:
    """Show what waits in the buffer, and the quarantined batches.

    Example: solarfleet-agent buffer --config /etc/solarfleet/agent.toml
    """
    from edge_agent.buffer import Buffer

    config = _load_one_line(config_path)
    path = config.buffer.path
    if not path.exists():
        raise AgentError(f"no buffer file at {path} yet; it is created by "
                         "`solarfleet-agent run`")
    with Buffer(path, config.buffer.synchronous,
                gateway_id=config.gateway_id) as buffer:
        stats = buffer.stats()
        quarantined = buffer.quarantined()

    age = stats.oldest_age(time.time_ns() // 1_000_000)
    click.echo(f"buffer: {path}")
    click.echo(f"waiting: {stats.readings} readings in {stats.polls} polls")
    click.echo(f"size: {stats.bytes} bytes")
    click.echo(f"oldest: {'none' if age is None else f'{age:.0f} s ago'}")
    click.echo(f"quarantined: {stats.quarantined_batches} batches, "
               f"{stats.quarantined_readings} readings")
    for batch in quarantined:
        when = datetime.fromtimestamp(batch.quarantined_ms / 1000, UTC)
        click.echo(f"  {batch.batch_id} {when:%Y-%m-%dT%H:%M:%SZ} "
                   f"{batch.readings} readings: {batch.reason}")


@main.command()
@click.argument("image_paths", metavar="IMAGE...", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", required=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on (0 picks a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on.")
@click.option("--framer", type=click.Choice(["tcp", "rtu-over-tcp"]), default="tcp",
              show_default=True,
              help="Modbus TCP, or RTU frames over TCP like a serial gateway.")
def simulate(image_paths: tuple[Path, ...], port: int, host: str, framer: str) -> None:
    """Serve device images as Modbus devices until SIGTERM or Ctrl-C.

    Register images keep their unit ids. The Nth pysunspec2 device JSON file gets
    unit id N.

    Example: solarfleet-agent simulate tests/fixtures/cases/C06.json --port 5020
    """
    from edge_agent.images import load_images, merge_images
    from edge_agent.simulator import Simulator

    images = load_images(list(image_paths))
    simulator = Simulator(merge_images(images), host=host, port=port,
                          framer=framer)  # type: ignore[arg-type]

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with simulator:
            for image in images:
                for unit in image.units:
                    click.echo(f"serving {image.name} as unit {unit} on "
                               f"{simulator.address} ({framer})")
            await stop.wait()

    asyncio.run(serve())


def _load_one_line(config_path: Path) -> AgentConfig:
    """Load the config, reporting only its first problem, with a pointer to the rest."""
    try:
        return load_config(config_path)
    except ConfigError as err:
        lines = str(err).splitlines()
        more = len(lines) - 1
        if more:
            lines[0] += (f" (and {more} more; run `solarfleet-agent check-config "
                         f"{config_path}`)")
        raise ConfigError(lines[0]) from None
