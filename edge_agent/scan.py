"""The installer's tools: scan an endpoint for SunSpec devices, and read a unit once.

`scan` probes each unit id for the SunS marker, walks the model chain and reports what
it found, with the quirks it noticed, or why a unit gave no device. `read_unit` polls one
unit once with the same pollers the agent runs. `config_section` turns a scan into a
``[[devices]]`` table for the agent config.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edge_agent.config import PLACEHOLDER_PREFIX
from edge_agent.endpoint import EndpointSettings
from edge_agent.errors import AgentError
from edge_agent.poller import make_poller
from edge_agent.profiles import Profiles, RegisterMap, builtin_profiles
from edge_agent.readings import DeviceState, Poll
from edge_agent.sunspec import (
    COMMON_MODEL_ID,
    DEFAULT_BASES,
    END_MODEL_ID,
    DeviceMap,
    MalformedMap,
    NoDevice,
    NotSunSpec,
    cut_addresses,
    discover,
    model_definition,
    plan_reads,
    read_registers,
)
from edge_agent.transport import (
    EXCEPTION_NAMES,
    ModbusConnectionRefused,
    ModbusDisconnected,
    ModbusEndpoint,
    ModbusError,
    ModbusExceptionResponse,
    ModbusTimeout,
)

logger = logging.getLogger(__name__)

# Unit ids 1-10 cover devices numbered in a row on an RS485 chain. 126, 240 and 247
# are ids where SunSpec maps and meters were found behind gateways in the field.
DEFAULT_UNITS = "1-10,126,240,247"
MAX_UNIT = 247
_HOST_PORT = re.compile(r"(?P<host>[^:/\s]+)(?::(?P<port>\d+))?")


class ScanError(AgentError):
    """A scan or read cannot run: a bad target, or an endpoint that cannot be reached."""


# --- arguments ----------------------------------------------------------------------


def parse_target(target: str, *, timeout: float = 1.0, baudrate: int = 9600,
                 parity: str = "N") -> EndpointSettings:
    """Turn `host[:port]`, `rtu-over-tcp://host:port` or a serial path into settings.

    :raises ScanError: the target is none of these forms.
    """
    if target.startswith("/"):
        return EndpointSettings(transport="rtu", serial_port=target, timeout=timeout,
                                baudrate=baudrate, parity=parity)  # type: ignore[arg-type]
    transport = "tcp"
    rest = target
    for scheme in ("rtu-over-tcp", "tcp"):
        if target.startswith(f"{scheme}://"):
            transport, rest = scheme, target.removeprefix(f"{scheme}://")
    match = _HOST_PORT.fullmatch(rest)
    port = int(match["port"]) if match and match["port"] else 502
    if match is None or not 1 <= port <= 65535:
        raise ScanError(f"target {target!r} is not host[:port], "
                        "rtu-over-tcp://host:port or a serial device path like "
                        "/dev/ttyUSB0; check the target")
    return EndpointSettings(transport=transport, host=match["host"],  # type: ignore[arg-type]
                            port=port, timeout=timeout)


def parse_numbers(text: str, low: int, high: int, kind: str) -> tuple[int, ...]:
    """Parse "1-10,126,240" into unit ids or addresses in order, without repeats.

    :raises ScanError: an item is not a number or range within [low, high].
    """
    numbers: dict[int, None] = {}
    for item in text.split(","):
        first, _, last = item.strip().partition("-")
        # isdigit alone accepts "²", which int() rejects.
        if not _is_ascii_number(first) or (last and not _is_ascii_number(last)):
            raise ScanError(f"{kind} {item.strip()!r} is not a number or a range like "
                            f"1-10; write them as in {DEFAULT_UNITS}")
        start, end = int(first), int(last or first)
        if start > end:
            raise ScanError(f"{kind} range {item.strip()} is reversed; write it as "
                            f"{end}-{start}")
        if not low <= start <= end <= high:
            raise ScanError(f"{kind} {item.strip()} is outside {low}-{high}; use "
                            f"numbers from {low} to {high}")
        numbers.update(dict.fromkeys(range(start, end + 1)))
    return tuple(numbers)


def _is_ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def describe_numbers(numbers: Sequence[int]) -> str:
    """Write numbers as ranges: [1, 2, 3, 126] -> "1-3, 126"."""
    parts: list[str] = []
    ordered = sorted(numbers)
    start = previous = ordered[0] if ordered else 0
    for number in [*ordered[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(parts) if ordered else ""


# --- scanning -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoundDevice:
    """One device found on a unit: a common model and the models after it."""

    at: int  # address of its common model's ID register
    manufacturer: str | None
    model: str | None
    serial: str | None
    version: str | None
    models: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UnitResult:
    """Result of scanning one unit id: the devices found, or why none was found."""

    unit: int
    state: DeviceState
    base: int | None = None
    devices: tuple[FoundDevice, ...] = ()
    notes: tuple[str, ...] = ()  # quirks noticed, one short sentence each
    failure: str | None = None

    def to_json(self) -> dict[str, object]:
        """Return the result as a JSON object."""
        return {
            "unit": self.unit, "state": self.state.value, "base": self.base,
            "devices": [
                {"at": device.at, "manufacturer": device.manufacturer,
                 "model": device.model, "serial": device.serial,
                 "version": device.version, "models": list(device.models)}
                for device in self.devices
            ],
            "notes": list(self.notes), "failure": self.failure,
        }


Progress = Callable[[int, int, int], None]  # (position from 1, total, unit id)


@dataclass
class Scanner:
    """Scans the unit ids of one endpoint, one unit at a time over one connection."""

    settings: EndpointSettings
    bases: Sequence[int] = DEFAULT_BASES
    profiles: Profiles = field(default_factory=builtin_profiles)

    async def scan(self, units: Sequence[int],
                   progress: Progress | None = None) -> list[UnitResult]:
        """Scan `units` in order.

        :raises ScanError: the endpoint cannot be connected to.
        """
        endpoint = ModbusEndpoint(self.settings)
        results = []
        try:
            for position, unit in enumerate(units, start=1):
                if progress is not None:
                    progress(position, len(units), unit)
                results.append(await self._scan_unit(endpoint, unit))
        finally:
            await endpoint.close()
        return results

    async def _scan_unit(self, endpoint: ModbusEndpoint, unit: int) -> UnitResult:
        try:
            device_map = await discover(endpoint, unit, self.bases)
            notes = await self._notice(endpoint, device_map)
        except ModbusError as err:
            _raise_unreachable(err)
            return _failed(unit, err, self.settings, self.bases)
        except (NoDevice, NotSunSpec, MalformedMap) as err:
            return _failed(unit, err, self.settings, self.bases)

        devices = tuple(
            FoundDevice(device.at, device.identity.manufacturer, device.identity.model,
                        device.identity.serial, device.identity.version,
                        tuple(model.model_id for model in device.models))
            for device in device_map.devices
        )
        return UnitResult(unit, DeviceState.ONLINE, device_map.base, devices,
                          tuple(notes))

    async def _notice(self, endpoint: ModbusEndpoint, device_map: DeviceMap) -> list[str]:
        """Describe how the unit departs from a plain SunSpec map."""
        notes = []
        for device in device_map.devices:
            if device.models[0].length == 65:
                notes.append(f"common model at {device.at} is 65 registers long "
                             "(no pad register)")
        notes += [f"model {m.model_id} at {m.address} has no public definition, so "
                  "its values are not read" for m in device_map.models
                  if m.model_id != COMMON_MODEL_ID and not model_definition(m.model_id)]
        notes += [f"registers {first}-{last} are read one at a time (longer reads are "
                  "rejected)" for first, last in device_map.fragile]
        notes += await _notice_reads(endpoint, device_map)
        notes += await _notice_end(endpoint, device_map)
        for device in device_map.devices:
            identity = device.identity
            for quirk in self.profiles.quirks_for(identity.manufacturer, identity.model):
                notes.append(f"matches quirk {quirk.name}: {quirk.describe()}")
        return notes


async def _notice_reads(endpoint: ModbusEndpoint, device_map: DeviceMap) -> list[str]:
    """Read every model once and report reads the device rejected as too long."""
    models = device_map.models
    planned = plan_reads(models, endpoint.settings.max_registers, device_map.fragile)
    _, done = await read_registers(endpoint, device_map.unit, planned,
                                   cut_addresses(models))
    rejected = {read.count for read in planned if read not in done}
    if not rejected or not done:
        return []
    largest = max(read.count for read in done)
    return [f"reads of {max(rejected)} registers are rejected, reads of {largest} "
            f"work; set max_registers = {largest} or lower"]


async def _notice_end(endpoint: ModbusEndpoint, device_map: DeviceMap) -> list[str]:
    """Report a chain that ends without the 0xFFFF end marker."""
    end = device_map.models[-1].end
    if device_map.problems:
        return [problem.split(": ", 1)[-1] for problem in device_map.problems]
    try:
        words = await endpoint.read(device_map.unit, end, 1)
    except ModbusExceptionResponse as err:
        return [f"chain has no end marker: register {end} responds with exception {err.code}"]
    if words[0] != END_MODEL_ID:
        return [f"chain has no end marker: register {end} reads {words[0]:#06x}"]
    return []


def _raise_unreachable(err: ModbusError) -> None:
    """Raise ScanError where the endpoint itself cannot be reached."""
    if isinstance(err, ModbusConnectionRefused) or (
        isinstance(err, ModbusDisconnected) and err.unit is None
    ):
        raise ScanError(str(err).split("; next attempt")[0]) from err


def _failed(unit: int, err: Exception, settings: EndpointSettings,
            bases: Sequence[int]) -> UnitResult:
    if isinstance(err, NoDevice):
        code = getattr(err.__cause__, "code", 11)
        return UnitResult(unit, DeviceState.OFFLINE,
                          failure=f"no device: the gateway responded with exception {code}")
    if isinstance(err, NotSunSpec):
        listed = ", ".join(str(b) for b in bases)
        return UnitResult(unit, DeviceState.NOT_SUNSPEC, failure=(
            f"not SunSpec: responds, but has no SunS marker at {listed}; read it with a "
            "device profile"))
    if isinstance(err, MalformedMap):
        return UnitResult(unit, DeviceState.MALFORMED,
                          failure=str(err).split(": ", 1)[-1])
    if isinstance(err, ModbusTimeout):
        return UnitResult(unit, DeviceState.OFFLINE,
                          failure=f"no answer within {settings.timeout:g} s")
    if isinstance(err, ModbusExceptionResponse):
        name = EXCEPTION_NAMES.get(err.code, "unknown exception")
        return UnitResult(unit, DeviceState.OFFLINE, failure=(
            f"exception {err.code} ({name}) while reading register {err.address}"))
    return UnitResult(unit, DeviceState.OFFLINE, failure=str(err).split(": ", 1)[-1])


# --- reading ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitReading:
    """Result of reading one unit once: its polls, or why it could not be read."""

    polls: tuple[Poll, ...]
    failure: str | None = None


async def read_unit(settings: EndpointSettings, unit: int,
                    profile: RegisterMap | None = None,
                    profiles: Profiles | None = None) -> UnitReading:
    """Poll one unit once, as the agent would, and return its polls.

    :raises ScanError: the endpoint cannot be connected to.
    """
    profiles = profiles or builtin_profiles()
    endpoint = ModbusEndpoint(settings)
    poller = make_poller(endpoint, unit, profile, quirks=profiles.quirks)
    try:
        polls = await poller.poll_devices()
    finally:
        await endpoint.close()
    failure = poller.last_error if polls[0].state not in _ANSWERED else None
    if isinstance(poller.last_exception, ModbusError):
        _raise_unreachable(poller.last_exception)
    return UnitReading(tuple(polls), failure)


_ANSWERED = (DeviceState.ONLINE, DeviceState.SLEEPING)


# --- config -------------------------------------------------------------------------


def config_section(settings: EndpointSettings, results: Sequence[UnitResult],
                   name: str) -> str:
    """Write a [[devices]] table for the SunSpec units a scan found."""
    found = [r.unit for r in results if r.devices]
    lines = ["[[devices]]", f"name = {_quote(name)}",
             f"transport = {_quote(settings.transport)}"]
    if settings.transport == "rtu":
        lines += [f"serial_port = {_quote(str(settings.serial_port))}",
                  f"baudrate = {settings.baudrate}",
                  f"parity = {_quote(settings.parity)}"]
    else:
        lines += [f"host = {_quote(str(settings.host))}", f"port = {settings.port}"]
    lines += [f"unit_ids = [{', '.join(str(unit) for unit in found)}]",
              "poll_interval = 10.0"]
    for result in results:
        if result.state == DeviceState.NOT_SUNSPEC:
            lines.append(f"# Unit {result.unit} responds without SunSpec: add it to "
                         f"unit_ids with unit_profiles = {{{result.unit} = "
                         '"<profile>"}.')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class ConfigHead:
    """The [gateway], [collector] and [buffer] tables that start a config from a scan.

    A gateway id or token left None is written as a placeholder starting with
    PLACEHOLDER_PREFIX, which `check-config` rejects. A collector URL left None is
    written as http://127.0.0.1:8080.
    """

    gateway_id: str | None = None
    collector_url: str | None = None
    token: str | None = None

    @property
    def unset(self) -> list[str]:
        """Names of the values that were not given, in the words of the CLI messages."""
        values = {"gateway id": self.gateway_id, "collector URL": self.collector_url,
                  "token": self.token}
        return [name for name, value in values.items() if value is None]

    def to_toml(self) -> str:
        """Write the tables, with a comment on what is left to fill in."""
        gateway_id = self.gateway_id
        if gateway_id is None:
            gateway_id = PLACEHOLDER_PREFIX + "the-gateway-id"
        url = self.collector_url
        if url is None:
            url = "http://127.0.0.1:8080"
        token = self.token
        if token is None:
            token = PLACEHOLDER_PREFIX + "the-gateway-token"

        lines = ["# solarfleet edge agent configuration, started by "
                 "`solarfleet-agent scan`."]
        if self.unset:
            lines.append(f"# Replace the {join_names(self.unset)} with the values "
                         "from the collector.")
        lines += ["# Check the file with `solarfleet-agent check-config FILE`.", "",
                  "[gateway]", f"id = {_quote(gateway_id)}", "",
                  "[collector]", f"url = {_quote(url)}", f"token = {_quote(token)}", "",
                  "[buffer]", 'path = "/var/lib/solarfleet-agent/buffer.sqlite"', ""]
        return "\n".join(lines) + "\n"


def join_names(names: Sequence[str]) -> str:
    """Join names as in a sentence: ["a", "b", "c"] -> "a, b and c"."""
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
