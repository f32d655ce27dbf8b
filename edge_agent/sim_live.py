"""Live values for a served site image: AC power that varies, energy counters that grow.

Each inverter (models 101-103, 111-113, 701) and meter (201-204, 211-214) of an image
gets its `W` point moved along a compressed day, times a little noise. The day starts
at the image's value, dips smoothly to `NIGHT_FRACTION` of it half a period later and
comes back. The model's lifetime counters grow by power x elapsed time: `WH` or
`TotWhInj` while the power is positive, and on a meter `TotWhImp` while it is positive
(import) and `TotWhExp` while it is negative (export). Points are found by walking the
image's model chain and laying each model out with `edge_agent.sunspec.layout_model`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from edge_agent.decode import SCALE_FACTOR_RANGE, decode_model, decode_raw
from edge_agent.images import DeviceImage, SiteImage
from edge_agent.simulator import Simulator, SimulatorError
from edge_agent.sunspec import (
    DEFAULT_BASES,
    END_MODEL_ID,
    SUNS_MARKER,
    ModelLayout,
    layout_model,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# One compressed day: full power, a dip, full power again. Dashboards chart 5-minute
# averages, so a day of four such buckets still shows as a curve there.
DAY_SECONDS = 1200.0
NIGHT_FRACTION = 0.15  # power at the bottom of the dip, as a fraction of the start
NOISE_FRACTION = 0.02  # power noise: uniform within +-2 % of the curve
# Per model: the power point, the counter that rises while the power is positive and
# the one that rises while it is negative (None where the model has no such counter).
LIVE_POINTS: dict[int, tuple[str, str, str | None]] = {
    **{model: ("W", "WH", None) for model in (101, 102, 103, 111, 112, 113)},
    701: ("W", "TotWhInj", "TotWhAbs"),
    **{model: ("W", "TotWhImp", "TotWhExp") for model in (201, 202, 203, 204)},
    **{model: ("W", "TotWhImp", "TotWhExp") for model in (211, 212, 213, 214)},
}
# Raw ranges of the integer types that leave out their "not implemented" encodings
# (0x8000... signed, 0xFFFF... unsigned). Accumulators use 0 for it, so a counter
# that the image leaves at 0 still reads as not implemented until its first step.
_INTEGER_RANGES = {
    "int16": (-0x7FFF, 0x7FFF),
    "uint16": (0, 0xFFFE),
    "acc16": (0, 0xFFFF),
    "int32": (-0x7FFF_FFFF, 0x7FFF_FFFF),
    "uint32": (0, 0xFFFF_FFFE),
    "acc32": (0, 0xFFFF_FFFF),
    "int64": (-0x7FFF_FFFF_FFFF_FFFF, 0x7FFF_FFFF_FFFF_FFFF),
    "uint64": (0, 0xFFFF_FFFF_FFFF_FFFE),
    "acc64": (0, 0xFFFF_FFFF_FFFF_FFFF),
}


@dataclass(frozen=True, slots=True)
class LivePoint:
    """A point at an absolute register address, with the image's scale factor."""

    name: str
    address: int
    type: str
    size: int
    exponent: int  # 10**exponent units per raw step; 0 for float points

    def encode(self, value: float, *, counter: bool = False) -> list[int]:
        """Return the words of `value`, rounded (floored for a counter) to one step.

        Integer values are clamped to the type's range, so a counter stops at its
        largest value instead of wrapping.
        """
        if self.type in ("float32", "float64"):
            data = struct.pack(">f" if self.size == 2 else ">d", value)
            return list(struct.unpack(f">{self.size}H", data))
        steps = value / 10**self.exponent
        raw = math.floor(steps) if counter else round(steps)
        low, high = _INTEGER_RANGES[self.type]
        raw = min(max(raw, low), high) % (1 << (16 * self.size))
        return [(raw >> (16 * i)) & 0xFFFF for i in reversed(range(self.size))]


@dataclass(frozen=True, slots=True)
class LiveModel:
    """The live points of one model instance on one unit, with their image values."""

    unit: int
    model_id: int
    power: LivePoint
    initial_power: float  # W
    positive_counter: LivePoint | None  # rises with power while it is positive
    negative_counter: LivePoint | None  # rises with -power while it is negative
    initial_energy: tuple[float, float]  # Wh of the two counters; 0 where absent


def find_live_models(image: SiteImage) -> list[LiveModel]:
    """Find the inverter and meter models of every device in the image.

    A model is left out when its power point is missing, not implemented, 0 W, or
    scaled by a missing scale factor, because no curve can start from it.
    """
    models = []
    for device in image.devices:
        for model_id, address, words in _model_chain(device):
            live = _live_model(device.unit, model_id, address, words)
            if live is not None:
                models.append(live)
    return models


def _model_chain(device: DeviceImage) -> Iterator[tuple[int, int, list[int]]]:
    """Yield (model id, address, words from the ID register) along the chain."""
    base = next(
        (b for b in DEFAULT_BASES if device.is_mapped("holding", b, 2)
         and tuple(device.read("holding", b, 2)) == SUNS_MARKER),
        None,
    )
    if base is None:
        return
    address = base + 2
    while device.is_mapped("holding", address, 2):
        model_id, length = device.read("holding", address, 2)
        if model_id in (END_MODEL_ID, 0):
            return
        if not device.is_mapped("holding", address, length + 2):
            return
        yield model_id, address, device.read("holding", address, length + 2)
        address += length + 2


def _live_model(
    unit: int, model_id: int, address: int, words: list[int]
) -> LiveModel | None:
    names = LIVE_POINTS.get(model_id)
    layout = layout_model(model_id, words[1], words)
    if names is None or layout is None:
        return None
    values = decode_model(layout, words)
    power = _live_point(layout, names[0], address, words)
    initial_power = values.get(names[0])
    if power is None or not isinstance(initial_power, int | float) or not initial_power:
        log.debug("unit %d model %d: no usable power point; left static",
                  unit, model_id)
        return None
    counters = [
        _live_point(layout, name, address, words) if name else None
        for name in names[1:]
    ]
    energy = tuple(
        float(values.get(name) or 0.0) if counter else 0.0  # type: ignore[arg-type]
        for name, counter in zip(names[1:], counters)
    )
    return LiveModel(unit, model_id, power, float(initial_power), counters[0],
                     counters[1], (energy[0], energy[1]))


def _live_point(
    layout: ModelLayout, name: str, address: int, words: Sequence[int]
) -> LivePoint | None:
    """Return the point with its scale factor's exponent, or None where unusable."""
    point = layout.point(name)
    if point is None:
        return None
    exponent = 0
    if isinstance(point.sf, int):
        exponent = point.sf
    elif isinstance(point.sf, str):
        sf_point = layout.point(point.sf)
        if sf_point is None:
            return None
        raw = decode_raw("sunssf", words[sf_point.offset : sf_point.offset + 1])
        if not isinstance(raw, int) or raw not in SCALE_FACTOR_RANGE:
            return None
        exponent = raw
    return LivePoint(name, address + point.offset, point.type, point.size, exponent)


def day_curve(elapsed: float, period: float = DAY_SECONDS) -> float:
    """Return the fraction of the starting power `elapsed` seconds into the day.

    1.0 at the start of each period, NIGHT_FRACTION half a period later.
    """
    dip = (1 - math.cos(2 * math.pi * elapsed / period)) / 2
    return 1.0 - (1.0 - NIGHT_FRACTION) * dip


class _ModelState:
    """Power now and exact energy so far of one live model."""

    def __init__(self, model: LiveModel) -> None:
        self.model = model
        self.power = model.initial_power
        self.energy = list(model.initial_energy)  # exact Wh, before rounding to a step


class LiveSite:
    """Move the power and counters of a served image at every `update()`.

    Energy between two updates is the power served in between times the time elapsed,
    so the counters agree with the power the agent reads. Counters keep the exact
    energy and write the whole steps of their scale factor, so with TotWh_SF = 3
    (kWh) a counter moves once per kWh and never goes backwards.

    Example::

        live = LiveSite(simulator)
        task = asyncio.create_task(live.run(interval=2.0))
    """

    def __init__(
        self,
        simulator: Simulator,
        *,
        period: float = DAY_SECONDS,
        noise: float = NOISE_FRACTION,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.simulator = simulator
        self.period = period
        self.noise = noise
        self.rng = rng or random.Random()
        self.clock = clock
        self.models = find_live_models(simulator.image)
        self._states = [_ModelState(model) for model in self.models]
        self._started_at = self._updated_at = clock()

    async def update(self) -> None:
        """Add the energy since the last update, pick the next power, write both.

        :raises SimulatorError: the simulator is not serving.
        """
        now = self.clock()
        hours = (now - self._updated_at) / 3600
        fraction = day_curve(now - self._started_at, self.period)
        self._updated_at = now
        for state in self._states:
            _accumulate(state, hours)
            noise = 1 + self.noise * self.rng.uniform(-1.0, 1.0)
            state.power = state.model.initial_power * fraction * noise
            await self._write(state)

    async def run(self, interval: float) -> None:
        """Update every `interval` seconds until cancelled; skip while not serving."""
        log.info("simulator %s: live values for %d models every %g s",
                 self.simulator.image.name, len(self.models), interval)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.update()
            except SimulatorError:
                log.debug("simulator %s is not serving; values not updated",
                          self.simulator.image.name)

    async def _write(self, state: _ModelState) -> None:
        model = state.model
        power = model.power
        await self.simulator.write(model.unit, power.address, power.encode(state.power))
        counters = (model.positive_counter, model.negative_counter)
        for counter, energy in zip(counters, state.energy):
            if counter is not None:
                words = counter.encode(energy, counter=True)
                await self.simulator.write(model.unit, counter.address, words)


def _accumulate(state: _ModelState, hours: float) -> None:
    """Add the energy of the power served for `hours` to the counter it feeds."""
    model = state.model
    if state.power > 0 and model.positive_counter is not None:
        state.energy[0] += state.power * hours
    elif state.power < 0 and model.negative_counter is not None:
        state.energy[1] += -state.power * hours
