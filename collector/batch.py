"""The batch wire format (format 1): parsing and validating a batch body.

Any fault rejects the whole batch with a one-line reason that names the offending
element, so that nothing of a malformed batch is stored. The one exception is a
reading or state whose time cannot be right (a gateway clock not set, or running
ahead): it is left out and counted, and the rest of the batch is stored, because a
rejected batch would keep the gateway's good readings in quarantine.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from collector.errors import BatchRejected

FORMAT = 1
STATES = frozenset(
    {"online", "sleeping", "offline", "refused", "not-sunspec", "malformed"}
)
MAX_DEVICES = 1_000
MAX_CHANNELS = 50_000
MAX_READINGS = 200_000
MAX_STATES = 50_000
MAX_GAPS = 10_000
MAX_ID_LENGTH = 200
MAX_TEXT_LENGTH = 200
MAX_UNIT_LENGTH = 32
# A time before 2000-01-01 UTC comes from a gateway clock that is not set.
MIN_TIME_MS = 946_684_800_000
# How far ahead of the collector's clock a time may lie (`[server] future_tolerance`).
DEFAULT_FUTURE_TOLERANCE_MS = 300_000
_MAX_TIME_MS = 2**53  # the bound of `_time`
_new_tuple = tuple.__new__  # builds a Reading from a checked row without a copy
_DEVICE_TEXT = ("name", "manufacturer", "model", "serial", "version", "address")
# Characters no text field may contain: C0 and C1 control characters (NUL among them),
# which PostgreSQL's text rejects or a log would garble, and lone UTF-16 surrogates,
# which have no UTF-8 encoding.
_FORBIDDEN_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Device:
    """A device as the gateway describes it."""

    device_id: str
    name: str = ""
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    version: str | None = None
    address: str | None = None


@dataclass(frozen=True, slots=True)
class Channel:
    """One measured quantity of one device."""

    device_id: str
    name: str
    unit: str | None = None

    @property
    def parameter(self) -> str:
        """The quantity without model prefix or group: "DCW" for "160.module[2].DCW"."""
        return self.name.rsplit(".", 1)[-1]


class Reading(NamedTuple):
    """One reading of a batch. A named tuple, because a batch holds up to 200,000
    and a tuple is built five times faster than a frozen dataclass."""

    device_id: str
    channel: str
    time_ms: int
    value: float | None


@dataclass(frozen=True, slots=True)
class State:
    device_id: str
    time_ms: int
    state: str


@dataclass(frozen=True, slots=True)
class Gap:
    """Polls of one device that the gateway's buffer dropped, with their time range."""

    device_id: str
    first_ms: int
    last_ms: int
    readings: int
    polls: int
    reason: str


@dataclass(frozen=True, slots=True)
class Rejections:
    """Counts of rows left out of a batch because their time cannot be right."""

    future: int = 0  # readings ahead of the collector's clock beyond the tolerance
    early: int = 0  # readings before 2000-01-01 UTC
    states: int = 0  # states with either kind of time
    gaps: int = 0  # gaps with either kind of time at one of their ends

    @property
    def readings(self) -> int:
        """Readings left out, of both kinds."""
        return self.future + self.early


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated batch: every reading's device and channel are listed."""

    batch_id: str
    gateway_id: str
    devices: tuple[Device, ...]
    channels: tuple[Channel, ...]
    readings: tuple[Reading, ...]
    states: tuple[State, ...]
    gaps: tuple[Gap, ...] = ()
    rejected: Rejections = Rejections()


def parse(
    body: bytes,
    now_ms: int | None = None,
    future_tolerance_ms: int = DEFAULT_FUTURE_TOLERANCE_MS,
) -> Batch:
    """Parse and validate a batch body, JSON in UTF-8.

    `now_ms` is the collector's clock in Unix milliseconds. Readings and states
    before 2000-01-01 UTC or more than `future_tolerance_ms` ahead of it are left
    out and counted in `Batch.rejected`.

    :raises BatchRejected: the body is not a valid format 1 batch.
    """
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    data = _load_json(body)
    if not isinstance(data, dict):
        raise BatchRejected("batch must be a JSON object")
    version = data.get("format")
    if type(version) is not int or version != FORMAT:
        raise BatchRejected(
            f"format {version!r} is not supported: send format {FORMAT}"
        )
    batch_id = _identifier(data.get("batch_id"), "batch_id")
    gateway_id = _identifier(data.get("gateway_id"), "gateway_id")
    devices = _parse_devices(_array(data, "devices", MAX_DEVICES))
    channels = _parse_channels(_array(data, "channels", MAX_CHANNELS), devices)
    readings = _parse_readings(_array(data, "readings", MAX_READINGS), channels)
    states = _parse_states(_array(data, "states", MAX_STATES), devices)
    gaps = _parse_gaps(_array(data, "gaps", MAX_GAPS), devices)
    latest_ms = now_ms + future_tolerance_ms
    kept_readings = tuple(r for r in readings if MIN_TIME_MS <= r.time_ms <= latest_ms)
    kept_states = tuple(s for s in states if MIN_TIME_MS <= s.time_ms <= latest_ms)
    kept_gaps = tuple(
        g for g in gaps if MIN_TIME_MS <= g.first_ms and g.last_ms <= latest_ms
    )
    future = early = 0
    if len(kept_readings) < len(readings):  # rare, so the count is not paid always
        future = sum(r.time_ms > latest_ms for r in readings)
        early = sum(r.time_ms < MIN_TIME_MS for r in readings)
    rejected = Rejections(
        future=future,
        early=early,
        states=len(states) - len(kept_states),
        gaps=len(gaps) - len(kept_gaps),
    )
    return Batch(
        batch_id,
        gateway_id,
        tuple(devices.values()),
        tuple(channels.values()),
        kept_readings,
        kept_states,
        kept_gaps,
        rejected,
    )


def _load_json(body: bytes) -> Any:
    # Decoded here because json.loads would also accept UTF-16 and UTF-32 bytes.
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BatchRejected(
            f"body is not valid UTF-8 (byte {err.start}): send JSON encoded as UTF-8"
        ) from err
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise BatchRejected(f"body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise BatchRejected("body is not valid JSON: nested too deeply") from err
    except ValueError as err:  # an integer of more digits than Python converts
        raise BatchRejected(f"body is not valid JSON: {err}") from err


def _reject_constant(name: str) -> None:
    raise BatchRejected(f"body is not valid JSON: {name} is not a JSON number")


def _array(data: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise BatchRejected(f"{key} must be an array, got {type(value).__name__}")
    if len(value) > limit:
        raise BatchRejected(
            f"{key} has {len(value)} elements, more than the limit of {limit}: "
            "send smaller batches"
        )
    return value


def _identifier(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise BatchRejected(
            f"{where} must be a string of 1-{MAX_ID_LENGTH} characters, "
            f"got {_short(value)}"
        )
    return _check_characters(value, where)


def _optional_text(value: Any, where: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BatchRejected(
            f"{where} must be a string of at most {limit} characters or null, "
            f"got {_short(value)}"
        )
    return _check_characters(value, where)


def _check_characters(text: str, where: str) -> str:
    found = _FORBIDDEN_CHARACTER.search(text)
    if found is None:
        return text
    raise BatchRejected(
        f"{where} {_short(text)} contains the control character or lone surrogate "
        f"U+{ord(found[0]):04X} at index {found.start()}: send printable text"
    )


def _parse_devices(items: list[Any]) -> dict[str, Device]:
    devices: dict[str, Device] = {}
    for index, item in enumerate(items):
        where = f"devices[{index}]"
        if not isinstance(item, dict):
            raise BatchRejected(f"{where} must be an object")
        device_id = _identifier(item.get("device_id"), f"{where}.device_id")
        if device_id in devices:
            raise BatchRejected(f"{where}.device_id {device_id!r} is listed twice")
        text = {
            key: _optional_text(item.get(key), f"{where}.{key}", MAX_TEXT_LENGTH)
            for key in _DEVICE_TEXT
        }
        devices[device_id] = Device(device_id, name=text.pop("name") or "", **text)
    return devices


def _parse_channels(
    items: list[Any], devices: dict[str, Device]
) -> dict[tuple[str, str], Channel]:
    channels: dict[tuple[str, str], Channel] = {}
    for index, item in enumerate(items):
        where = f"channels[{index}]"
        if not isinstance(item, dict):
            raise BatchRejected(f"{where} must be an object")
        device_id = _listed_device(item.get("device_id"), f"{where}.device_id", devices)
        name = _identifier(item.get("name"), f"{where}.name")
        unit = _optional_text(item.get("unit"), f"{where}.unit", MAX_UNIT_LENGTH)
        if (device_id, name) in channels:
            raise BatchRejected(
                f"{where}: channel {name!r} of {device_id!r} is listed twice"
            )
        channels[(device_id, name)] = Channel(device_id, name, unit)
    return channels


def _listed_device(value: Any, where: str, devices: dict[str, Device]) -> str:
    device_id = _identifier(value, where)
    if device_id not in devices:
        raise BatchRejected(f"{where} {device_id!r} is not listed in devices")
    return device_id


def _parse_readings(
    items: list[Any], channels: dict[tuple[str, str], Channel]
) -> tuple[Reading, ...]:
    readings = []
    for index, item in enumerate(items):
        # The checks of _parse_reading, inline for the common case of a valid row
        # with a finite float or null, because batches hold up to 200,000 rows.
        if type(item) is list and len(item) == 4:
            device_id, channel, time_ms, value = item
            if (
                type(device_id) is str
                and type(channel) is str
                and type(time_ms) is int
                and -_MAX_TIME_MS <= time_ms <= _MAX_TIME_MS
                and (value is None or (type(value) is float and math.isfinite(value)))
                and (device_id, channel) in channels
            ):
                readings.append(_new_tuple(Reading, item))
                continue
        readings.append(_parse_reading(item, index, channels))
    _check_repeats(readings)
    return tuple(readings)


def _check_repeats(readings: list[Reading]) -> None:
    """Reject two readings of one channel and time with different values.

    Which of the two the shard would keep is arbitrary, so neither is stored. A
    repeat with the same value is stored once.
    """
    if len({(r[0], r[1], r[2]) for r in readings}) == len(readings):
        return  # the common case: the set costs about a tenth of the parse time
    first: dict[tuple[str, str, int], int] = {}
    for index, (device_id, channel, time_ms, value) in enumerate(readings):
        earlier = first.setdefault((device_id, channel, time_ms), index)
        if readings[earlier].value != value:
            raise BatchRejected(
                f"readings[{earlier}] and readings[{index}]: channel {channel!r} of "
                f"{device_id!r} at {time_ms} ms has two values, "
                f"{readings[earlier].value!r} and {value!r}: send one value per "
                "channel and time"
            )


def _parse_reading(
    item: Any, index: int, channels: dict[tuple[str, str], Channel]
) -> Reading:
    where = f"readings[{index}]"
    device_id, channel, time_ms, value = _row(item, 4, where)
    if not isinstance(device_id, str) or not isinstance(channel, str):
        raise BatchRejected(f"{where}: device id and channel must be strings")
    if (device_id, channel) not in channels:
        raise BatchRejected(
            f"{where}: channel {channel!r} of {device_id!r} "
            "is not listed in channels"
        )
    return Reading(device_id, channel, _time(time_ms, where), _value(value, where))


def _parse_states(items: list[Any], devices: dict[str, Device]) -> tuple[State, ...]:
    states = []
    for index, item in enumerate(items):
        where = f"states[{index}]"
        device_id, time_ms, state = _row(item, 3, where)
        device_id = _listed_device(device_id, f"{where} device id", devices)
        if not isinstance(state, str) or state not in STATES:
            raise BatchRejected(
                f"{where}: state {_short(state)} is unknown: use one of "
                f"{', '.join(sorted(STATES))}"
            )
        states.append(State(device_id, _time(time_ms, where), state))
    return tuple(states)


def _parse_gaps(items: list[Any], devices: dict[str, Device]) -> tuple[Gap, ...]:
    gaps = []
    for index, item in enumerate(items):
        where = f"gaps[{index}]"
        if not isinstance(item, dict):
            raise BatchRejected(f"{where} must be an object")
        device_id = _listed_device(item.get("device_id"), f"{where}.device_id", devices)
        first_ms = _time(item.get("first_time"), f"{where}.first_time")
        last_ms = _time(item.get("last_time"), f"{where}.last_time")
        if last_ms < first_ms:
            raise BatchRejected(
                f"{where}: last_time {last_ms} ms is before first_time {first_ms} ms"
            )
        readings = _count(item.get("readings"), f"{where}.readings")
        polls = _count(item.get("polls"), f"{where}.polls")
        reason = _identifier(item.get("reason"), f"{where}.reason")
        gaps.append(Gap(device_id, first_ms, last_ms, readings, polls, reason))
    return tuple(gaps)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BatchRejected(
            f"{where} must be a non-negative integer, got {_short(value)}"
        )
    return value


def _row(item: Any, size: int, where: str) -> Sequence[Any]:
    if not isinstance(item, list) or len(item) != size:
        raise BatchRejected(f"{where} must be an array of {size} elements")
    return item


def _time(value: Any, where: str) -> int:
    # The bound keeps a time within what PostgreSQL's timestamptz holds.
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**53:
        raise BatchRejected(f"{where}: time must be an integer of Unix milliseconds")
    return value


def _value(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BatchRejected(
            f"{where}: value must be a number or null, got {_short(value)}"
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise BatchRejected(
            f"{where}: value {_short(value)} is not finite: send null instead"
        )
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
