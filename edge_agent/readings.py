"""Typed records that flow from the poller through the buffer to the forwarder."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DeviceState(enum.StrEnum):
    """State of one device, reported with every poll."""

    ONLINE = "online"
    SLEEPING = "sleeping"  # responds, and its own operating state reports sleeping
    OFFLINE = "offline"  # no response
    REFUSED = "refused"  # TCP connect refused, for example a port held by another client
    NOT_SUNSPEC = "not-sunspec"  # responds, but has no SunS marker at 40000, 0 or 50000
    MALFORMED = "malformed"  # SunS found, but the model chain cannot be followed


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Identity of one device behind one unit id, from SunSpec model 1 or a profile."""

    device_id: str
    address: str  # "<host>:<port>/<unit id>" or "<serial port>/<unit id>"
    name: str = ""
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Channel:
    """One measured quantity of one device: a SunSpec point or a profile register."""

    name: str  # "701.W", "160.module[2].DCW", "profile.cos_phi"
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Poll:
    """Everything one poll of one device produced, stamped with one time.

    `values` maps channel names to scaled values in the channel's unit, or None where the
    device reports no value. A poll of a device that did not respond has no values.
    """

    device: DeviceInfo
    time_ms: int
    state: DeviceState
    values: dict[str, float | None] = field(default_factory=dict)
    channels: tuple[Channel, ...] = ()
