"""The agent's TOML configuration, parsed and checked into frozen dataclasses.

Every problem becomes one line that names the file, the key (``devices[2].port``, counting
``[[devices]]`` tables from 1 in file order), the bad value and the fix. Unknown keys are
problems too, because a misspelt key would otherwise fall back to its default unnoticed.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yarl

from edge_agent.endpoint import (
    MAX_CONNECT_DELAY,
    MAX_REQUEST_GAP,
    MAX_TIMEOUT,
    EndpointSettings,
)
from edge_agent.errors import ConfigError
from edge_agent.profiles import (
    ProfileError,
    Profiles,
    Quirk,
    RegisterMap,
    builtin_profiles,
    load_profiles,
)
from edge_agent.wire import (
    MAX_BATCH_READINGS,
    MAX_ID_LENGTH,
    MAX_TEXT_LENGTH,
    control_character,
    text_problem,
)

SYNCHRONOUS_MODES = ("full", "normal")
OVERFLOW_POLICIES = ("drop-oldest", "drop-newest")
MIN_BUFFER_BYTES = 1_048_576  # below this, the empty schema fills most of the cap
MAX_BUFFER_BYTES = 2**50  # 1 PiB: a sane bound, far above any gateway's disk
# Longest "host:port" or serial port path: a device id "<label>/<unit id>" must fit the
# collector's id limit.
MAX_LABEL_LENGTH = MAX_ID_LENGTH - len("/247")
# Start of the values that `scan --write-config` writes where the user must fill one in.
PLACEHOLDER_PREFIX = "replace-with-"


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """The collector that batches are sent to, and how they are paced."""

    url: str  # base URL; batches go to <url>/api/v1/batches
    token: str = field(repr=False)
    batch_size: int = 5000  # maximum readings per batch
    interval: float = 5.0  # seconds before an empty buffer is checked again
    timeout: float = 30.0  # seconds for one request, connect to reply


@dataclass(frozen=True, slots=True)
class BufferConfig:
    """The SQLite file that keeps readings until the collector confirmed them."""

    path: Path
    synchronous: str = "full"  # SQLite's synchronous pragma: "full" or "normal"
    # Cap on the bytes in the file's pages in use. At about 15 bytes per reading
    # (measured by bench/drain.py), 1 GiB is about two weeks of 50 readings a second,
    # which 5 devices of 100 channels polled every 10 s produce.
    max_bytes: int = 1_073_741_824
    min_free_bytes: int = 104_857_600  # free bytes the buffer leaves on its disk
    overflow: str = "drop-oldest"  # or "drop-newest": what is dropped when full


@dataclass(frozen=True, slots=True)
class StatusConfig:
    """Settings of the running agent's status file and HTTP status endpoint."""

    path: Path  # JSON file that the agent rewrites, beside the buffer file
    interval: float = 5.0  # seconds between two writes of the status
    port: int | None = None  # TCP port of the HTTP status endpoint; None: no server
    host: str = "127.0.0.1"  # address the status endpoint listens on


@dataclass(frozen=True, slots=True)
class DeviceGroup:
    """One Modbus endpoint and the unit ids polled through it."""

    name: str
    settings: EndpointSettings
    unit_ids: tuple[int, ...]
    poll_interval: float = 10.0  # seconds between polls of each unit
    # Register map profiles by unit id; the other units are read as SunSpec devices.
    profiles: dict[int, RegisterMap] = field(default_factory=dict)
    # Quirks for SunSpec devices; None for the built-in ones only.
    quirks: tuple[Quirk, ...] | None = None

    @property
    def poll_options(self) -> dict[str, Any]:
        """Return the profile keyword arguments of `poller.run_endpoint` that are set."""
        options: dict[str, Any] = {}
        if self.profiles:
            options["profiles"] = self.profiles
        if self.quirks is not None:
            options["quirks"] = self.quirks
        return options


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the `run` command needs."""

    gateway_id: str
    collector: CollectorConfig
    buffer: BufferConfig
    devices: tuple[DeviceGroup, ...]
    profiles_dir: Path | None = None  # device profiles beside the built-in ones
    status: StatusConfig | None = None  # None: the default beside the buffer file

    @property
    def status_config(self) -> StatusConfig:
        """The [status] settings, with the status file beside the buffer by default."""
        if self.status is not None:
            return self.status
        return StatusConfig(path=status_path(self.buffer.path))

    @property
    def unit_count(self) -> int:
        """Number of unit ids over all device groups."""
        return sum(len(group.unit_ids) for group in self.devices)


def status_path(buffer_path: Path) -> Path:
    """Return the status file of a buffer file: buffer.sqlite -> buffer.status.json."""
    return buffer_path.with_name(buffer_path.stem + ".status.json")


def load_config(path: str | Path) -> AgentConfig:
    """Read and check the config file at `path`.

    :raises ConfigError: with one line per problem, when the file cannot be read, is not
        valid TOML or breaks a rule of the format.
    """
    problems: list[str] = []
    config = _parse(Path(path), problems)
    if problems or config is None:
        raise ConfigError("\n".join(problems))
    return config


def check_config(path: str | Path) -> list[str]:
    """Return the problems of the config file at `path`, one line each; empty if valid."""
    problems: list[str] = []
    _parse(Path(path), problems)
    return problems


# --- key specifications -------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _show(value: Any) -> str:
    """Show a value as it would be written in TOML."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" or "nan", as TOML writes them
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


@dataclass(frozen=True, slots=True)
class _Key:
    """One key of a table: the rule its value must meet, and the fix when it is missing."""

    name: str
    expected: str  # completes "<key> must be ...", e.g. "an integer 1-65535"
    valid: Callable[[Any], bool]
    required: str = ""  # the fix shown when the key is missing; empty if optional
    number: bool = False  # stored as float, so that TOML `timeout = 3` is accepted
    # Returns what else is wrong with a value of the right type, with the fix, or None.
    problem: Callable[[Any], str | None] | None = None
    # The fix shown when the value still starts with PLACEHOLDER_PREFIX; empty if a
    # placeholder is never written for the key.
    placeholder: str = ""


def _int_key(name: str, low: int, high: int | None = None, required: str = "") -> _Key:
    if high is None:
        expected = f"an integer of at least {low}"
        return _Key(name, expected, lambda v: _is_int(v) and v >= low, required)
    expected = f"an integer {low}-{high}"
    return _Key(name, expected, lambda v: _is_int(v) and low <= v <= high, required)


def _seconds_key(name: str, maximum: float, zero_allowed: bool = False) -> _Key:
    # The upper bound also rejects inf and nan, which TOML allows.
    if zero_allowed:
        return _Key(name, f"a number of seconds 0-{maximum:g}",
                    lambda v: _is_number(v) and 0 <= v <= maximum, number=True)
    return _Key(name, f"a number of seconds > 0 and at most {maximum:g}",
                lambda v: _is_number(v) and 0 < v <= maximum, number=True)


def _choice_key(name: str, choices: tuple[Any, ...]) -> _Key:
    expected = "one of " + ", ".join(_show(choice) for choice in choices)
    return _Key(name, expected,
                lambda v: any(type(v) is type(c) and v == c for c in choices))


def _text_key(name: str, limit: int, required: str = "", placeholder: str = "") -> _Key:
    return _Key(name, "a non-empty string", _is_text, required, placeholder=placeholder,
                problem=lambda v: text_problem(v, limit))


def _url_valid(value: Any) -> bool:
    if not _is_text(value) or control_character(value) or " " in value:
        return False
    try:
        url = yarl.URL(value)
        port = url.port  # yarl raises ValueError for a port outside 0-65535
    except ValueError:
        return False
    return (url.scheme in ("http", "https") and bool(url.host)
            and port is not None and 1 <= port <= 65535)


def _token_valid(value: Any) -> bool:
    # The token goes into an HTTP header, where only visible ASCII is safe.
    return isinstance(value, str) and value != "" and all(
        "!" <= character <= "~" for character in value)


_GATEWAY_KEYS = (
    _text_key("id", MAX_ID_LENGTH, required="set it to the id registered on the "
              "collector",
              placeholder="set it to the id registered with `solarfleet-collector "
              "gateways add`"),
)
_COLLECTOR_KEYS = (
    _Key("url", 'an http:// or https:// URL with a host and a port 1-65535, e.g. '
         '"https://collector.example.com"',
         _url_valid, required='set it to the collector\'s base URL, e.g. "https://host"'),
    _Key("token", "the token of visible ASCII characters, without spaces or line "
         "breaks", _token_valid,
         required="set it to the token from `solarfleet-collector gateways add`",
         placeholder="set it to the token printed by `solarfleet-collector "
         "gateways add`"),
    # The collector's per-batch limit on readings, states and channels.
    _int_key("batch_size", 1, MAX_BATCH_READINGS),
    _seconds_key("interval", 3600.0),
    _seconds_key("timeout", 600.0),
)
_BUFFER_KEYS = (
    _text_key("path", 4096, required='set it to a file path, e.g. '
              '"/var/lib/solarfleet-agent/buffer.sqlite"'),
    _choice_key("synchronous", SYNCHRONOUS_MODES),
    _int_key("max_bytes", MIN_BUFFER_BYTES, MAX_BUFFER_BYTES),
    _int_key("min_free_bytes", 0, MAX_BUFFER_BYTES),
    _choice_key("overflow", OVERFLOW_POLICIES),
)
_STATUS_KEYS = (
    _seconds_key("interval", 3600.0),
    _int_key("port", 1, 65535),
    _text_key("host", 253),
)
_NETWORK_KEYS = (
    _text_key("host", MAX_LABEL_LENGTH - len(":65535"),
              required="set it to the device's IP address or host name"),
    _int_key("port", 1, 65535),
)
_SERIAL_KEYS = (
    _text_key("serial_port", MAX_LABEL_LENGTH,
              required='set it to the serial device, e.g. "/dev/ttyUSB0"'),
    _int_key("baudrate", 1, 4_000_000),
    _choice_key("parity", ("N", "E", "O")),
    _choice_key("stopbits", (1, 2)),
    _int_key("bytesize", 5, 8),
)
_DEVICE_KEYS = (
    # The name is sent to the collector as each device's name.
    _text_key("name", MAX_TEXT_LENGTH, required="give each [[devices]] table a name"),
    _choice_key("transport", ("tcp", "rtu", "rtu-over-tcp")),
    *_NETWORK_KEYS,
    *_SERIAL_KEYS,
    # Each unit id is checked by _check_unit_ids, which names the bad item.
    _Key("unit_ids", "a non-empty list of unit ids, e.g. [1, 2]",
         lambda v: isinstance(v, list) and v != [],
         required="list the Modbus unit ids behind this endpoint, e.g. [1]"),
    _seconds_key("poll_interval", 86400.0),
    _seconds_key("timeout", MAX_TIMEOUT),
    _seconds_key("request_gap", MAX_REQUEST_GAP, zero_allowed=True),
    _seconds_key("connect_delay", MAX_CONNECT_DELAY, zero_allowed=True),
    _int_key("max_registers", 1, 125),
    _choice_key("function_code", (3, 4)),
    _Key("close_after_poll", "true or false", lambda v: isinstance(v, bool)),
    # Profile names are checked against the loaded profiles by _resolve_profiles.
    _text_key("profile", MAX_TEXT_LENGTH),
    _Key("unit_profiles", 'a table of unit id = profile name, e.g. {240 = '
         '"eastron-sdm630"}', lambda v: isinstance(v, dict)),
)
_TOP_LEVEL = ("gateway", "collector", "buffer", "status", "devices", "profiles_dir")
_TRANSPORT_KEYS = {
    "tcp": frozenset(key.name for key in _NETWORK_KEYS),
    "rtu-over-tcp": frozenset(key.name for key in _NETWORK_KEYS),
    "rtu": frozenset(key.name for key in _SERIAL_KEYS),
}
_ALL_TRANSPORT_KEYS = frozenset().union(*_TRANSPORT_KEYS.values())
_SETTINGS_FIELDS = frozenset(f.name for f in fields(EndpointSettings))


# --- parsing ------------------------------------------------------------------------


class _Problems:
    """Collects problem lines, each prefixed with the config file's path."""

    def __init__(self, path: Path, lines: list[str]) -> None:
        self.path = path
        self.lines = lines

    def add(self, text: str) -> None:
        self.lines.append(f"{self.path}: {text}")

    def __len__(self) -> int:
        return len(self.lines)


def _parse(path: Path, lines: list[str]) -> AgentConfig | None:
    problems = _Problems(path, lines)
    document = _read_toml(path, problems)
    if document is None:
        return None

    _check_unknown(document, "", _TOP_LEVEL, problems)
    gateway = _read_table(document, "gateway", _GATEWAY_KEYS, problems)
    collector = _read_table(document, "collector", _COLLECTOR_KEYS, problems)
    buffer = _read_table(document, "buffer", _BUFFER_KEYS, problems)
    status = (_read_table(document, "status", _STATUS_KEYS, problems)
              if "status" in document else {})
    profiles_dir, profiles = _read_profiles(document, path, problems)
    devices = _read_devices(document, problems, profiles)
    if len(problems):
        return None

    # A relative path is taken from the config file's folder, not from the working
    # directory, which is "/" under systemd.
    buffer_path = path.absolute().parent / Path(buffer.pop("path")).expanduser()
    return AgentConfig(
        gateway_id=gateway["id"],
        collector=CollectorConfig(**collector),
        buffer=BufferConfig(path=buffer_path, **buffer),
        devices=devices,
        profiles_dir=profiles_dir,
        status=StatusConfig(path=status_path(buffer_path), **status),
    )


def _read_toml(path: Path, problems: _Problems) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            problems.add("the file starts with a UTF-8 byte order mark; remove it "
                         "(save the file as UTF-8 without BOM)")
            return None
        return tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        problems.add("file not found; check the path")
    except OSError as err:
        problems.add(f"cannot read the file ({err.strerror}); check its permissions")
    except tomllib.TOMLDecodeError as err:
        problems.add(f"invalid TOML: {err}")
    except UnicodeDecodeError:
        problems.add("invalid TOML: the file is not UTF-8 text")
    return None


def _read_table(document: dict[str, Any], name: str, keys: tuple[_Key, ...],
                problems: _Problems) -> dict[str, Any]:
    table = document.get(name)
    if table is None:
        required = ", ".join(key.name for key in keys if key.required)
        problems.add(f"[{name}] is missing; add it with {required}")
        return {}
    if not isinstance(table, dict):
        problems.add(f"{name} must be a table [{name}], got {_show(table)}")
        return {}
    _check_unknown(table, f"{name}.", [key.name for key in keys], problems)
    return _read_keys(table, f"{name}.", keys, problems)


def _read_keys(table: dict[str, Any], prefix: str, keys: tuple[_Key, ...],
               problems: _Problems) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in keys:
        if key.name not in table:
            if key.required:
                problems.add(f"{prefix}{key.name} is missing; {key.required}")
            continue
        value = table[key.name]
        if not key.valid(value):
            problems.add(f"{prefix}{key.name} must be {key.expected}, got {_show(value)}")
            continue
        problem = key.problem(value) if key.problem is not None else None
        if problem is not None:
            problems.add(f"{prefix}{key.name} {_show(value)} {problem}")
            continue
        if key.placeholder and value.startswith(PLACEHOLDER_PREFIX):
            problems.add(f"{prefix}{key.name} is still the placeholder {_show(value)}; "
                         f"{key.placeholder}")
            continue
        values[key.name] = float(value) if key.number else value
    return values


def _check_unknown(table: dict[str, Any], prefix: str, known: Any,
                   problems: _Problems) -> None:
    known = list(known)
    for name in table:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean {close[0]}?" if close else "remove it"
        problems.add(f"{prefix}{name} is not a known key; {fix}")


# --- device groups ------------------------------------------------------------------


def _read_profiles(document: dict[str, Any], path: Path,
                   problems: _Problems) -> tuple[Path | None, Profiles | None]:
    """Load the built-in profiles and those in `profiles_dir`; None where one is bad."""
    value = document.get("profiles_dir")
    directory = None
    if value is not None:
        if not _is_text(value):
            problems.add(f"profiles_dir must be a folder path, got {_show(value)}")
            return None, None
        # Relative to the config file's folder, like buffer.path.
        directory = path.absolute().parent / Path(value).expanduser()
    try:
        profiles = builtin_profiles() if directory is None else load_profiles(directory)
    except ProfileError as err:
        # Profile problems name their own file and line.
        problems.lines.extend(str(err).splitlines())
        return directory, None
    return directory, profiles


def _read_devices(document: dict[str, Any], problems: _Problems,
                  profiles: Profiles | None) -> tuple[DeviceGroup, ...]:
    tables = document.get("devices")
    if tables is None:
        problems.add("no [[devices]] table; add one per Modbus endpoint")
        return ()
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.add("devices must be written as [[devices]] tables")
        return ()
    if not tables:
        problems.add("devices has no [[devices]] tables, so the agent has nothing to "
                     "poll; add one per Modbus endpoint")
        return ()

    groups = []
    for number, table in enumerate(tables, start=1):
        group = _read_device(table, f"devices[{number}]", problems, profiles)
        if group is not None:
            groups.append(group)
    _check_distinct(groups, problems)
    return tuple(groups)


def _read_device(table: dict[str, Any], prefix: str, problems: _Problems,
                 profiles: Profiles | None) -> DeviceGroup | None:
    before = len(problems)
    _check_unknown(table, f"{prefix}.", [key.name for key in _DEVICE_KEYS], problems)
    transport = table.get("transport", "tcp")
    # An invalid transport (a list, a table) is reported by _read_keys.
    applicable = (_TRANSPORT_KEYS.get(transport, frozenset())
                  if isinstance(transport, str) else frozenset())
    if applicable:
        _check_transport_keys(table, prefix, transport, problems)
    # Keys of another transport are reported above rather than as missing, and none is
    # checked while the transport itself is invalid.
    keys = tuple(key for key in _DEVICE_KEYS
                 if key.name in applicable or key.name not in _ALL_TRANSPORT_KEYS)
    values = _read_keys(table, f"{prefix}.", keys, problems)
    _check_unit_ids(table.get("unit_ids"), prefix, problems)
    unit_profiles = _resolve_profiles(values, prefix, profiles, problems)
    if len(problems) > before or profiles is None:
        return None

    settings = {k: v for k, v in values.items() if k in _SETTINGS_FIELDS}
    return DeviceGroup(
        name=values["name"],
        settings=EndpointSettings(**settings),
        unit_ids=tuple(values["unit_ids"]),
        poll_interval=values.get("poll_interval", 10.0),
        profiles=unit_profiles,
        quirks=None if profiles is builtin_profiles() else profiles.quirks,
    )


def _resolve_profiles(values: dict[str, Any], prefix: str, profiles: Profiles | None,
                      problems: _Problems) -> dict[int, RegisterMap]:
    """Map unit ids to the register maps named by `profile` and `unit_profiles`."""
    # Bad unit ids are reported by _check_unit_ids; only integers are hashed here.
    unit_ids = [unit for unit in values.get("unit_ids") or [] if _is_int(unit)]
    names: dict[int, tuple[str, str]] = {}  # unit id -> (key, profile name)
    if "profile" in values:
        names = {unit: ("profile", values["profile"]) for unit in unit_ids}
    for unit, name in values.get("unit_profiles", {}).items():
        key = f"unit_profiles.{unit}"
        # isdigit alone accepts "²", which int() rejects.
        if not (unit.isascii() and unit.isdigit() and int(unit) in unit_ids):
            problems.add(f"{prefix}.{key} names a unit id that is not in unit_ids; "
                         "add it to unit_ids or remove it")
        elif not _is_text(name):
            problems.add(f"{prefix}.{key} must be a profile name, got {_show(name)}")
        else:
            names[int(unit)] = (key, name)
    if profiles is None:
        return {}

    found: dict[str, RegisterMap] = {}
    for key, name in dict.fromkeys(names.values()):
        try:
            found[name] = profiles.register_map(name)
        except ProfileError as err:
            problems.add(f"{prefix}.{key}: {err}")
    return {unit: found[name] for unit, (_, name) in names.items() if name in found}


def _check_transport_keys(table: dict[str, Any], prefix: str, transport: str,
                          problems: _Problems) -> None:
    applicable = _TRANSPORT_KEYS[transport]
    for name in table:
        for other, keys in _TRANSPORT_KEYS.items():
            if name in keys and name not in applicable:
                problems.add(f'{prefix}.{name} does not apply to transport '
                             f'"{transport}"; remove it or set transport = "{other}"')
                break


def _check_unit_ids(unit_ids: Any, prefix: str, problems: _Problems) -> None:
    if not isinstance(unit_ids, list):
        return
    seen = set()
    for number, unit_id in enumerate(unit_ids, start=1):
        if not (_is_int(unit_id) and 1 <= unit_id <= 247):
            problems.add(f"{prefix}.unit_ids[{number}] must be an integer 1-247 "
                         f"(the Modbus range for one device), got {_show(unit_id)}")
            continue
        if unit_id in seen:
            problems.add(f"{prefix}.unit_ids lists unit id {unit_id} twice; "
                         "remove one")
        seen.add(unit_id)


def _check_distinct(groups: list[DeviceGroup], problems: _Problems) -> None:
    names: set[str] = set()
    endpoints: dict[tuple[str, str], str] = {}
    for group in groups:
        if group.name in names:
            problems.add(f'device group name "{group.name}" is used twice; '
                         "give each [[devices]] table its own name")
        names.add(group.name)
        # Two groups on one endpoint would open two connections to it, and a Modbus
        # endpoint serves one request at a time.
        endpoint = (group.settings.transport, group.settings.label)
        if endpoint in endpoints:
            problems.add(f'device groups "{endpoints[endpoint]}" and "{group.name}" '
                         f"both use {group.settings.label}; merge their unit_ids "
                         "into one [[devices]] table")
        endpoints.setdefault(endpoint, group.name)
