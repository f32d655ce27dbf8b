"""Poll devices: one loop per endpoint, one poller per unit id.

A UnitPoller discovers its unit's SunSpec map on the first poll and applies the quirks
that match model 1's manufacturer and model. Then it reads every model with a known
layout in as few requests as the endpoint allows, decodes them and reports a
DeviceState with each Poll. It discovers again when a model's header no longer matches the map, so a
firmware update that changes a model's length is followed. A ProfilePoller reads a
device without SunSpec through a register map profile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from edge_agent.decode import (
    NON_CHANNEL_TYPES,
    PointDecoder,
    normalise_power_factor,
)
from edge_agent.endpoint import EndpointSettings
from edge_agent.profiles import (
    Limits,
    ProfileRead,
    Quirk,
    RegisterMap,
    builtin_profiles,
)
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll
from edge_agent.sunspec import (
    COMMON_MODEL_ID,
    ILLEGAL_DATA_ADDRESS,
    DeviceMap,
    Endpoint,
    Identity,
    MalformedMap,
    MappedDevice,
    ModelLayout,
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
    BUSY_RETRIES,
    BUSY_WAIT,
    ModbusConnectionRefused,
    ModbusEndpoint,
    ModbusError,
    ModbusExceptionResponse,
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
        quirks: Sequence[Quirk] | None = None,
        extra: RegisterMap | None = None,
        device_ids: DeviceIds | None = None,
    ):
        self.endpoint = endpoint
        self.device_ids = DeviceIds() if device_ids is None else device_ids
        self.unit = unit
        self.address = f"{address_label}/{unit}"
        self.name = name
        self.wall_clock = wall_clock
        self.quirks = builtin_profiles().quirks if quirks is None else tuple(quirks)
        self.extra = extra  # vendor registers read beside the SunSpec models
        self.matched: list[Quirk] = []  # quirks that match the discovered devices
        self.device_map: DeviceMap | None = None
        self.last_exception: Exception | None = None  # why the last poll failed
        self._extra_plan: list[ProfileRead] | None = None
        self._skip: tuple[tuple[int, int], ...] = ()
        # What each poll checks the map by: model headers by address, and the common
        # model of each device with its identity.
        self._headers: tuple[tuple[int, tuple[int, int]], ...] = ()
        self._commons: tuple[tuple[ModelRef, Identity], ...] = ()
        # Words of each common model, by address, that decode to the identity in the map
        self._identity_words: dict[int, list[int | None]] = {}
        self._plan: list[Read] = []
        self._cuts: set[int] = set()
        self._model_starts: frozenset[int] = frozenset()
        # Models whose reads failed with exception 4 in the last poll
        self._failing_models: frozenset[ModelRef] = frozenset()
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
            extra = await self._read_extra()
        except (ModbusError, NoDevice, NotSunSpec, MalformedMap) as err:
            state = _failed_state(err)
            self._note_failure(state, err)
            return [Poll(device, time_ms, state) for device in self._devices]

        assert self.device_map is not None
        polls = [
            self._decode(device, registers, time_ms)
            for device in self.device_map.devices
        ]
        if extra is not None:
            # The vendor registers belong to the device at the unit's first common model.
            values, channels = extra
            polls[0] = replace(polls[0], values={**polls[0].values, **values},
                               channels=polls[0].channels + tuple(channels))
        self._note_recovery()
        return polls

    async def _read_extra(self) -> tuple[dict[str, float | None], list[Channel]] | None:
        if self.extra is None:
            return None
        values, channels, done = await read_register_map(
            self.endpoint, self.unit, self.extra, self.address, self._extra_plan)
        self._extra_plan = done or None
        return values, channels

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
        self._apply_quirks(device_map)
        models = device_map.models
        plan = plan_reads(
            models, self.endpoint.settings.max_registers, device_map.fragile
        )
        self._plan = skip_reads(plan, self._skip)
        self._cuts = cut_addresses(models)
        self._model_starts = frozenset(model.address for model in models)
        self._note_map(device_map)
        self.device_map = device_map
        self._devices = [self._device_info(i, d) for i, d in
                         enumerate(device_map.devices)]
        logger.info("%s: found %s", self.address, ", ".join(
            f"{info.manufacturer} {info.model} (models "
            f"{', '.join(str(m.model_id) for m in device.models)})"
            for info, device in zip(self._devices, device_map.devices)))

    def _apply_quirks(self, device_map: DeviceMap) -> None:
        """Tighten the endpoint's settings with the quirks that match the devices.

        The settings are the endpoint's, shared by every unit behind it, because the
        link carries one request at a time. A connect_delay takes effect on the next
        connect, since model 1 can only be read once connected.
        """
        matched: list[Quirk] = []
        for device in device_map.devices:
            identity = device.identity
            for quirk in self.quirks:
                if quirk.matches(identity.manufacturer, identity.model) and \
                        quirk not in matched:
                    matched.append(quirk)
                    logger.info("%s: %s %s matches quirk %s (%s)", self.address,
                                identity.manufacturer, identity.model, quirk.name,
                                quirk.describe())
        self.matched = matched
        for quirk in matched:
            self.endpoint.settings = tighten(self.endpoint.settings, quirk.limits)
        self._skip = tuple(r for quirk in matched for r in quirk.skip)

    async def _read_plan(self) -> dict[int, int]:
        registers, done = await read_registers(
            self.endpoint, self.unit, self._plan, self._cuts, self._model_starts
        )
        # Reads that had to be split stay split, so later polls skip the rejected sizes.
        # NOTE: reads split at model starts after exception 4 stay split even once the
        # device answers the whole range again, until the next discovery.
        self._plan = done
        failed = [read for read in done if read.address not in registers]
        self._note_failing_models(failed)
        return registers

    def _note_failing_models(self, failed: list[Read]) -> None:
        """Log each model once when its reads start failing with exception 4, and once
        when they work again."""
        assert self.device_map is not None
        failing = frozenset(
            model for model in self.device_map.models
            if any(_overlaps(read, model) for read in failed)
        )
        for model in sorted(failing - self._failing_models, key=lambda m: m.address):
            logger.warning(
                "%s: device failure (Modbus exception 4) reading model %d at %d; its "
                "values are reported as no value until the read succeeds",
                self.address, model.model_id, model.address,
                extra={"device": self.address})
        for model in sorted(self._failing_models - failing, key=lambda m: m.address):
            logger.info("%s: model %d at %d read again after a device failure",
                        self.address, model.model_id, model.address,
                        extra={"device": self.address})
        self._failing_models = failing

    def _map_matches(self, registers: dict[int, int]) -> bool:
        """Tell whether the model headers and identities read agree with the map."""
        for address, header in self._headers:
            # A model missing from `registers` failed with exception 4 and is tried
            # again next poll.
            if address not in registers:
                continue
            if (registers[address], registers.get(address + 1)) != header:
                return False
        for common, identity in self._commons:
            words = _model_words(common, registers)
            if None in words:
                continue  # a read failed with exception 4 and is tried next poll
            if words == self._identity_words.get(common.address):
                continue
            if identity_from_common(words) != identity:
                return False
            self._identity_words[common.address] = words
        return True

    def _note_map(self, device_map: DeviceMap) -> None:
        """Note the headers and common models that each poll checks against the map."""
        self._headers = tuple(
            (model.address, (model.model_id, model.length))
            for model in device_map.models
            if layout_model(model.model_id, model.length) is not None
            and not _skipped(model.address, model.address + 2, self._skip)
        )
        self._commons = tuple(
            (device.models[0], device.identity) for device in device_map.devices
            if not _skipped(device.models[0].address, device.models[0].end, self._skip)
        )
        self._identity_words.clear()

    def _device_info(self, index: int, device: MappedDevice) -> DeviceInfo:
        identity = device.identity
        fallback = self.address if index == 0 else f"{self.address}#{index + 1}"
        device_id = fallback
        if identity.serial and self.device_ids.claim(identity.serial, fallback):
            device_id = identity.serial
        return DeviceInfo(
            device_id=device_id,
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
            layout = _decode_channels(prefix, model, words, values, channels)
            operating = OPERATING_STATES.get(model.model_id)
            if layout is None or operating is None:
                continue
            own_state = values.get(f"{prefix}.{operating.point}")
            if _implausible(model, operating, words, own_state):
                flagged = True
                for point in layout.points:
                    values[f"{prefix}.{point.name}"] = None
            elif _sleeping(operating, own_state,
                           values.get(f"{prefix}.{operating.alarm}")):
                state = DeviceState.SLEEPING

        self._note_frame(info.device_id, flagged)
        return Poll(info, time_ms, state, values, tuple(channels))

    def _note_frame(self, device_id: str, flagged: bool) -> None:
        if flagged and device_id not in self._flagged:
            logger.warning(
                "%s (%s): implausible frame, all zeros with a fault state; its values "
                "are reported as no value", self.address, device_id,
                extra={"device": self.address})
            self._flagged.add(device_id)
        elif not flagged:
            self._flagged.discard(device_id)

    def _note_failure(self, state: DeviceState, err: Exception) -> None:
        self.last_exception = err
        fields = {"device": self.address}
        if self._failure is None:
            logger.warning("%s: %s, reported as %s", self.address, err, state.value,
                           extra=fields)
        else:
            logger.debug("%s: still %s: %s", self.address, state.value, err,
                         extra=fields)
        self._failure = state

    @property
    def last_error(self) -> str | None:
        """Why the last poll failed, or None after a good poll."""
        return None if self.last_exception is None else str(self.last_exception)

    def _note_recovery(self) -> None:
        self.last_exception = None
        if self._failure is not None:
            logger.info("%s: responding again after being %s", self.address,
                        self._failure.value, extra={"device": self.address})
            self._failure = None


class ProfilePoller:
    """Polls a device without SunSpec through a register map profile."""

    def __init__(
        self,
        endpoint: Endpoint,
        unit: int,
        register_map: RegisterMap,
        *,
        address_label: str,
        name: str = "",
        wall_clock: Callable[[], float] = time.time,
    ):
        self.endpoint = endpoint
        self.unit = unit
        self.register_map = register_map
        self.address = f"{address_label}/{unit}"
        self.wall_clock = wall_clock
        self.device = DeviceInfo(
            device_id=self.address, address=self.address, name=name,
            manufacturer=register_map.manufacturer, model=register_map.model,
        )
        self._failure: DeviceState | None = None
        self.last_error: str | None = None  # why the last poll failed
        self.last_exception: Exception | None = None
        self._plan: list[ProfileRead] | None = None  # reads that worked last time
        endpoint.settings = tighten(endpoint.settings, register_map.limits)

    async def poll(self) -> Poll:
        """Read every register of the profile once; return the Poll."""
        time_ms = int(self.wall_clock() * 1000)
        try:
            values, channels, done = await read_register_map(
                self.endpoint, self.unit, self.register_map, self.address, self._plan)
        except ModbusError as err:
            self.last_exception = err
            return self._failed(time_ms, _failed_state(err), str(err))
        if not done:
            return self._failed(time_ms, DeviceState.OFFLINE, (
                f"{self.address}: every read of profile {self.register_map.name} was "
                "rejected; check the unit id and that the profile fits the device"))

        self._plan = done
        self.last_error = self.last_exception = None
        if self._failure is not None:
            logger.info("%s: responding again after being %s", self.address,
                        self._failure.value, extra={"device": self.address})
            self._failure = None
        return Poll(self.device, time_ms, DeviceState.ONLINE, values, tuple(channels))

    async def poll_devices(self) -> list[Poll]:
        """Poll the unit: a profile device is one device."""
        return [await self.poll()]

    def _failed(self, time_ms: int, state: DeviceState, reason: str) -> Poll:
        self.last_error = reason
        fields = {"device": self.address}
        if self._failure is None:
            logger.warning("%s: %s, reported as %s", self.address, reason, state.value,
                           extra=fields)
        else:
            logger.debug("%s: still %s: %s", self.address, state.value, reason,
                         extra=fields)
        self._failure = state
        return Poll(self.device, time_ms, state)


Poller = UnitPoller | ProfilePoller


async def read_register_map(
    endpoint: Endpoint, unit: int, register_map: RegisterMap, address: str,
    plan: Sequence[ProfileRead] | None = None,
) -> tuple[dict[str, float | None], list[Channel], list[ProfileRead]]:
    """Read and decode every register of a register map.

    Returns values by channel, the channels, and the reads that were answered, which
    make the `plan` for the next poll. A read rejected with exception 2 is split
    between registers and tried again, as devices reject reads longer than they
    allow. A register that is still rejected has no value. Every other Modbus error
    propagates.
    """
    if plan is None:
        plan = register_map.plan(endpoint.settings.max_registers)
    words: dict[tuple[int, int], int] = {}
    done: list[ProfileRead] = []
    pending = list(plan)
    while pending:
        read = pending.pop(0)
        try:
            got = await endpoint.read(unit, read.address, read.count,
                                      function_code=read.function_code)
        except ModbusExceptionResponse as err:
            logger.debug("%s: profile %s: %s", address, register_map.name, err)
            if err.code == ILLEGAL_DATA_ADDRESS:
                pending[:0] = _split_profile_read(read, register_map)
            continue
        done.append(read)
        for offset, word in enumerate(got):
            words[read.function_code, read.address + offset] = word

    values: dict[str, float | None] = {}
    for register in register_map.registers:
        keys = [(register.function_code, register.address + i)
                for i in range(register.size)]
        register_words = [words.get(key) for key in keys]
        values[register.channel] = (
            None if None in register_words
            else register.decode(register_words)  # type: ignore[arg-type]
        )
    channels = [Channel(r.channel, r.unit) for r in register_map.registers]
    return values, channels, done


def _split_profile_read(read: ProfileRead, register_map: RegisterMap) -> list[ProfileRead]:
    """Split a read in two at the register start nearest its middle; [] if it cannot."""
    starts = sorted({
        r.address for r in register_map.registers
        if r.function_code == read.function_code
        and read.address < r.address < read.address + read.count
    })
    if not starts:
        return []
    middle = starts[len(starts) // 2]
    return [
        ProfileRead(read.function_code, read.address, middle - read.address),
        ProfileRead(read.function_code, middle, read.address + read.count - middle),
    ]


def tighten(settings: EndpointSettings, limits: Limits) -> EndpointSettings:
    """Return settings that meet both the endpoint's settings and a device's limits."""
    changes: dict[str, object] = {}
    if limits.max_registers is not None:
        changes["max_registers"] = min(settings.max_registers, limits.max_registers)
    if limits.request_gap is not None:
        changes["request_gap"] = max(settings.request_gap, limits.request_gap)
    if limits.connect_delay is not None:
        changes["connect_delay"] = max(settings.connect_delay, limits.connect_delay)
    if limits.close_after_poll:
        changes["close_after_poll"] = True
    return replace(settings, **changes)  # type: ignore[arg-type]


def skip_reads(reads: Sequence[Read], skip: Sequence[tuple[int, int]]) -> list[Read]:
    """Cut the addresses of `skip` ranges (first, last) out of planned reads."""
    skipped = {a for first, last in skip for a in range(first, last + 1)}
    if not skipped:
        return list(reads)
    kept: list[Read] = []
    for read in reads:
        start = None
        for address in range(read.address, read.address + read.count + 1):
            inside = address < read.address + read.count and address not in skipped
            if inside and start is None:
                start = address
            elif not inside and start is not None:
                kept.append(Read(start, address - start))
                start = None
    return kept


def _skipped(first: int, end: int, skip: Sequence[tuple[int, int]]) -> bool:
    """Tell whether any address in [first, end) lies in a skip range."""
    return any(low < end and first <= high for low, high in skip)


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


def _overlaps(read: Read, model: ModelRef) -> bool:
    return read.address < model.end and model.address < read.address + read.count


def _model_words(model: ModelRef, registers: dict[int, int]) -> list[int | None]:
    return list(map(registers.get, range(model.address, model.end)))


@dataclass(frozen=True, slots=True)
class _ChannelPlan:
    """The channels of one model's points, for one prefix and layout."""

    layout: ModelLayout  # kept, so that its id is not reused while the plan exists
    decoder: PointDecoder  # decodes the points that become channels
    keys: tuple[str, ...]  # channel names, in the order of `channels`
    channels: tuple[Channel, ...]  # a normalised PF channel follows its point's
    normalised: tuple[int, ...]  # where in `keys` a normalised PF channel is

    def decode(self, words: list[int | None], values: dict[str, float | None]) -> None:
        """Decode one model's words into `values`, by channel name."""
        decoded = self.decoder.decode(words)
        for index in self.normalised:
            decoded.insert(index, normalise_power_factor(decoded[index - 1]))
        values.update(zip(self.keys, decoded))  # type: ignore[arg-type]


def _decode_channels(
    prefix: str,
    model: ModelRef,
    words: list[int | None],
    values: dict[str, float | None],
    channels: list[Channel],
) -> ModelLayout | None:
    """Decode one model into `values` and `channels`; return its layout.

    Returns None, and decodes nothing, for the common model and unknown models.
    """
    layout = layout_model(model.model_id, model.length, words)
    if layout is None or model.model_id == COMMON_MODEL_ID:
        return None
    plan = _channel_plan(prefix, layout)
    plan.decode(words, values)
    channels.extend(plan.channels)
    return layout


# Channel plans by (prefix, id of the layout).
_CHANNEL_PLANS: dict[tuple[str, int], _ChannelPlan] = {}
_MAX_CHANNEL_PLANS = 1024


def _channel_plan(prefix: str, layout: ModelLayout) -> _ChannelPlan:
    """Return the plan that turns a model's points into channels.

    Layouts are cached, so the channels of a model are planned once, not every poll.
    Points of the types in NON_CHANNEL_TYPES, ID and L become no channel.
    """
    plan = _CHANNEL_PLANS.get((prefix, id(layout)))
    if plan is not None and plan.layout is layout:
        return plan
    names: list[str] = []
    channels: list[Channel] = []
    normalised: list[int] = []
    for point in layout.points:
        if point.type in NON_CHANNEL_TYPES or point.name in ("ID", "L"):
            continue
        names.append(point.name)
        channels.append(Channel(f"{prefix}.{point.name}", point.units))
        if point.units == "Pct" and point.name.split(".")[-1].startswith("PF"):
            normalised.append(len(channels))
            channels.append(Channel(f"{prefix}.{point.name}.normalised", None))
    plan = _ChannelPlan(layout, PointDecoder(layout, names),
                        tuple(channel.name for channel in channels), tuple(channels),
                        tuple(normalised))
    if len(_CHANNEL_PLANS) >= _MAX_CHANNEL_PLANS:
        _CHANNEL_PLANS.clear()
    _CHANNEL_PLANS[(prefix, id(layout))] = plan
    return plan


def _implausible(model: ModelRef, operating: _OperatingState,
                 words: list[int | None], state: object) -> bool:
    """Tell whether a frame is all zeros, scale factors included, with a fault state.

    Devices send such a frame now and then between good ones. Its zeros are no
    measurement, and an energy counter of 0 would look like a reset.
    """
    if state != operating.fault:
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


def _sleeping(operating: _OperatingState, state: object, alarm: object) -> bool:
    return state in operating.sleeping and not alarm


Sink = Callable[[Poll], Awaitable[None]]

# NOTE: an estimate. Discovery walks the model chain with one request per model and
# a poll reads each model range; 40 requests cover the largest SunSpec maps seen.
REQUESTS_PER_UNIT = 40


class RoundMonitor(Protocol):
    """Receives the result of every unit's poll and the end of every round."""

    def polled(self, address: str, polls: Sequence[Poll], error: str | None) -> None:
        """Record a unit's polls; `error` is why the poll failed, None on success."""

    def round_finished(self, next_round_in: float) -> None:
        """Record the end of a round; the next starts in `next_round_in` seconds."""


def round_limit(settings: EndpointSettings, unit_count: int) -> float:
    """Return the seconds a round over `unit_count` units takes at most (estimate).

    Each request waits at most the timeout, the request gap and the retries while a
    device is busy. Each unit may also need a new connection and its connect delay.
    """
    request = settings.timeout + settings.request_gap + BUSY_RETRIES * BUSY_WAIT
    per_unit = REQUESTS_PER_UNIT * request + settings.timeout + settings.connect_delay
    return unit_count * per_unit


class DeviceIds:
    """The serials used as device ids by the pollers of one agent.

    Two units that report the same serial would become one device at the collector,
    whose values flap between the two. So the first unit to claim a serial keeps it,
    and a later one falls back to its address as device id.
    """

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}  # serial -> address of the unit using it
        self._warned: set[tuple[str, str]] = set()

    def claim(self, serial: str, address: str) -> bool:
        """Tell whether the unit at `address` may use `serial` as its device id."""
        owner = self._owners.setdefault(serial, address)
        if owner == address:
            return True
        if (serial, address) not in self._warned:
            logger.warning("%s: serial %s is already used by %s; using %s as this "
                           "device's id", address, serial, owner, address,
                           extra={"device": address})
            self._warned.add((serial, address))
        return False


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
    profiles: Mapping[int, RegisterMap] | None = None,
    quirks: Sequence[Quirk] | None = None,
    monitor: RoundMonitor | None = None,
    device_ids: DeviceIds | None = None,
) -> None:
    """Poll every unit of one endpoint in turn every `poll_interval` seconds.

    `profiles` maps unit ids to register map profiles; other units are SunSpec
    devices, read with the matching `quirks` (default: the built-in ones).
    Each Poll goes to `await sink(poll)`, and each unit's result and the end of each
    round to `monitor`. The loop never ends on an error: it logs it and goes on with
    the next unit. It returns soon after `stop` is set. `device_ids`, shared by all
    endpoints of an agent, keeps two units from using the same serial.
    """
    endpoint = endpoint_factory(settings)
    device_ids = DeviceIds() if device_ids is None else device_ids
    pollers = [
        make_poller(endpoint, unit, (profiles or {}).get(unit), quirks=quirks,
                    name=name, device_ids=device_ids)
        for unit in unit_ids
    ]
    logger.info("polling %s units %s every %.1f s", settings.label,
                list(unit_ids), poll_interval)
    due = clock()
    try:
        while not stop.is_set():
            await _poll_round(endpoint, pollers, sink, stop, monitor)
            due = max(due + poll_interval, clock())
            if monitor is not None:
                monitor.round_finished(due - clock())
            await _wait(stop, due - clock())
    finally:
        await _close(endpoint)
        logger.info("stopped polling %s", settings.label)


def make_poller(endpoint: Endpoint, unit: int, profile: RegisterMap | None, *,
                quirks: Sequence[Quirk] | None = None, name: str = "",
                device_ids: DeviceIds | None = None) -> Poller:
    """Build the poller for one unit: SunSpec, SunSpec with extra registers, or profile."""
    label = endpoint.settings.label
    if profile is not None and not profile.sunspec:
        return ProfilePoller(endpoint, unit, profile, address_label=label, name=name)
    return UnitPoller(endpoint, unit, address_label=label, name=name, quirks=quirks,
                      extra=profile, device_ids=device_ids)


async def _poll_round(endpoint: Endpoint, pollers: Sequence[Poller], sink: Sink,
                      stop: asyncio.Event, monitor: RoundMonitor | None) -> None:
    for poller in pollers:
        if stop.is_set():
            return
        try:
            polls = await poller.poll_devices()
        except Exception as err:
            logger.exception("%s: poll failed unexpectedly", poller.address)
            if monitor is not None:
                monitor.polled(poller.address, [], f"poll failed unexpectedly: {err!r}")
            continue
        if monitor is not None:
            monitor.polled(poller.address, polls, poller.last_error)
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
