"""Poll SunSpec devices: one loop per endpoint, one UnitPoller per unit id.

A UnitPoller discovers its unit's map on the first poll, then reads every model with a
known layout in as few requests as the endpoint allows, decodes them and reports a
DeviceState with each Poll. It discovers again when a model's header no longer matches
the map, so a firmware update that changes a model's length is followed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from edge_agent.decode import (
    NON_CHANNEL_TYPES,
    Value,
    decode_model,
    normalise_power_factor,
)
from edge_agent.endpoint import EndpointSettings
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll
from edge_agent.sunspec import (
    COMMON_MODEL_ID,
    DeviceMap,
    Endpoint,
    MalformedMap,
    MappedDevice,
    ModelRef,
    NoDevice,
    NotSunSpec,
    Read,
    cut_addresses,
    discover,
    identity_from_common,
    layout_model,
    plan_reads,
    read_registers,
)
from edge_agent.transport import (
    ModbusConnectionRefused,
    ModbusEndpoint,
    ModbusError,
)

logger = logging.getLogger(__name__)

FAILED_STATES = {
    DeviceState.OFFLINE,
    DeviceState.REFUSED,
    DeviceState.NOT_SUNSPEC,
    DeviceState.MALFORMED,
}


@dataclass(frozen=True, slots=True)
class _OperatingState:
    """The point that reports a device's own operating state, and its meaning."""

    point: str
    sleeping: frozenset[int]
    fault: int
    alarm: str  # bitfield point that is non-zero while an alarm is active


_INVERTER_STATE = _OperatingState("St", frozenset({2, 8}), 7, "Evt1")  # SLEEPING, STANDBY
OPERATING_STATES = {
    **{model_id: _INVERTER_STATE for model_id in (101, 102, 103, 111, 112, 113)},
    701: _OperatingState("InvSt", frozenset({1, 7}), 6, "Alrm"),
}


class UnitPoller:
    """Polls the SunSpec devices behind one unit id of one endpoint."""

    def __init__(
        self,
        endpoint: Endpoint,
        unit: int,
        *,
        address_label: str,
        name: str = "",
        wall_clock: Callable[[], float] = time.time,
    ):
        self.endpoint = endpoint
        self.unit = unit
        self.address = f"{address_label}/{unit}"
        self.name = name
        self.wall_clock = wall_clock
        self.device_map: DeviceMap | None = None
        self._plan: list[Read] = []
        self._cuts: set[int] = set()
        self._devices: list[DeviceInfo] = [DeviceInfo(self.address, self.address, name)]
        self._failure: DeviceState | None = None
        self._flagged: set[str] = set()  # device ids whose last frame was implausible

    async def poll(self) -> Poll:
        """Poll the unit and return the Poll of its first device.

        A unit with several common models (meters inside an inverter's map) has one
        device per common model, and `poll_devices` returns a Poll for each.
        """
        return (await self.poll_devices())[0]

    async def poll_devices(self) -> list[Poll]:
        """Poll the unit: one Poll per device, or one stating why none was read."""
        time_ms = int(self.wall_clock() * 1000)
        try:
            registers = await self._read()
        except (ModbusError, NoDevice, NotSunSpec, MalformedMap) as err:
            state = _failed_state(err)
            self._note_failure(state, err)
            return [Poll(device, time_ms, state) for device in self._devices]

        assert self.device_map is not None
        polls = [
            self._decode(device, registers, time_ms)
            for device in self.device_map.devices
        ]
        self._note_recovery()
        return polls

    async def _read(self) -> dict[int, int]:
        """Read every mapped model, discovering the map first where needed."""
        if self.device_map is None:
            await self._discover()
        registers = await self._read_plan()
        if not self._map_matches(registers):
            logger.info("%s: model headers changed, discovering the map again",
                        self.address)
            await self._discover()
            registers = await self._read_plan()
            if not self._map_matches(registers):
                self.device_map = None
                raise MalformedMap(
                    f"{self.address}: model headers differ from the map found just "
                    "before; the device map keeps changing"
                )
        return registers

    async def _discover(self) -> None:
        self.device_map = None
        device_map = await discover(self.endpoint, self.unit)
        models = device_map.models
        self._plan = plan_reads(
            models, self.endpoint.settings.max_registers, device_map.fragile
        )
        self._cuts = cut_addresses(models)
        self.device_map = device_map
        self._devices = [self._device_info(i, d) for i, d in
                         enumerate(device_map.devices)]
        logger.info("%s: found %s", self.address, ", ".join(
            f"{info.manufacturer} {info.model} (models "
            f"{', '.join(str(m.model_id) for m in device.models)})"
            for info, device in zip(self._devices, device_map.devices)))

    async def _read_plan(self) -> dict[int, int]:
        registers, done = await read_registers(
            self.endpoint, self.unit, self._plan, self._cuts
        )
        # Reads that had to be split stay split, so later polls skip the rejected sizes.
        self._plan = done
        return registers

    def _map_matches(self, registers: dict[int, int]) -> bool:
        assert self.device_map is not None
        for model in self.device_map.models:
            if layout_model(model.model_id, model.length) is None:
                continue
            header = (registers.get(model.address), registers.get(model.address + 1))
            if header != (model.model_id, model.length):
                return False
        for device in self.device_map.devices:
            words = _model_words(device.models[0], registers)
            if identity_from_common(words) != device.identity:
                return False
        return True

    def _device_info(self, index: int, device: MappedDevice) -> DeviceInfo:
        identity = device.identity
        fallback = self.address if index == 0 else f"{self.address}#{index + 1}"
        return DeviceInfo(
            device_id=identity.serial or fallback,
            address=self.address,
            name=self.name,
            manufacturer=identity.manufacturer,
            model=identity.model,
            serial=identity.serial,
            version=identity.version,
        )

    def _decode(self, device: MappedDevice, registers: dict[int, int],
                time_ms: int) -> Poll:
        assert self.device_map is not None
        info = self._devices[self.device_map.devices.index(device)]
        values: dict[str, float | None] = {}
        channels: list[Channel] = []
        state = DeviceState.ONLINE
        flagged = False
        for prefix, model in _model_prefixes(device.models):
            words = _model_words(model, registers)
            decoded = _decode_channels(prefix, model, words, values, channels)
            if decoded is None:
                continue
            if _implausible(model, words, decoded):
                flagged = True
                for name in decoded:
                    values[f"{prefix}.{name}"] = None
            elif _sleeping(model, decoded):
                state = DeviceState.SLEEPING

        self._note_frame(info.device_id, flagged)
        return Poll(info, time_ms, state, values, tuple(channels))

    def _note_frame(self, device_id: str, flagged: bool) -> None:
        if flagged and device_id not in self._flagged:
            logger.warning(
                "%s (%s): implausible frame, all zeros with a fault state; its values "
                "are reported as no value", self.address, device_id)
            self._flagged.add(device_id)
        elif not flagged:
            self._flagged.discard(device_id)

    def _note_failure(self, state: DeviceState, err: Exception) -> None:
        if self._failure is None:
            logger.warning("%s: %s, reported as %s", self.address, err, state.value)
        else:
            logger.debug("%s: still %s: %s", self.address, state.value, err)
        self._failure = state

    def _note_recovery(self) -> None:
        if self._failure is not None:
            logger.info("%s: responding again after being %s", self.address,
                        self._failure.value)
            self._failure = None


def _failed_state(err: Exception) -> DeviceState:
    if isinstance(err, ModbusConnectionRefused):
        return DeviceState.REFUSED
    if isinstance(err, NotSunSpec):
        return DeviceState.NOT_SUNSPEC
    if isinstance(err, MalformedMap):
        return DeviceState.MALFORMED
    return DeviceState.OFFLINE


def _model_prefixes(models: Sequence[ModelRef]) -> list[tuple[str, ModelRef]]:
    """Name each model for its channels: "103", and "103#2" for a second instance."""
    seen: dict[int, int] = {}
    prefixes = []
    for model in models:
        seen[model.model_id] = seen.get(model.model_id, 0) + 1
        count = seen[model.model_id]
        prefix = str(model.model_id) if count == 1 else f"{model.model_id}#{count}"
        prefixes.append((prefix, model))
    return prefixes


def _model_words(model: ModelRef, registers: dict[int, int]) -> list[int | None]:
    return [registers.get(a) for a in range(model.address, model.end)]


def _decode_channels(
    prefix: str,
    model: ModelRef,
    words: list[int | None],
    values: dict[str, float | None],
    channels: list[Channel],
) -> dict[str, Value] | None:
    """Decode one model into `values` and `channels`; return its decoded points."""
    layout = layout_model(model.model_id, model.length, words)
    if layout is None or model.model_id == COMMON_MODEL_ID:
        return None
    decoded = decode_model(layout, words)
    for point in layout.points:
        if point.type in NON_CHANNEL_TYPES or point.name in ("ID", "L"):
            continue
        name = f"{prefix}.{point.name}"
        value = decoded[point.name]
        values[name] = value if isinstance(value, (int, float)) else None
        channels.append(Channel(name, point.units))
        if point.units == "Pct" and point.name.split(".")[-1].startswith("PF"):
            values[f"{name}.normalised"] = normalise_power_factor(values[name])
            channels.append(Channel(f"{name}.normalised", None))
    return decoded


def _implausible(model: ModelRef, words: list[int | None],
                 decoded: dict[str, Value]) -> bool:
    """Tell whether a frame is all zeros, scale factors included, with a fault state.

    Devices send such a frame now and then between good ones. Its zeros are no
    measurement, and an energy counter of 0 would look like a reset.
    """
    operating = OPERATING_STATES.get(model.model_id)
    if operating is None or decoded.get(operating.point) != operating.fault:
        return False
    layout = layout_model(model.model_id, model.length)
    assert layout is not None
    state_points = {operating.point, "StVnd"}
    for point in layout.points:
        if point.name in ("ID", "L") or point.name in state_points:
            continue
        if point.name.startswith("Evt") or point.name == operating.alarm:
            continue
        if any(w != 0 for w in words[point.offset : point.offset + point.size]):
            return False
    return True


def _sleeping(model: ModelRef, decoded: dict[str, Value]) -> bool:
    operating = OPERATING_STATES.get(model.model_id)
    if operating is None or decoded.get(operating.point) not in operating.sleeping:
        return False
    return not decoded.get(operating.alarm)


Sink = Callable[[Poll], Awaitable[None]]


async def run_endpoint(
    settings: EndpointSettings,
    unit_ids: Sequence[int],
    poll_interval: float,
    sink: Sink,
    stop: asyncio.Event,
    *,
    clock: Callable[[], float] = time.monotonic,
    endpoint_factory: Callable[[EndpointSettings], Endpoint] = ModbusEndpoint,
    name: str = "",
) -> None:
    """Poll every unit of one endpoint in turn every `poll_interval` seconds.

    Each Poll goes to `await sink(poll)`. The loop never ends on an error: it logs it and
    goes on with the next unit. It returns soon after `stop` is set.
    """
    endpoint = endpoint_factory(settings)
    pollers = [
        UnitPoller(endpoint, unit, address_label=settings.label, name=name)
        for unit in unit_ids
    ]
    logger.info("polling %s units %s every %.1f s", settings.label,
                list(unit_ids), poll_interval)
    due = clock()
    try:
        while not stop.is_set():
            await _poll_round(endpoint, pollers, sink, stop)
            due = max(due + poll_interval, clock())
            await _wait(stop, due - clock())
    finally:
        await _close(endpoint)
        logger.info("stopped polling %s", settings.label)


async def _poll_round(endpoint: Endpoint, pollers: Sequence[UnitPoller],
                      sink: Sink, stop: asyncio.Event) -> None:
    for poller in pollers:
        if stop.is_set():
            return
        try:
            polls = await poller.poll_devices()
        except Exception:
            logger.exception("%s: poll failed unexpectedly", poller.address)
            continue
        for poll in polls:
            try:
                await sink(poll)
            except Exception:
                logger.exception("%s: storing a poll failed", poller.address)
    try:
        await endpoint.end_poll()
    except Exception:
        logger.exception("%s: ending the poll round failed",
                         endpoint.settings.label)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        await asyncio.sleep(0)  # let other endpoints' loops run
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def _close(endpoint: Endpoint) -> None:
    close = getattr(endpoint, "close", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        logger.exception("%s: closing the connection failed", endpoint.settings.label)
