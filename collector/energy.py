"""Energy from lifetime counters (`103.WH`, `701.TotWhInj`, `203.TotWhImp`, ...).

A counter's energy over a time range is the sum of its rises between readings taken in
time order, so batches that arrive out of order give the same answer. The rules, for
a counter that only ever rises:

- A null reading is skipped.
- A reading below the last accepted one (zero included) is held. It is a glitch when a
  later reading is back at or above the last accepted value, and it is discarded
  then. `CONFIRM_READINGS` held readings in a row, each at or above the one before,
  confirm a restart. A restart is a wrap when the last value lay within
  `WRAP_MARGIN` below a counter limit, and a reset otherwise. After a reset the
  energy counts from 0 up to the first new value, and after a wrap it also adds the
  rest up to the limit.
- A rise beyond what the device can produce in the time since the counter reached
  its last value is a jump. It is flagged, left out of the energy, and the counter
  goes on from the new value. When the next reading falls back to where the counter
  was before the jump, the jump was a one-off spike and counting resumes there.

The power a device can produce is its nameplate rating where it reports one
(`120.WRtg`, `702.WMaxRtg`), else the highest power its `W` channels reported in the
window, else `DEFAULT_MAX_POWER_W`; a rise may be up to `JUMP_MARGIN` times that.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import le, mul, sub, truediv
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection

# Three lower readings in a row tell a restart from a glitch: a wake-up glitch reads
# 0 for up to three polls, but the decoder already turns an acc32 0 into null.
CONFIRM_READINGS = 3
JUMP_MARGIN = 2.0
# Power cap for a device that reports neither a rating nor any power: 10 MW, above
# any single inverter or meter connection on one gateway.
DEFAULT_MAX_POWER_W = 10_000_000.0
# Limits where counters wrap to 0, in the counter's unit: an acc32 counting Wh, and
# an acc32 counting watt-seconds but showing Wh (2**32 / 3600, rounded down).
WRAP_LIMITS = (float(2**32), float(2**32 // 3600))
WRAP_MARGIN = 0.001  # a wrap starts within 0.1 % below a limit
# Readings this long before the window start the counting, so that a restart or a
# held reading at the window's start is judged with what came before.
LOOKBACK_MS = 86_400_000

COUNTER_PARAMETERS = re.compile(r"^(WH|ActWh|DCWH|DCWh|InDCWh|InWh|OutWh|TotWh\w*)$")
RATING_CHANNELS = ("120.WRtg", "702.WMaxRtg")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class CounterReading:
    time_ms: int
    value: float | None


@dataclass(frozen=True, slots=True)
class Restart:
    """A confirmed reset or wrap: the counter went from `before` down to `after`."""

    time_ms: int
    kind: str  # "reset" or "wrap"
    before: float
    after: float


@dataclass(frozen=True, slots=True)
class Jump:
    """A rise larger than `allowed`, left out of the energy; raw readings are kept."""

    time_ms: int
    before: float
    after: float
    allowed: float


@dataclass(frozen=True, slots=True)
class CounterEnergy:
    """Energy of one counter within a window, in the counter's unit (Wh)."""

    energy: float
    restarts: tuple[Restart, ...] = ()
    jumps: tuple[Jump, ...] = ()
    pending: int = 0  # lower readings held at the end, neither glitch nor restart yet


@dataclass
class _Counter:
    max_power_w: float
    window: tuple[int, int]
    base: float | None = None
    base_since: int = 0  # when the counter first showed `base`
    before_jump: tuple[float, int] | None = None
    held: list[CounterReading] = field(default_factory=list)
    energy: float = 0.0
    restarts: list[Restart] = field(default_factory=list)
    jumps: list[Jump] = field(default_factory=list)

    def add(self, reading: CounterReading) -> None:
        value = reading.value
        if value is None or not math.isfinite(value):
            return
        if self.base is None:
            if value > 0:
                self.base, self.base_since = value, reading.time_ms
            return
        if value >= self.base:
            self.held.clear()
            self.before_jump = None
            self._rise(reading)
            return
        if self.before_jump is not None and value >= self.before_jump[0]:
            self.base, self.base_since = self.before_jump
            self.before_jump = None
            self._rise(reading)
            return
        self._hold(reading)

    def _hold(self, reading: CounterReading) -> None:
        assert reading.value is not None
        if self.held and reading.value < (self.held[-1].value or 0.0):
            self.held.clear()
        self.held.append(reading)
        if len(self.held) >= CONFIRM_READINGS:
            self._restart()

    def _restart(self) -> None:
        assert self.base is not None
        first, *rest = self.held
        assert first.value is not None
        self.held = []
        self.before_jump = None
        limit = _wrap_limit(self.base)
        kind = "reset" if limit is None else "wrap"
        if self._in_window(first.time_ms):
            self.restarts.append(Restart(first.time_ms, kind, self.base, first.value))
        # Count as if the counter had stood at the limit (a wrap) or at 0 (a reset).
        start = 0.0 if limit is None else self.base - limit
        self.base = start
        self._rise(first)
        for reading in rest:
            self._rise(reading)

    def _rise(self, reading: CounterReading) -> None:
        assert self.base is not None and reading.value is not None
        delta = reading.value - self.base
        if delta <= 0:
            return
        hours = (reading.time_ms - self.base_since) / 3_600_000
        allowed = self.max_power_w * JUMP_MARGIN * hours
        if delta > allowed:
            if self._in_window(reading.time_ms):
                self.jumps.append(
                    Jump(reading.time_ms, self.base, reading.value, allowed)
                )
            self.before_jump = (self.base, self.base_since)
        elif self._in_window(reading.time_ms):
            self.energy += delta
        self.base, self.base_since = reading.value, reading.time_ms

    def _in_window(self, time_ms: int) -> bool:
        return self.window[0] <= time_ms < self.window[1]


def _wrap_limit(value: float) -> float | None:
    for limit in WRAP_LIMITS:
        if limit * (1 - WRAP_MARGIN) <= value <= limit:
            return limit
    return None


def counter_energy(
    readings: Iterable[CounterReading],
    max_power_w: float,
    window: tuple[int, int] = (-(2**63), 2**63),
) -> CounterEnergy:
    """Compute the energy of a lifetime counter from its readings ordered by time.

    Only rises completed by a reading within `window` (from inclusive, to exclusive,
    Unix ms) count; earlier readings only set where counting starts.
    """
    counter = _Counter(max_power_w, window)
    for reading in readings:
        counter.add(reading)
    return CounterEnergy(
        counter.energy,
        tuple(counter.restarts),
        tuple(counter.jumps),
        len(counter.held),
    )


def window_energy(
    times_ms: Sequence[int],
    values: Sequence[float | None],
    max_power_w: float,
    window: tuple[int, int],
) -> float:
    """Compute a counter's energy in `window` from its readings as two arrays
    ordered by time, all before the window's end.

    A series that only rises, from a positive first value and within the jump
    allowance at every step, has no glitch, restart or jump. Its energy is then the
    last value less the one before the window, and both the check and the result
    run without a Python loop. Any other series gets the full rules of
    `counter_energy`.
    """
    inside = bisect.bisect_left(times_ms, window[0])
    if _steady(times_ms, values, max_power_w):
        last = values[-1]
        base = values[max(inside - 1, 0)]
        assert last is not None and base is not None
        return last - base
    readings = map(CounterReading, times_ms, values)
    return counter_energy(readings, max_power_w, window).energy


def _steady(
    times_ms: Sequence[int], values: Sequence[float | None], max_power_w: float
) -> bool:
    """Tell whether every value is at or above the one before, the first is
    positive and finite, and no rise exceeds the jump allowance since the reading
    before it, which is never more than the rules allow."""
    if not values or None in values:
        return False
    first = values[0]
    assert first is not None
    if not 0 < first < math.inf:
        return False
    later = values[1:]
    if not all(map(le, values, later)):  # also False at a NaN
        return False
    if len(values) == 1:
        return True
    rate = max_power_w * JUMP_MARGIN
    rises = list(map(sub, later, values))
    gaps = list(map(sub, times_ms[1:], times_ms))
    # The largest rise within the allowance of the shortest gap settles all steps.
    if max(rises) <= rate * (min(gaps) / 3_600_000):
        return True
    allowed = map(mul, repeat(rate), map(truediv, gaps, repeat(3_600_000)))
    return all(map(le, rises, allowed))


@dataclass(frozen=True, slots=True)
class ChannelEnergy:
    """A counter channel's energy within a window, as the energy API sends it."""

    device_id: str
    channel: str
    unit: str | None
    max_power_w: float
    max_power_source: str  # "rating", "observed" or "default"
    result: CounterEnergy

    def to_json(self) -> dict[str, Any]:
        """The channel's energy, restarts and jumps, times in Unix milliseconds."""
        return {
            "device_id": self.device_id,
            "channel": self.channel,
            "unit": self.unit,
            "energy": self.result.energy,
            "max_power_w": self.max_power_w,
            "max_power_source": self.max_power_source,
            "restarts": [_event_json(r) for r in self.result.restarts],
            "jumps": [_event_json(j) for j in self.result.jumps],
            "pending": self.result.pending,
        }


def _event_json(event: Restart | Jump) -> dict[str, Any]:
    data = asdict(event)
    data["time"] = data.pop("time_ms")
    return data


_SELECT_COUNTERS = """
SELECT c.id, d.id, d.device_id, c.name, c.parameter, c.unit
FROM channels c JOIN devices d ON d.id = c.device_id
WHERE c.installation_id = %(installation_id)s AND c.unit = 'Wh'
ORDER BY d.device_id, c.name
"""

_SELECT_RATINGS = """
SELECT c.device_id, max(c.last_value) FROM channels c
WHERE c.installation_id = %(installation_id)s AND c.name = ANY(%(names)s)
  AND c.last_value > 0
GROUP BY c.device_id
"""

_SELECT_OBSERVED = """
SELECT c.device_id, max(abs(r.value)) FROM readings r
JOIN channels c ON c.id = r.channel_id
WHERE r.installation_id = %(installation_id)s AND c.installation_id = r.installation_id
  AND c.parameter = 'W' AND c.unit = 'W'
  AND r.time >= %(start)s AND r.time < %(to)s AND r.value IS NOT NULL
GROUP BY c.device_id
"""

_SELECT_READINGS = """
SELECT channel_id, (extract(epoch FROM time) * 1000)::bigint, value FROM readings
WHERE installation_id = %(installation_id)s AND channel_id = ANY(%(channel_ids)s)
  AND time >= %(start)s AND time < %(to)s
ORDER BY channel_id, time
"""


async def installation_energy(
    conn: AsyncConnection[Any], installation_id: int, window: tuple[int, int]
) -> list[ChannelEnergy]:
    """Compute the energy of every counter channel of an installation in `window`.

    Readings from `LOOKBACK_MS` before the window set where counting starts.
    """
    params = {
        "installation_id": installation_id,
        "start": _utc(window[0] - LOOKBACK_MS),
        "to": _utc(window[1]),
    }
    cur = await conn.execute(_SELECT_COUNTERS, params)
    counters = [row for row in await cur.fetchall() if COUNTER_PARAMETERS.match(row[4])]
    if not counters:
        return []
    max_power = await _max_power(conn, params)
    series = await _counter_readings(conn, params, [row[0] for row in counters])
    found = []
    for channel_id, device_row, device_id, name, _, unit in counters:
        power, source = max_power.get(device_row, (DEFAULT_MAX_POWER_W, "default"))
        result = counter_energy(series.get(channel_id, []), power, window)
        found.append(ChannelEnergy(device_id, name, unit, power, source, result))
    return found


async def _max_power(
    conn: AsyncConnection[Any], params: dict[str, Any]
) -> dict[int, tuple[float, str]]:
    """Return each device's power limit and where it came from, by device row id."""
    cur = await conn.execute(_SELECT_OBSERVED, params)
    found = {row[0]: (float(row[1]), "observed") for row in await cur.fetchall()}
    cur = await conn.execute(_SELECT_RATINGS, params | {"names": list(RATING_CHANNELS)})
    found |= {row[0]: (float(row[1]), "rating") for row in await cur.fetchall()}
    return {device: limit for device, limit in found.items() if limit[0] > 0}


async def _counter_readings(
    conn: AsyncConnection[Any], params: dict[str, Any], channel_ids: list[int]
) -> dict[int, list[CounterReading]]:
    cur = await conn.execute(_SELECT_READINGS, params | {"channel_ids": channel_ids})
    series: dict[int, list[CounterReading]] = {}
    for channel_id, time_ms, value in await cur.fetchall():
        series.setdefault(channel_id, []).append(CounterReading(time_ms, value))
    return series


def _utc(time_ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=time_ms)
