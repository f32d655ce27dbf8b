"""Alerts: evaluating the rules on every shard, and the alerts table's lifecycle.

Every `[alerts] interval` seconds the evaluator reads a snapshot of each installation
on each shard, applies `collector.alert_rules`, opens an alert for each new
condition and resolves each open alert whose condition cleared. Shards are evaluated
in parallel, each in one transaction. A shard that fails is logged once when it
starts failing and once when it recovers, and the other shards go on.

An advisory lock per shard lets one collector evaluate a shard at a time, so several
collectors on the same shards neither open an alert twice nor race on resolving it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from collector import alert_rules, energy, measures
from collector.alert_rules import (
    AlertKey,
    Condition,
    CounterEvent,
    DeviceSnapshot,
    Findings,
    SiteSnapshot,
)
from collector.config import AlertsConfig
from collector.errors import ShardUnavailable
from collector.gaps import DEVICE_DOWN_STATES
from collector.outage import Outage
from collector.sharding import ShardPools

logger = logging.getLogger(__name__)

STATES = ("open", "resolved", "all")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('solarfleet.alerts'))"

# Each device's newest reading or state, the time between its two newest states
# (its poll interval), and its newest state that is not a down state.
# NOTE: the last query walks back through every down state of a device, so a device
# down for months costs a scan of those rows at every evaluation.
_SELECT_DEVICES = """
SELECT d.id, d.installation_id, d.device_id, d.name, d.state,
       (extract(epoch FROM greatest(d.state_time, c.last_time)) * 1000)::bigint,
       (extract(epoch FROM d.state_time - p.time) * 1000)::bigint,
       up.state, (extract(epoch FROM up.time) * 1000)::bigint
FROM devices d
LEFT JOIN LATERAL (
    SELECT max(last_time) AS last_time FROM channels WHERE device_id = d.id
) c ON true
LEFT JOIN LATERAL (
    SELECT time FROM device_states s
    WHERE s.installation_id = d.installation_id AND s.device_id = d.id
    ORDER BY time DESC OFFSET 1 LIMIT 1
) p ON true
LEFT JOIN LATERAL (
    SELECT time, state FROM device_states s
    WHERE s.installation_id = d.installation_id AND s.device_id = d.id
      AND s.state <> ALL(%(down)s)
    ORDER BY time DESC LIMIT 1
) up ON true
WHERE d.active
ORDER BY d.installation_id, d.id
"""

_SELECT_CHANNELS = """
SELECT id, device_id, name, last_value FROM channels WHERE name = ANY(%(names)s)
"""

_SELECT_MEAN_POWER = """
SELECT channel_id, sum(sum) / sum(count) FROM rollup_5m
WHERE installation_id = ANY(%(installation_ids)s) AND channel_id = ANY(%(channel_ids)s)
  AND bucket >= %(since)s AND bucket < %(now)s
GROUP BY channel_id
"""

_SELECT_OPEN = """
SELECT a.id, a.installation_id, a.device_id, d.device_id, a.kind, a.message,
       a.opened_at
FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
WHERE a.resolved_at IS NULL AND a.installation_id = ANY(%(installation_ids)s)
FOR UPDATE OF a
"""

_INSERT = """
INSERT INTO alerts (installation_id, device_id, kind, severity, message, details,
                    opened_at)
VALUES (%(installation_id)s, %(device_id)s, %(kind)s, %(severity)s, %(message)s,
        %(details)s, %(now)s)
"""

_RESOLVE = "UPDATE alerts SET resolved_at = %(now)s WHERE id = %(id)s"

_SELECT_ALERTS = """
SELECT a.id::text, a.installation_id, d.device_id, a.kind, a.severity, a.message,
       a.details, (extract(epoch FROM a.opened_at) * 1000)::bigint,
       (extract(epoch FROM a.resolved_at) * 1000)::bigint
FROM alerts a LEFT JOIN devices d ON d.id = a.device_id
WHERE a.installation_id = ANY(%(installation_ids)s)
  AND (%(state)s = 'all' OR (a.resolved_at IS NULL) = (%(state)s = 'open'))
ORDER BY a.opened_at DESC, a.id
LIMIT %(limit)s
"""


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as the API sends it; `device_id` is the device's own identity."""

    id: str
    installation_id: int
    device_id: str | None
    kind: str
    severity: str
    message: str
    details: dict[str, Any]
    opened_ms: int
    resolved_ms: int | None

    def to_json(self) -> dict[str, Any]:
        """The alert with its state, times in Unix milliseconds."""
        return {
            "id": self.id,
            "installation_id": self.installation_id,
            "device_id": self.device_id,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "state": "open" if self.resolved_ms is None else "resolved",
            "opened_ms": self.opened_ms,
            "resolved_ms": self.resolved_ms,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """An alert opened or resolved by one evaluation."""

    installation_id: int
    device_id: str | None  # the device's own identity
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class ShardEvaluation:
    """What one evaluation did on one shard; `error` is set when it failed."""

    shard: str
    opened: tuple[Change, ...] = ()
    resolved: tuple[Change, ...] = ()
    skipped: bool = False  # another collector held the shard's evaluation lock
    error: str | None = None


async def evaluate_shard(
    conn: AsyncConnection[Any], settings: AlertsConfig, now_ms: int, shard: str = ""
) -> ShardEvaluation:
    """Evaluate every installation on one shard at `now_ms` and commit the changes."""
    async with conn.transaction():
        cur = await conn.execute(_LOCK)
        locked = await cur.fetchone()
        if not locked or not locked[0]:
            return ShardEvaluation(shard, skipped=True)
        sites = await load_sites(conn, settings, now_ms)
        findings = {
            site.installation_id: alert_rules.judge(site, settings, now_ms)
            for site in sites
        }
        identities = {d.row_id: d.device_id for s in sites for d in s.devices}
        opened, resolved = await _apply(conn, findings, identities, now_ms)
    return ShardEvaluation(shard, tuple(opened), tuple(resolved))


async def load_sites(
    conn: AsyncConnection[Any], settings: AlertsConfig, now_ms: int
) -> list[SiteSnapshot]:
    """Read the snapshot of every installation that has devices on this shard."""
    cur = await conn.execute(_SELECT_DEVICES, {"down": list(DEVICE_DOWN_STATES)})
    rows = await cur.fetchall()
    installation_ids = sorted({row[1] for row in rows})
    channels = await _status_channels(conn)
    mean_power = await _mean_power(conn, settings, now_ms, installation_ids, channels)
    events = await _counter_events(conn, settings, now_ms, installation_ids)
    sites: dict[int, list[DeviceSnapshot]] = {}
    for row in rows:
        row_id, installation_id, device_id = row[0], row[1], row[2]
        device = _device(
            row,
            channels.get(row_id, {}),
            mean_power,
            events.get((installation_id, device_id), ()),
        )
        sites.setdefault(installation_id, []).append(device)
    return [SiteSnapshot(i, tuple(devices)) for i, devices in sites.items()]


def _device(
    row: tuple[Any, ...],
    channels: dict[str, tuple[int, float | None]],
    mean_power: dict[int, float],
    events: tuple[CounterEvent, ...],
) -> DeviceSnapshot:
    row_id, _, device_id, name, state, last_ms, interval_ms, up_state, up_ms = row
    picked = measures.measure_channels(channels)
    power = channels.get(picked.ac_power) if picked.ac_power else None
    ratings = [
        channels[channel][1]
        for channel in energy.RATING_CHANNELS
        if channel in channels
    ]
    return DeviceSnapshot(
        row_id=row_id,
        device_id=device_id,
        name=name,
        state=state,
        last_ms=last_ms,
        poll_interval_ms=interval_ms if interval_ms and interval_ms > 0 else None,
        last_up_state=up_state,
        last_up_ms=up_ms,
        inverter=picked.is_inverter,
        ac_power_w=power[1] if power else None,
        mean_power_w=mean_power.get(power[0]) if power else None,
        rating_w=next((r for r in ratings if r), None),
        status={channel: value for channel, (_, value) in channels.items()},
        counter_events=events,
    )


def _watched_channels() -> list[str]:
    return [
        *measures.AC_POWER_CHANNELS,
        *measures.LIFETIME_ENERGY_CHANNELS,
        *energy.RATING_CHANNELS,
        *alert_rules.STATUS_CHANNELS,
        *alert_rules.ALARM_CHANNELS,
    ]


async def _status_channels(
    conn: AsyncConnection[Any],
) -> dict[int, dict[str, tuple[int, float | None]]]:
    """Return the latest value and channel id of each watched channel, by device."""
    cur = await conn.execute(_SELECT_CHANNELS, {"names": _watched_channels()})
    found: dict[int, dict[str, tuple[int, float | None]]] = {}
    for channel_id, device_row, name, value in await cur.fetchall():
        found.setdefault(device_row, {})[name] = (channel_id, value)
    return found


async def _mean_power(
    conn: AsyncConnection[Any],
    settings: AlertsConfig,
    now_ms: int,
    installation_ids: list[int],
    channels: dict[int, dict[str, tuple[int, float | None]]],
) -> dict[int, float]:
    """Return the mean of each AC power channel over the power window, by channel id.

    The window is made of whole 5-minute rollup buckets that start within it.
    """
    channel_ids = [
        by_name[name][0]
        for by_name in channels.values()
        for name in measures.AC_POWER_CHANNELS
        if name in by_name
    ]
    if not channel_ids:
        return {}
    params = {
        "installation_ids": installation_ids,
        "channel_ids": channel_ids,
        "since": _utc(now_ms - round(settings.power_window * 1000)),
        "now": _utc(now_ms),
    }
    cur = await conn.execute(_SELECT_MEAN_POWER, params)
    return {row[0]: float(row[1]) for row in await cur.fetchall()}


async def _counter_events(
    conn: AsyncConnection[Any],
    settings: AlertsConfig,
    now_ms: int,
    installation_ids: list[int],
) -> dict[tuple[int, str], tuple[CounterEvent, ...]]:
    """Return the jumps and resets within the counter window, by (installation,
    device identity).

    NOTE: `energy.installation_energy` reads a day of readings before the window,
    once per installation and evaluation. That cost grows with the fleet; an
    evaluator that kept each counter's state between runs would read only new rows.
    """
    window = (now_ms - round(settings.counter_window * 1000), now_ms)
    found: dict[tuple[int, str], list[CounterEvent]] = {}
    for installation_id in installation_ids:
        counters = await energy.installation_energy(conn, installation_id, window)
        for counter in counters:
            key = (installation_id, counter.device_id)
            found.setdefault(key, []).extend(_events(counter))
    return {key: tuple(events) for key, events in found.items() if events}


def _events(counter: energy.ChannelEnergy) -> Iterable[CounterEvent]:
    for jump in counter.result.jumps:
        yield CounterEvent(
            counter.channel, "jump", jump.time_ms, jump.before, jump.after
        )
    for restart in counter.result.restarts:
        # A wrap at the counter's limit is how an acc32 counter goes on.
        if restart.kind == "reset":
            yield CounterEvent(
                counter.channel, "reset", restart.time_ms, restart.before,
                restart.after,
            )


async def _apply(
    conn: AsyncConnection[Any],
    findings: dict[int, Findings],
    identities: dict[int, str],
    now_ms: int,
) -> tuple[list[Change], list[Change]]:
    """Open alerts for new conditions and resolve those whose condition cleared.

    `identities` maps device row ids to the devices' own identities, for the log.
    """
    now = _utc(now_ms)
    cur = await conn.execute(_SELECT_OPEN, {"installation_ids": list(findings)})
    open_keys: set[tuple[int, AlertKey]] = set()
    resolved: list[Change] = []
    for row in await cur.fetchall():
        alert_id, installation_id, device_row, device_id, kind, message, opened = row
        key = (device_row, kind)
        open_keys.add((installation_id, key))
        site = findings[installation_id]
        if key in site and site[key] is None:
            await conn.execute(_RESOLVE, {"id": alert_id, "now": now})
            change = Change(installation_id, device_id, kind, message)
            resolved.append(change)
            _log_resolved(change, now - opened)
    opened_changes: list[Change] = []
    for installation_id, site in findings.items():
        for key, condition in site.items():
            if condition is None or (installation_id, key) in open_keys:
                continue
            await _open(conn, installation_id, key, condition, now)
            device_id = identities.get(key[0]) if key[0] is not None else None
            change = Change(installation_id, device_id, key[1], condition.message)
            opened_changes.append(change)
            _log_opened(change, condition.severity)
    return opened_changes, resolved


async def _open(
    conn: AsyncConnection[Any],
    installation_id: int,
    key: AlertKey,
    condition: Condition,
    now: datetime,
) -> None:
    device_row, kind = key
    await conn.execute(
        _INSERT,
        {
            "installation_id": installation_id,
            "device_id": device_row,
            "kind": kind,
            "severity": condition.severity,
            "message": condition.message,
            "details": Jsonb(condition.details),
            "now": now,
        },
    )


def _log_opened(change: Change, severity: str) -> None:
    logger.info(
        "alert opened: installation %d %s %s: %s",
        change.installation_id, severity, change.kind, change.message,
    )


def _log_resolved(change: Change, duration: timedelta) -> None:
    device = "" if change.device_id is None else f" device {change.device_id}"
    logger.info(
        "alert resolved after %d min: installation %d%s %s",
        duration.total_seconds() // 60, change.installation_id, device, change.kind,
    )


class AlertEvaluator:
    """Evaluates the alert rules on every shard, in parallel, now or periodically."""

    def __init__(
        self,
        shards: ShardPools,
        settings: AlertsConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._shards = shards
        self._settings = settings
        self._clock = clock
        self._outages = {
            name: Outage(logger, f"shard {name} (alert evaluation)")
            for name in shards.names
        }
        self._broken: set[str] = set()  # shards whose last evaluation raised a bug

    async def evaluate(self, now_ms: int | None = None) -> dict[str, ShardEvaluation]:
        """Evaluate every shard at `now_ms` (default: the clock's time), by name."""
        if now_ms is None:
            now_ms = round(self._clock() * 1000)
        results = await asyncio.gather(
            *(self._evaluate(name, now_ms) for name in self._shards.names)
        )
        return {result.shard: result for result in results}

    async def _evaluate(self, shard: str, now_ms: int) -> ShardEvaluation:
        outage = self._outages[shard]
        try:
            async with self._shards.connection(shard) as conn:
                result = await evaluate_shard(conn, self._settings, now_ms, shard)
        except (ShardUnavailable, psycopg.Error) as err:
            outage.failed(err)
            return ShardEvaluation(shard, error=str(err))
        except Exception as err:
            # A bug met on one shard's data must not stop the other shards.
            if shard not in self._broken:
                logger.exception("alert evaluation on shard %s failed", shard)
                self._broken.add(shard)
            return ShardEvaluation(shard, error=repr(err))
        outage.recovered()
        self._broken.discard(shard)
        return result

    async def run(self) -> None:
        """Evaluate every `interval` seconds until cancelled.

        The first round runs one interval after the start, so that gateways can
        deliver what they buffered while the collector was down before their silence
        is judged. A round that fails is logged, and the next one runs on time.
        """
        logger.info(
            "alert evaluation every %g s on shards %s",
            self._settings.interval, ", ".join(self._shards.names),
        )
        while True:
            await asyncio.sleep(self._settings.interval)
            try:
                await self.evaluate()
            except Exception:
                logger.exception("alert evaluation failed; retrying next interval")


async def list_alerts(
    conn: AsyncConnection[Any], installation_ids: list[int], state: str, limit: int
) -> list[Alert]:
    """Return the alerts of the installations in `state`, newest opened first."""
    cur = await conn.execute(
        _SELECT_ALERTS,
        {"installation_ids": installation_ids, "state": state, "limit": limit},
    )
    return [Alert(*row) for row in await cur.fetchall()]


def _utc(time_ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=time_ms)
