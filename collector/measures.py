"""Normalised measures of a device, whatever SunSpec model family it reports.

The one mapping from channel names to measures, used by the fleet API, alerts and the
dashboard:

- `ac_power_w`: `W` of an inverter model (101-103, 111-113) or of 701;
- `lifetime_energy_wh`: `WH` of an inverter model, or `TotWhInj` of 701;
- `dc_power_w`: one value per DC input, `DCW` of each 160 module, else the inverter's
  own `DCW` as one input;
- `grid_import_wh` and `grid_export_wh`: `TotWhImp` and `TotWhExp` of a meter model
  (201-204, 211-214).

Where a device reports a measure in more than one model, the first model in the order
above wins (an inverter model before 701). Only a device's first instance of a model
counts: `103#2.W` is not used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

INVERTER_MODELS = ("101", "102", "103", "111", "112", "113")
DER_AC_MODEL = "701"
MPPT_MODEL = "160"
METER_MODELS = ("201", "202", "203", "204", "211", "212", "213", "214")

AC_POWER_CHANNELS = (*(f"{m}.W" for m in INVERTER_MODELS), "701.W")
LIFETIME_ENERGY_CHANNELS = (*(f"{m}.WH" for m in INVERTER_MODELS), "701.TotWhInj")
INVERTER_DC_POWER_CHANNELS = tuple(f"{m}.DCW" for m in INVERTER_MODELS)
GRID_IMPORT_CHANNELS = tuple(f"{m}.TotWhImp" for m in METER_MODELS)
GRID_EXPORT_CHANNELS = tuple(f"{m}.TotWhExp" for m in METER_MODELS)
_MODULE_DC_POWER = re.compile(r"^160\.module\[(\d+)\]\.DCW$")


@dataclass(frozen=True, slots=True)
class MeasureChannels:
    """The channel names that feed each measure of one device; None where none does."""

    ac_power: str | None = None
    lifetime_energy: str | None = None
    dc_power: tuple[str, ...] = ()
    grid_import: str | None = None
    grid_export: str | None = None

    @property
    def is_inverter(self) -> bool:
        """True if the device reports AC power or lifetime energy of an inverter."""
        return self.ac_power is not None or self.lifetime_energy is not None

    def names(self) -> list[str]:
        """Return every channel name that feeds a measure."""
        single = (self.ac_power, self.lifetime_energy, self.grid_import,
                  self.grid_export)
        return [name for name in single if name is not None] + list(self.dc_power)


@dataclass(frozen=True, slots=True)
class Measures:
    """A device's normalised measures: watts and watt-hours, None where unknown."""

    ac_power_w: float | None = None
    lifetime_energy_wh: float | None = None
    dc_power_w: tuple[float | None, ...] = field(default=())
    grid_import_wh: float | None = None
    grid_export_wh: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the measures as the fleet API sends them (`dc_power_w` a list)."""
        return {
            "ac_power_w": self.ac_power_w,
            "lifetime_energy_wh": self.lifetime_energy_wh,
            "dc_power_w": list(self.dc_power_w),
            "grid_import_wh": self.grid_import_wh,
            "grid_export_wh": self.grid_export_wh,
        }


def _first(candidates: Iterable[str], names: set[str]) -> str | None:
    return next((name for name in candidates if name in names), None)


def measure_channels(names: Iterable[str]) -> MeasureChannels:
    """Pick the channels of one device, by name, that feed each measure."""
    present = set(names)
    modules = sorted(
        (int(match[1]), name)
        for name in present
        if (match := _MODULE_DC_POWER.match(name)) is not None
    )
    if modules:
        dc_power = tuple(name for _, name in modules)
    else:
        inverter_dc = _first(INVERTER_DC_POWER_CHANNELS, present)
        dc_power = (inverter_dc,) if inverter_dc else ()
    return MeasureChannels(
        ac_power=_first(AC_POWER_CHANNELS, present),
        lifetime_energy=_first(LIFETIME_ENERGY_CHANNELS, present),
        dc_power=dc_power,
        grid_import=_first(GRID_IMPORT_CHANNELS, present),
        grid_export=_first(GRID_EXPORT_CHANNELS, present),
    )


def device_measures(values: Mapping[str, float | None]) -> Measures:
    """Compute a device's measures from its latest values, by channel name.

    A measure whose channel is missing, or whose latest value is null, is None.
    """
    channels = measure_channels(values)

    def value_of(name: str | None) -> float | None:
        return None if name is None else values.get(name)

    return Measures(
        ac_power_w=value_of(channels.ac_power),
        lifetime_energy_wh=value_of(channels.lifetime_energy),
        dc_power_w=tuple(values.get(name) for name in channels.dc_power),
        grid_import_wh=value_of(channels.grid_import),
        grid_export_wh=value_of(channels.grid_export),
    )
