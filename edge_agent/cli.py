"""The `solarfleet-agent` command: thin click commands over the agent's library."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import AgentError, ConfigError

if TYPE_CHECKING:
    from edge_agent.scan import ConfigHead

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
    from edge_agent.service import configure_logging

    configure_logging(logging.DEBUG if verbose else logging.INFO)
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
    """Show what waits in the buffer, what it dropped, and the quarantined batches.

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
        gaps = buffer.gaps()

    age = stats.oldest_age(time.time_ns() // 1_000_000)
    click.echo(f"buffer: {path}")
    click.echo(f"waiting: {stats.readings} readings in {stats.polls} polls")
    click.echo(f"size: {stats.bytes} bytes")
    click.echo(f"oldest: {'none' if age is None else f'{age:.0f} s ago'}")
    click.echo(f"quarantined: {stats.quarantined_batches} batches, "
               f"{stats.quarantined_readings} readings")
    for batch in quarantined:
        click.echo(f"  {batch.batch_id} {_utc(batch.quarantined_ms)} "
                   f"{batch.readings} readings: {batch.reason}")
    click.echo(f"dropped: {stats.dropped_readings} readings in "
               f"{stats.dropped_polls} polls")
    for entry in gaps:
        gap = entry.gap
        if entry.reported_ms is not None:
            status = f"reported {_utc(entry.reported_ms)}"
        elif entry.batch_id is not None:
            status = f"in batch {entry.batch_id}"
        else:
            status = "not sent yet"
        click.echo(f"  {gap.device_id} {_utc(gap.first_ms)}..{_utc(gap.last_ms)} "
                   f"{gap.readings} readings in {gap.polls} polls: {gap.reason}, "
                   f"{status}")


@main.command("status")
@click.option("--config", "config_path", required=True, type=_CONFIG_FILE,
              help="Agent config file (TOML) of the running agent.")
def status_command(config_path: Path) -> None:
    """Show each device's last poll, the buffer and the collector link.

    The running agent publishes its status every [status] interval seconds. The
    command reads it from the agent's HTTP endpoint when [status] port is set, and
    from the status file beside the buffer otherwise or when the endpoint does not
    reply.

    Example: solarfleet-agent status --config /etc/solarfleet/agent.toml
    """
    from edge_agent.errors import StatusError
    from edge_agent.status import fetch_status, format_status, read_status

    settings = _load_one_line(config_path).status_config
    if settings.port is None:
        status = read_status(settings.path)
    else:
        try:
            status = fetch_status(settings)
        except StatusError as err:
            click.echo(f"note: {err}; showing the status file {settings.path}",
                       err=True)
            status = read_status(settings.path)
    for line in format_status(status, time.time_ns() // 1_000_000):
        click.echo(line)


def _utc(time_ms: int) -> str:
    return f"{datetime.fromtimestamp(time_ms / 1000, UTC):%Y-%m-%dT%H:%M:%SZ}"


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


# --- installer tools: scan and read -------------------------------------------------

def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # click's FloatRange lets nan through, because every comparison with nan is false.
    if math.isnan(value):
        raise click.BadParameter(f"{value} is not a number of seconds.")
    return value


_TIMEOUT = click.option("--timeout", type=click.FloatRange(0, 60, min_open=True),
                        callback=_finite,
                        default=1.0, show_default=True,
                        help="Seconds to wait for each response.")
_BAUDRATE = click.option("--baudrate", type=click.IntRange(1), default=9600,
                         show_default=True,
                         help="Serial speed in baud (serial device targets only).")
_PARITY = click.option("--parity", type=click.Choice(["N", "E", "O"]), default="N",
                       show_default=True,
                       help="Serial parity (serial device targets only).")
_TARGET_HELP = ("TARGET is host[:port] (Modbus TCP, port 502 by default), "
                "rtu-over-tcp://host:port (a serial gateway) or a serial device "
                "path such as /dev/ttyUSB0.")
# Progress lines go to stderr only for scans this long, so short scans stay quiet.
_PROGRESS_FROM = 20


@main.command()
@click.argument("target")
@click.option("--units", default=None, metavar="LIST",
              help="Unit ids to probe, as numbers and ranges, e.g. 1-247 or 1,3,240. "
                   "Default: 1-10 (devices numbered in a row on an RS485 chain) and "
                   "126, 240, 247 (where gateways in the field put SunSpec maps and "
                   "meters).")
@click.option("--bases", default="40000,0,50000", show_default=True, metavar="LIST",
              help="Addresses to look for the SunS marker at, in order.")
@_TIMEOUT
@_BAUDRATE
@_PARITY
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--write-config", "config_path", type=_CONFIG_FILE, default=None,
              help="Write the devices found as a [[devices]] table to this agent "
                   "config. A new file also gets [gateway], [collector] and [buffer] "
                   "tables, with placeholders for the values that --gateway-id, "
                   "--collector-url and --token do not set. An existing file is "
                   "appended to.")
@click.option("--gateway-id", default=None, metavar="ID",
              help="Gateway id for a new --write-config file, as registered with "
                   "`solarfleet-collector gateways add`.")
@click.option("--collector-url", default=None, metavar="URL",
              help="Collector base URL for a new --write-config file. Default: "
                   "http://127.0.0.1:8080.")
@click.option("--token", default=None, metavar="TOKEN",
              help="Gateway token for a new --write-config file, as printed by "
                   "`solarfleet-collector gateways add`.")
def scan(target: str, units: str | None, bases: str, timeout: float, baudrate: int,
         parity: str, as_json: bool, config_path: Path | None, gateway_id: str | None,
         collector_url: str | None, token: str | None) -> None:
    """Find SunSpec devices on a Modbus endpoint and show what each unit id holds.

    TARGET is host[:port] (Modbus TCP, port 502 by default),
    rtu-over-tcp://host:port (a serial gateway) or a serial device path such
    as /dev/ttyUSB0. Exits with status 1 when the target cannot be reached or
    no device was found.

    Example: solarfleet-agent scan 192.168.1.20 --units 1-10,126 --write-config agent.toml
    """
    from edge_agent import scan as scanning

    _quiet_unless_verbose()
    head = scanning.ConfigHead(gateway_id, collector_url, token)
    _check_head_options(config_path, head)
    try:
        settings = scanning.parse_target(target, timeout=timeout, baudrate=baudrate,
                                         parity=parity)
        unit_ids = scanning.parse_numbers(units or scanning.DEFAULT_UNITS, 1,
                                          scanning.MAX_UNIT, "unit id")
        base_list = scanning.parse_numbers(bases, 0, 65533, "base address")
        results = asyncio.run(scanning.Scanner(settings, base_list).scan(
            unit_ids, _scan_progress if len(unit_ids) >= _PROGRESS_FROM else None))
    except scanning.ScanError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)

    if as_json:
        click.echo(json.dumps([result.to_json() for result in results], indent=2))
    else:
        _print_scan(settings.label, results)
    if not any(result.devices for result in results):
        click.echo(f"error: no SunSpec device found on {settings.label}", err=True)
        sys.exit(1)
    if config_path is not None:
        _write_scan_config(config_path, head, settings, results)


def _check_head_options(path: Path | None, head: ConfigHead) -> None:
    """Exit with one line where --gateway-id, --collector-url or --token is unused."""
    from edge_agent.scan import join_names

    values = {"--gateway-id": head.gateway_id, "--collector-url": head.collector_url,
              "--token": head.token}
    options = [option for option, value in values.items() if value is not None]
    if not options:
        return
    if path is None:
        click.echo(f"error: without --write-config there is no config file for "
                   f"{join_names(options)}; add --write-config FILE", err=True)
        sys.exit(1)
    if path.exists():
        click.echo(f"error: {path} already exists, and scan only appends a "
                   f"[[devices]] table to it; leave out {join_names(options)} and "
                   "edit the file, or choose a new file", err=True)
        sys.exit(1)


def _scan_progress(position: int, total: int, unit: int) -> None:
    click.echo(f"scanning unit {unit} ({position}/{total})", err=True)


def _print_scan(label: str, results: list) -> None:
    from edge_agent.scan import describe_numbers

    failures: dict[str, list[int]] = {}
    for result in results:
        if result.failure is not None:
            failures.setdefault(result.failure, []).append(result.unit)
            continue
        click.echo(f"unit {result.unit}: SunSpec map at {result.base}")
        for device in result.devices:
            models = ", ".join(str(model) for model in device.models)
            click.echo(f"  device at {device.at}: {device.manufacturer} "
                       f"{device.model}, serial {_or_dash(device.serial)}, "
                       f"version {_or_dash(device.version)}, models {models}")
        for note in result.notes:
            click.echo(f"  note: {note}")
    for failure, units in failures.items():
        noun = "unit" if len(units) == 1 else "units"
        click.echo(f"{noun} {describe_numbers(units)}: {failure}")
    found = sum(len(result.devices) for result in results)
    with_devices = sum(1 for result in results if result.devices)
    noun = "device" if found == 1 else "devices"
    click.echo(f"found {found} {noun} on {with_devices} of {len(results)} unit ids "
               f"at {label}")


def _write_scan_config(path: Path, head: ConfigHead, settings,
                       results: list) -> None:
    from edge_agent.scan import config_section, describe_numbers, join_names

    section = config_section(settings, results, name=settings.label)
    units = describe_numbers([result.unit for result in results if result.devices])
    if not path.exists():
        path.write_text(head.to_toml() + section)
        check = f"`solarfleet-agent check-config {path}`"
        if head.unset:
            click.echo(f"wrote {path} with units {units}; replace the "
                       f"{join_names(head.unset)}, then run {check}", err=True)
        else:
            click.echo(f"wrote {path} with units {units}; check it with {check}",
                       err=True)
        return
    _check_can_append(path, settings)
    with path.open("a") as file:
        file.write("\n" + section)
    click.echo(f"appended a [[devices]] table for units {units} to {path}", err=True)


def _check_can_append(path: Path, settings) -> None:
    """Exit with one line where appending to the config would make it invalid."""
    import tomllib

    try:
        document = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        click.echo(f"error: {path}: cannot add to it ({err}); fix the file or choose "
                   "a new one", err=True)
        sys.exit(1)
    for table in document.get("devices", []):
        same_port = table.get("serial_port") == settings.serial_port
        same_host = (table.get("host"), table.get("port", 502)) == (settings.host,
                                                                     settings.port)
        same = same_port if settings.transport == "rtu" else same_host
        if same or table.get("name") == settings.label:
            click.echo(f"error: {path} already has a [[devices]] table for "
                       f"{settings.label}; edit its unit_ids by hand or choose a new "
                       "file", err=True)
            sys.exit(1)


@main.command()
@click.argument("target")
@click.option("--unit", "unit", required=True, type=click.IntRange(1, 247),
              help="Modbus unit id to read.")
@click.option("--profile", default=None, metavar="NAME",
              help="Device profile: a register map for a device without SunSpec, or "
                   "the extra registers of a SunSpec device.")
@click.option("--profiles-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder of device profiles beside the built-in ones.")
@_TIMEOUT
@_BAUDRATE
@_PARITY
@click.option("--json", "as_json", is_flag=True,
              help='Print [{"channel", "value", "unit", "device"}] as JSON, with '
                   "null for no value.")
def read(target: str, unit: int, profile: str | None, profiles_dir: Path | None,
         timeout: float, baudrate: int, parity: str, as_json: bool) -> None:
    """Poll one unit once and print its decoded values with their units.

    TARGET is host[:port], rtu-over-tcp://host:port or a serial device path.
    A value the device reports as not implemented is shown as "—" (null in
    JSON). Exits with status 1 when the unit cannot be read.

    Example: solarfleet-agent read 192.168.1.20 --unit 1
    """
    from edge_agent import scan as scanning
    from edge_agent.decode import finite
    from edge_agent.profiles import load_profiles

    _quiet_unless_verbose()
    profiles = load_profiles(profiles_dir)
    register_map = profiles.register_map(profile) if profile else None
    try:
        settings = scanning.parse_target(target, timeout=timeout, baudrate=baudrate,
                                         parity=parity)
        reading = asyncio.run(scanning.read_unit(settings, unit, register_map,
                                                 profiles))
    except scanning.ScanError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    if reading.failure is not None:
        click.echo(f"error: {reading.failure}", err=True)
        sys.exit(1)

    if as_json:
        # Decoders return no NaN or infinity, and `finite` keeps it so: JSON has neither.
        rows = [{"channel": channel.name, "value": finite(poll.values.get(channel.name)),
                 "unit": channel.unit, "device": poll.device.device_id}
                for poll in reading.polls for channel in poll.channels]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False, allow_nan=False))
        return
    for poll in reading.polls:
        _print_poll(poll)


def _print_poll(poll) -> None:
    device = poll.device
    name = " ".join(part for part in (device.manufacturer, device.model) if part)
    click.echo(f"{device.address}: {name or 'device'}, serial "
               f"{_or_dash(device.serial)}, {poll.state.value}")
    width = max((len(channel.name) for channel in poll.channels), default=0)
    for channel in poll.channels:
        value = poll.values.get(channel.name)
        text = "—" if value is None else repr(value)
        unit = f" {channel.unit}" if channel.unit and value is not None else ""
        click.echo(f"  {channel.name:<{width}}  {text}{unit}")


def _or_dash(text: str | None) -> str:
    return "—" if text is None else text


def _quiet_unless_verbose() -> None:
    """Keep the agent's log lines off an installer's screen unless -v was given.

    The commands print each problem themselves, so a log line would repeat it.
    """
    context = click.get_current_context()
    if context.find_root().params.get("verbose"):
        return
    logger = logging.getLogger("edge_agent")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    context.call_on_close(lambda: logger.setLevel(level))
