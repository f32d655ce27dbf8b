"""Alert rules: what is wrong with an installation, judged from a snapshot of it.

`judge` returns, for every (device, kind) it could decide, either the condition that
keeps an alert open or None when that alert's condition is clear. A key it leaves out
is undetermined: no alert opens for it, and an open one stays open. That is how night
keeps its state: a device that went to sleep, or a comparison that needs daylight, is
neither a new outage nor proof that an old one ended.

Rules, with the `[alerts]` settings named in brackets:

- `gateway-silent` (critical): no reading and no device state from the installation
  for longer than `gateway_silent_after`.
- `device-not-reporting` (warning): a device reports a down state (offline, refused,
  not-sunspec, malformed), or its newest reading or state is more than `missed_polls`
  of its poll intervals (at least `MIN_DEVICE_SILENCE_MS`) older than the site's
  newest. It is undetermined while the gateway is silent. It is also undetermined for
  an inverter that went down asleep (last up state `sleeping`, or last AC power at
  most `night_power_w`) while no other inverter of the site produces more than
  `peer_min_power_w`, until it has been down longer than `max_sleep`.
- `inverter-fault` (critical): the status point of an inverter model (`St` of
  101-103 and 111-113, `InvSt` of 701) has the value of its `FAULT` symbol.
- `inverter-alarm` (warning): a bit is set in `Evt1` (101-103, 111-113) or `Alrm`
  (701). Symbol names come from pysunspec2's model definitions.
- `energy-counter` (warning): a lifetime energy counter jumped or was reset (the
  rules of `collector.energy`) within the last `counter_window`. A wrap is normal.
- `underperforming` (warning): an online inverter's mean AC power over the last
  `power_window` is below `peer_ratio` times the median of the other online
  inverters of the site, while that median exceeds `peer_min_power_w`. Powers are
  divided by each inverter's rating when every compared inverter reports one.
  Undetermined when the peers do not produce, or the inverter sleeps or is down.
"""

from __future__ import annotations

import functools
import re
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sunspec2.device import get_model_def
from sunspec2.mdef import ModelDefinitionError

from collector.config import AlertsConfig
from collector.gaps import DEVICE_DOWN_STATES

GATEWAY_SILENT = "gateway-silent"
DEVICE_NOT_REPORTING = "device-not-reporting"
INVERTER_FAULT = "inverter-fault"
INVERTER_ALARM = "inverter-alarm"
ENERGY_COUNTER = "energy-counter"
UNDERPERFORMING = "underperforming"
KINDS = (
    GATEWAY_SILENT,
    DEVICE_NOT_REPORTING,
    INVERTER_FAULT,
    INVERTER_ALARM,
    ENERGY_COUNTER,
    UNDERPERFORMING,
)

# A gateway cuts batches between the polls of its devices, so one device's newest
# poll may arrive a batch later than another's. Two minutes cover that.
MIN_DEVICE_SILENCE_MS = 120_000

_INVERTER_MODELS = (101, 102, 103, 111, 112, 113)
# Status and alarm bitfield points of each inverter model family.
STATUS_POINTS: dict[int, str] = {m: "St" for m in _INVERTER_MODELS} | {701: "InvSt"}
ALARM_POINTS: dict[int, str] = {m: "Evt1" for m in _INVERTER_MODELS} | {701: "Alrm"}
STATUS_CHANNELS = tuple(f"{m}.{p}" for m, p in STATUS_POINTS.items())
ALARM_CHANNELS = tuple(f"{m}.{p}" for m, p in ALARM_POINTS.items())
_CHANNEL = re.compile(r"^(\d+)\.(\w+)$")

# (device row id or None for the installation, kind)
AlertKey = tuple[int | None, str]

# Plain words for each down state of the agent, used in alert messages.
DOWN_STATE_WORDS = {
    "offline": "no answer from the device",
    "refused": "connection refused",
    "not-sunspec": "no SunSpec map found",
    "malformed": "SunSpec map malformed",
}


@dataclass(frozen=True, slots=True)
class CounterEvent:
    """A jump or reset of a lifetime energy counter."""

    channel: str
    kind: str  # "jump" or "reset"
    time_ms: int
    before: float
    after: float


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """A device as its shard stores it at evaluation time. Times in Unix ms."""

    row_id: int
    device_id: str
    name: str
    state: str | None = None
    last_ms: int | None = None  # newest reading or state
    poll_interval_ms: int | None = None  # between its two newest states
    last_up_state: str | None = None  # newest state that is not a down state
    last_up_ms: int | None = None
    inverter: bool = False
    ac_power_w: float | None = None  # newest normalised AC power
    mean_power_w: float | None = None  # mean AC power over the power window
    rating_w: float | None = None
    status: Mapping[str, float | None] = field(default_factory=dict)
    counter_events: tuple[CounterEvent, ...] = ()

    @property
    def label(self) -> str:
        """The device's name and identity, as messages show it."""
        return f"{self.name} ({self.device_id})" if self.name else self.device_id


@dataclass(frozen=True, slots=True)
class SiteSnapshot:
    """The devices of one installation."""

    installation_id: int
    devices: tuple[DeviceSnapshot, ...]

    @property
    def last_ms(self) -> int | None:
        """Time of the installation's newest reading or state."""
        times = [d.last_ms for d in self.devices if d.last_ms is not None]
        return max(times, default=None)


@dataclass(frozen=True, slots=True)
class Condition:
    """Why an alert is open: its severity, one-line message and details."""

    severity: str  # "critical" or "warning"
    message: str
    details: dict[str, Any]


Findings = dict[AlertKey, Condition | None]


def judge(site: SiteSnapshot, settings: AlertsConfig, now_ms: int) -> Findings:
    """Apply every rule to one installation; see the module docstring."""
    findings: Findings = {}
    silent = _gateway_silent(site, settings, now_ms)
    findings[(None, GATEWAY_SILENT)] = silent
    for device in site.devices:
        if silent is None:
            findings |= _not_reporting(site, device, settings, now_ms)
        findings[(device.row_id, INVERTER_FAULT)] = _fault(device)
        findings[(device.row_id, INVERTER_ALARM)] = _alarm(device)
        findings[(device.row_id, ENERGY_COUNTER)] = _counter(device, settings)
    findings |= _underperforming(site, settings)
    return findings


def _gateway_silent(
    site: SiteSnapshot, settings: AlertsConfig, now_ms: int
) -> Condition | None:
    last_ms = site.last_ms
    if last_ms is None:
        return None
    silent_ms = now_ms - last_ms
    if silent_ms <= settings.gateway_silent_after * 1000:
        return None
    return Condition(
        "critical",
        f"gateway of installation {site.installation_id} silent since "
        f"{_iso(last_ms)}: no reading or device state for {silent_ms // 60_000} min",
        {"last_ms": last_ms},
    )


def _not_reporting(
    site: SiteSnapshot, device: DeviceSnapshot, settings: AlertsConfig, now_ms: int
) -> Findings:
    key = (device.row_id, DEVICE_NOT_REPORTING)
    reason = _silence_reason(site, device, settings)
    if reason is None:
        return {key: None}
    if _asleep(site, device, settings, now_ms):
        return {}
    if reason == "no-data":
        text = f"no reading or state since {_iso(device.last_ms or 0)}"
    else:
        description = DOWN_STATE_WORDS.get(reason, reason)
        text = f"{description} since {_iso(_down_since(device))}"
    return {
        key: Condition(
            "warning",
            f"device {device.label} is not reporting while its gateway does: {text}",
            {"reason": reason, "last_ms": device.last_ms, "state": device.state},
        )
    }


def _silence_reason(
    site: SiteSnapshot, device: DeviceSnapshot, settings: AlertsConfig
) -> str | None:
    if device.state in DEVICE_DOWN_STATES:
        return device.state
    site_last = site.last_ms
    if device.last_ms is None or site_last is None:
        return "no-data"
    interval = device.poll_interval_ms or round(settings.gateway_silent_after * 1000)
    allowed = max(settings.missed_polls * interval, MIN_DEVICE_SILENCE_MS)
    return "no-data" if site_last - device.last_ms > allowed else None


def _down_since(device: DeviceSnapshot) -> int:
    return device.last_up_ms or device.last_ms or 0


def _asleep(
    site: SiteSnapshot, device: DeviceSnapshot, settings: AlertsConfig, now_ms: int
) -> bool:
    """True if an inverter's silence looks like night rather than an outage."""
    if not device.inverter or _producing_peers(site, device, settings):
        return False
    if now_ms - _down_since(device) > settings.max_sleep * 1000:
        return False
    if device.last_up_state == "sleeping":
        return True
    return device.ac_power_w is not None and device.ac_power_w <= settings.night_power_w


def _producing_peers(
    site: SiteSnapshot, device: DeviceSnapshot, settings: AlertsConfig
) -> list[DeviceSnapshot]:
    return [
        peer
        for peer in site.devices
        if peer.row_id != device.row_id
        and peer.inverter
        and peer.state == "online"
        and (peer.ac_power_w or 0.0) > settings.peer_min_power_w
    ]


def _fault(device: DeviceSnapshot) -> Condition | None:
    for channel, model_id, point, value in _status_values(device, STATUS_CHANNELS):
        if value != symbol_value(model_id, point, "FAULT"):
            continue
        return Condition(
            "critical",
            f"inverter {device.label} reports {channel} = FAULT ({int(value)})",
            {"channel": channel, "value": value, "state": "FAULT"},
        )
    return None


def _alarm(device: DeviceSnapshot) -> Condition | None:
    raised: dict[str, list[str]] = {}
    for channel, model_id, point, value in _status_values(device, ALARM_CHANNELS):
        if value != 0:
            raised[channel] = bit_names(model_id, point, int(value))
    if not raised:
        return None
    text = "; ".join(f"{ch} {', '.join(names)}" for ch, names in raised.items())
    return Condition(
        "warning",
        f"inverter {device.label} reports alarms: {text}",
        {"alarms": raised},
    )


def _status_values(
    device: DeviceSnapshot, channels: tuple[str, ...]
) -> Iterator[tuple[str, int, str, float]]:
    for channel in channels:
        value = device.status.get(channel)
        match = _CHANNEL.match(channel)
        if value is not None and match is not None:
            yield channel, int(match[1]), match[2], value


def _counter(device: DeviceSnapshot, settings: AlertsConfig) -> Condition | None:
    if not device.counter_events:
        return None
    latest = max(device.counter_events, key=lambda e: e.time_ms)
    hours = settings.counter_window / 3600
    return Condition(
        "warning",
        f"device {device.label}: energy counter {latest.channel} {latest.kind} from "
        f"{latest.before:g} to {latest.after:g} Wh at {_iso(latest.time_ms)} "
        f"({len(device.counter_events)} in the last {hours:g} h)",
        {
            "events": [
                {
                    "channel": e.channel,
                    "kind": e.kind,
                    "time_ms": e.time_ms,
                    "before": e.before,
                    "after": e.after,
                }
                for e in device.counter_events
            ]
        },
    )


def _underperforming(site: SiteSnapshot, settings: AlertsConfig) -> Findings:
    compared = [
        d
        for d in site.devices
        if d.inverter and d.state == "online" and d.mean_power_w is not None
    ]
    rated = all(d.rating_w for d in compared)
    findings: Findings = {}
    for device in compared:
        peers = [d for d in compared if d.row_id != device.row_id]
        if not peers:
            continue
        peer_watts = statistics.median(d.mean_power_w or 0.0 for d in peers)
        if peer_watts <= settings.peer_min_power_w:
            continue
        key = (device.row_id, UNDERPERFORMING)
        findings[key] = _compare(device, peers, rated, settings)
    return findings


def _compare(
    device: DeviceSnapshot,
    peers: list[DeviceSnapshot],
    rated: bool,
    settings: AlertsConfig,
) -> Condition | None:
    def output(d: DeviceSnapshot) -> float:
        watts = d.mean_power_w or 0.0
        return watts / d.rating_w if rated and d.rating_w else watts

    median = statistics.median(output(d) for d in peers)
    ratio = output(device) / median
    if ratio >= settings.peer_ratio:
        return None
    unit = "of its rating" if rated else "W"
    return Condition(
        "warning",
        f"inverter {device.label} produces {ratio:.0%} of the median of "
        f"{len(peers)} other inverters on the site "
        f"({device.mean_power_w:.0f} W mean over "
        f"{settings.power_window / 60:g} min, compared in {unit})",
        {
            "ratio": round(ratio, 4),
            "mean_power_w": device.mean_power_w,
            "peer_median": median,
            "rated": rated,
        },
    )


@functools.cache
def _symbols(model_id: int, point: str) -> dict[str, int]:
    try:
        definition = get_model_def(model_id)
    except ModelDefinitionError:
        return {}
    for point_def in definition["group"]["points"]:
        if point_def["name"] == point:
            return {s["name"]: s["value"] for s in point_def.get("symbols", [])}
    return {}


def symbol_value(model_id: int, point: str, name: str) -> int | None:
    """Return the value of symbol `name` of a point in pysunspec2's definitions."""
    return _symbols(model_id, point).get(name)


def bit_names(model_id: int, point: str, value: int) -> list[str]:
    """Name the set bits of a bitfield point; a bit without a symbol is `bit N`."""
    names = {bit: name for name, bit in _symbols(model_id, point).items()}
    return [
        names.get(bit, f"bit {bit}") for bit in range(32) if value >> bit & 1
    ]


def _iso(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
