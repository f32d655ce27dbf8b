"""SunSpec maps: lay out models from pysunspec2's definitions, find and walk the chain.

A SunSpec device stores "SunS" at a base address (40000, 0 or 50000), then a chain of
models, each an ID register, a length register L and L registers of body, ended by the
ID 0xFFFF. Real devices break this in known ways: a common model of 65 registers, no end
marker, vendor models with no public definition, headers that cannot be read together
with their body, gateways that return exception 11 for absent units. Discovery follows the
chain by each model's declared length and reads with small requests where a larger one is
rejected.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from edge_agent.decode import decode_model, decode_raw
from edge_agent.endpoint import EndpointSettings
from edge_agent.errors import AgentError
from edge_agent.transport import ModbusExceptionResponse, ModbusTimeout

logger = logging.getLogger(__name__)

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID = 0xFFFF
COMMON_MODEL_ID = 1
COMMON_MODEL_LENGTHS = (65, 66)  # 66 with the Pad register, 65 without
DEFAULT_BASES = (40000, 0, 50000)
ILLEGAL_DATA_ADDRESS = 2
SERVER_DEVICE_FAILURE = 4  # the device failed to perform the read it accepted
# Exception codes a gateway returns for a unit id with no device behind it.
GATEWAY_NO_DEVICE = (10, 11)
_TYPE_SIZES = {
    "int16": 1, "uint16": 1, "count": 1, "acc16": 1, "enum16": 1, "bitfield16": 1,
    "pad": 1, "sunssf": 1, "int32": 2, "uint32": 2, "acc32": 2, "enum32": 2,
    "bitfield32": 2, "ipaddr": 2, "float32": 2, "int64": 4, "uint64": 4, "acc64": 4,
    "float64": 4, "eui48": 4, "ipv6addr": 8,
}  # fmt: skip


class NotSunSpec(AgentError):
    """The unit responds, but has no SunS marker at any base address."""


class MalformedMap(AgentError):
    """The SunS marker is there, but the model chain cannot be followed."""


class NoDevice(AgentError):
    """A gateway reports that no device is connected on this unit id."""


class Endpoint(Protocol):
    """The Modbus transport interface that discovery and polling use."""

    settings: EndpointSettings

    async def read(
        self, unit: int, address: int, count: int, function_code: int | None = None
    ) -> list[int]: ...

    async def end_poll(self) -> None: ...


# --- model layouts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointLayout:
    """One point of a model instance, at its offset from the model's ID register."""

    name: str  # "W", or "module[2].DCW" inside a repeating group
    offset: int
    type: str
    size: int  # registers
    units: str | None = None
    sf: str | int | None = None  # name of the scale-factor point, or a fixed exponent


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """The points of one model at one declared length."""

    model_id: int
    length: int
    points: tuple[PointLayout, ...]

    def point(self, name: str) -> PointLayout | None:
        """Return the point called `name`, or None."""
        return next((p for p in self.points if p.name == name), None)

    def boundaries(self) -> set[int]:
        """Return the offsets where a read of this model may start or end."""
        offsets = {point.offset for point in self.points}
        offsets.add(self.length + 2)
        return offsets


# Float models carry the points of the integer model 10 below in the same order, but
# pysunspec2 1.3.7 spells some names differently (213 "PPVphAB", 203 "PhVphAB").
# Channels of both families use the integer model's names.
_FLOAT_FAMILY = (111, 112, 113, 211, 212, 213, 214)


@functools.cache
def _integer_names(model_id: int) -> dict[str, str]:
    """Map a float model's point names to the integer model's names, by position."""
    if model_id not in _FLOAT_FAMILY:
        return {}
    float_names = _measurement_names(model_definition(model_id))
    integer_names = _measurement_names(model_definition(model_id - 10))
    if len(float_names) != len(integer_names):
        return {}
    return dict(zip(float_names, integer_names))


def _measurement_names(definition: dict[str, Any] | None) -> list[str]:
    if definition is None:
        return []
    points = definition["group"]["points"]
    return [p["name"] for p in points if p["type"] != "sunssf"]


class _CountsNeeded(Exception):
    """A group's repeat count is a point value, and that value is not known yet."""


@functools.cache
def model_definition(model_id: int) -> dict[str, Any] | None:
    """Load pysunspec2's definition of a model, or None where it has none.

    Every poll lays out its models, so each definition is read once and kept. Callers
    must not change the returned dict.
    """
    path = resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def layout_model(
    model_id: int, length: int, words: Sequence[int | None] | None = None
) -> ModelLayout | None:
    """Lay out a model of declared length `length`, or return None if it is unknown.

    Repeating groups take their count from the length (model 160 with L = 8 + 20 N has
    N modules). A group nested in a repeating group whose count is a point value (the
    curve points of models 705-712) needs `words`, the model's words from its ID. Without
    them the layout has the fixed points only.
    """
    known = _LAYOUTS.get((model_id, length), _NOT_CACHED)
    if known is not _NOT_CACHED:
        return known  # type: ignore[return-value]
    if model_definition(model_id) is None or not _needs_counts(model_id, length):
        return _keep(_LAYOUTS, (model_id, length), _fixed_layout(model_id, length))
    if words is None:
        return _cached_layout(model_id, length, None)

    # Every poll lays out its models, so layouts are kept by the words of their counts.
    count_points = _count_points(model_id, length)
    key = (model_id, length,
           tuple(tuple(words[p.offset : p.offset + p.size]) for p in count_points))
    layout = _COUNTED_LAYOUTS.get(key)
    if layout is None:
        layout = _layout_by_counts(model_id, length, count_points, words)
        _keep(_COUNTED_LAYOUTS, key, layout)
    return layout


# Layouts that depend on no words, by (model id, length), with None for an unknown
# model. Layouts of models with count points are kept by the words of those points.
_LAYOUTS: dict[tuple[int, int], ModelLayout | None] = {}
_COUNTED_LAYOUTS: dict[tuple[Any, ...], ModelLayout] = {}
_NOT_CACHED = object()
_MAX_LAYOUTS = 1024


def _keep(
    cache: dict[Any, Any], key: Any, layout: ModelLayout | None
) -> ModelLayout | None:
    if len(cache) >= _MAX_LAYOUTS:
        cache.clear()
    cache[key] = layout
    return layout


def _fixed_layout(model_id: int, length: int) -> ModelLayout | None:
    if model_definition(model_id) is None:
        return None
    return _cached_layout(model_id, length, ())


@functools.lru_cache(maxsize=512)
def _count_points(model_id: int, length: int) -> tuple[PointLayout, ...]:
    """Return the fixed points of a model that count its nested groups."""
    names = _count_point_names(model_id)
    fixed = _cached_layout(model_id, length, None)
    return tuple(point for point in fixed.points if point.name in names)


def _layout_by_counts(
    model_id: int, length: int, count_points: tuple[PointLayout, ...],
    words: Sequence[int | None],
) -> ModelLayout:
    counts = []
    for point in count_points:
        point_words = words[point.offset : point.offset + point.size]
        if None not in point_words:
            value = decode_raw(point.type, point_words)  # type: ignore[arg-type]
            if isinstance(value, int):
                counts.append((point.name, value))
    try:
        return _cached_layout(model_id, length, tuple(counts))
    except _CountsNeeded:
        return _cached_layout(model_id, length, None)


@functools.lru_cache(maxsize=512)
def _needs_counts(model_id: int, length: int) -> bool:
    """Tell whether the model's layout depends on count points in its words."""
    try:
        _cached_layout(model_id, length, ())
    except _CountsNeeded:
        return True
    return False


@functools.lru_cache(maxsize=512)
def _cached_layout(
    model_id: int, length: int, counts: tuple[tuple[str, Any], ...] | None
) -> ModelLayout:
    definition = model_definition(model_id)
    assert definition is not None
    builder = _LayoutBuilder(model_id, length, None if counts is None else dict(counts))
    builder.add_group(definition["group"], prefix="", scope={}, top=True)
    return ModelLayout(model_id, length, tuple(builder.points))


class _LayoutBuilder:
    """Walk a definition's groups in register order, collecting points that fit."""

    def __init__(self, model_id: int, length: int, counts: dict[str, Any] | None):
        self.aliases = _integer_names(model_id)
        self.end = length + 2
        self.counts: dict[str, Any] = counts if counts is not None else {}
        self.fixed_only = counts is None
        self.offset = 0
        self.points: list[PointLayout] = []

    def add_group(self, group: dict, prefix: str, scope: dict, top: bool) -> None:
        names = {
            p["name"]: prefix + self.aliases.get(p["name"], p["name"])
            for p in group.get("points", [])
        }
        scope = {**scope, **names}
        for point in group.get("points", []):
            self._add_point(point, prefix, scope)
        if self.fixed_only:
            return  # fixed points only: they all come before the first group
        for sub in group.get("groups", []):
            count = self._repeat_count(sub, top)
            for index in range(1, count + 1):
                label = f"{sub['name']}[{index}]" if _repeats(sub) else sub["name"]
                self.add_group(sub, f"{prefix}{label}.", scope, top=False)

    def _add_point(self, point: dict, prefix: str, scope: dict) -> None:
        size = _point_size(point)
        if self.offset + size <= self.end:
            sf = point.get("sf")
            if isinstance(sf, str):
                sf = scope.get(sf, sf)
            self.points.append(
                PointLayout(
                    name=scope[point["name"]],
                    offset=self.offset,
                    type=point["type"],
                    size=size,
                    units=point.get("units"),
                    sf=sf,
                )
            )
        self.offset += size

    def _repeat_count(self, group: dict, top: bool) -> int:
        count = group.get("count")
        if count is None:
            return 1
        if isinstance(count, int) and count > 0:
            return count
        if isinstance(count, str) and count in self.counts:
            return int(self.counts[count])
        if not top:
            raise _CountsNeeded
        # A top-level repeating group fills the rest of the model.
        size = _group_size(group, self.counts)
        return max(0, (self.end - self.offset) // size) if size else 0


def _repeats(group: dict) -> bool:
    return group.get("count") is not None


def _point_size(point: dict) -> int:
    if point["type"] == "string":
        return int(point["size"])
    return _TYPE_SIZES[point["type"]]


@functools.cache
def _count_point_names(model_id: int) -> frozenset[str]:
    """Return the names of the points that count a model's nested groups."""
    definition = model_definition(model_id)
    assert definition is not None
    return frozenset(_count_names(definition["group"]))


def _count_names(group: dict) -> set[str]:
    names = set()
    for sub in group.get("groups", []):
        if isinstance(sub.get("count"), str):
            names.add(sub["count"])
        names |= _count_names(sub)
    return names


def _group_size(group: dict, counts: dict[str, Any]) -> int:
    size = sum(_point_size(point) for point in group.get("points", []))
    for sub in group.get("groups", []):
        count = sub.get("count")
        if count is None:
            count = 1
        elif isinstance(count, str):
            if count not in counts:
                raise _CountsNeeded
            count = int(counts[count])
        elif count == 0:
            raise _CountsNeeded
        size += count * _group_size(sub, counts)
    return size


# --- the device map ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One model found in the chain."""

    model_id: int
    address: int  # of its ID register
    length: int  # L: registers after the ID and L registers

    @property
    def end(self) -> int:
        """First address after the model."""
        return self.address + 2 + self.length


@dataclass(frozen=True, slots=True)
class Identity:
    """A device's identity from its common model (model 1)."""

    manufacturer: str | None = None
    model: str | None = None
    options: str | None = None
    version: str | None = None
    serial: str | None = None  # None where the serial cannot serve as an identity


@dataclass(frozen=True, slots=True)
class MappedDevice:
    """One common model and the models after it, up to the next common model."""

    at: int  # address of the common model's ID register
    identity: Identity
    models: tuple[ModelRef, ...]


@dataclass(frozen=True, slots=True)
class DeviceMap:
    """Everything discovery found on one unit id."""

    unit: int
    base: int
    devices: tuple[MappedDevice, ...]
    # (first, last) address ranges that reject multi-register reads but return
    # one register at a time.
    fragile: tuple[tuple[int, int], ...] = ()
    problems: tuple[str, ...] = ()  # why the chain ended early, where it did

    @property
    def models(self) -> tuple[ModelRef, ...]:
        """Every model of every device, in address order."""
        return tuple(m for device in self.devices for m in device.models)


def identity_from_common(words: Sequence[int | None]) -> Identity:
    """Build an Identity from a common model's words, starting at its ID register."""
    length = words[1] if len(words) > 1 and words[1] is not None else len(words) - 2
    layout = layout_model(COMMON_MODEL_ID, min(length, len(words) - 2))
    assert layout is not None
    values = decode_model(layout, words)
    return Identity(
        manufacturer=_text(values.get("Mn")),
        model=_text(values.get("Md")),
        options=_text(values.get("Opt")),
        version=_text(values.get("Vr")),
        serial=usable_serial(_text(values.get("SN"))),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def usable_serial(serial: str | None) -> str | None:
    """Return the serial if it can identify a device: printable ASCII, not empty."""
    if not serial:
        return None
    if any(not (0x20 <= ord(char) < 0x7F) for char in serial):
        return None
    return serial


# --- reading ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """One read request: `count` registers from `address`."""

    address: int
    count: int


def plan_reads(
    models: Iterable[ModelRef],
    max_registers: int,
    fragile: Iterable[tuple[int, int]] = (),
) -> list[Read]:
    """Plan the fewest reads that cover the models with a known layout.

    Adjacent models share a read up to `max_registers`. A larger model is cut on point
    boundaries, so no multi-register point is split over two requests. Registers in a
    fragile range are read one at a time.
    """
    models = list(models)
    spans = _merge_spans(m for m in models if model_definition(m.model_id))
    cuts = cut_addresses(models)
    singles = {a for first, last in fragile for a in range(first, last + 1)}
    # NOTE: a model longer than `max_registers` (model 160 with 12 modules at 50) spans
    # several requests. Values in a later request are then scaled with factors read
    # moments earlier in the same poll, so a factor changing in between goes unnoticed.
    reads: list[Read] = []
    for start, end in spans:
        reads.extend(_cut_span(start, end, max_registers, cuts, singles))
    return reads


def _merge_spans(models: Iterable[ModelRef]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for model in sorted(models, key=lambda m: m.address):
        if spans and spans[-1][1] == model.address:
            spans[-1] = (spans[-1][0], model.end)
        else:
            spans.append((model.address, model.end))
    return spans


def cut_addresses(models: Iterable[ModelRef]) -> set[int]:
    """Return the addresses where a read may start or end without splitting a point.

    Inside a model without a usable layout every address is allowed.
    """
    cuts: set[int] = set()
    for model in models:
        layout = layout_model(model.model_id, model.length)
        if layout is None or layout.boundaries() == {model.length + 2}:
            cuts.update(range(model.address, model.end + 1))
            continue
        cuts.update(model.address + offset for offset in layout.boundaries())
        last = max(p.offset + p.size for p in layout.points)
        # Registers past the last laid-out point (unknown counts) may be cut anywhere.
        cuts.update(range(model.address + last, model.end + 1))
    return cuts


def _cut_span(
    start: int, end: int, max_registers: int, cuts: set[int], singles: set[int]
) -> list[Read]:
    reads = []
    address = start
    while address < end:
        if address in singles:
            reads.append(Read(address, 1))
            address += 1
            continue
        limit = min(end, address + max_registers)
        stop = next((a for a in range(address + 1, limit + 1) if a in singles), limit)
        if stop == limit and limit < end:
            stop = max((a for a in cuts if address < a <= limit), default=limit)
        reads.append(Read(address, stop - address))
        address = stop
    return reads


async def read_registers(
    endpoint: Endpoint,
    unit: int,
    reads: Sequence[Read],
    cuts: set[int],
    model_starts: Collection[int] | None = None,
) -> tuple[dict[int, int], list[Read]]:
    """Perform the reads, splitting any rejected with exception 2 on point boundaries.

    Returns the registers read, by address, and the reads that worked, which make the
    plan for the next poll. A single point that is still rejected is left out.

    With `model_starts`, a read that fails with exception 4 is split at the model
    starts inside it, and a failing read within one model stays in the plan with its
    registers missing from the result, so it is tried again next poll. Every other
    Modbus error propagates, and so does exception 4 without `model_starts`.
    """
    registers: dict[int, int] = {}
    done: list[Read] = []
    pending = list(reads)
    while pending:
        read = pending.pop(0)
        try:
            words = await endpoint.read(unit, read.address, read.count)
        except ModbusExceptionResponse as err:
            if err.code == ILLEGAL_DATA_ADDRESS:
                pending[:0] = _split(read, cuts)
            elif err.code == SERVER_DEVICE_FAILURE and model_starts is not None:
                pieces = _split(read, set(model_starts))
                pending[:0] = pieces
                if not pieces:
                    done.append(read)
            else:
                raise
            logger.debug("unit %d: %d registers at %d failed (%s), next reads %s",
                         unit, read.count, read.address, err, pending[:2])
            continue
        registers.update(zip(range(read.address, read.address + read.count), words))
        done.append(read)
    return registers, done


def _split(read: Read, cuts: set[int]) -> list[Read]:
    inside = sorted(a for a in cuts if read.address < a < read.address + read.count)
    if not inside:
        return []
    middle = inside[len(inside) // 2]
    return [
        Read(read.address, middle - read.address),
        Read(middle, read.address + read.count - middle),
    ]


# --- discovery --------------------------------------------------------------------


async def discover(
    endpoint: Endpoint, unit: int, bases: Sequence[int] = DEFAULT_BASES
) -> DeviceMap:
    """Find the SunS marker on `unit` and walk its model chain.

    :raises NoDevice: a gateway returned exception 10 or 11 for this unit.
    :raises NotSunSpec: the unit responds, but no base address has SunS.
    :raises MalformedMap: SunS is there, but no model chain follows it.
    :raises ModbusError: the unit did not respond, or the connection failed.
    """
    base = await _find_base(endpoint, unit, bases)
    walker = _ChainWalker(endpoint, unit, base)
    await walker.walk()
    logger.debug("%s unit %d: SunS at %d, models %s", endpoint.settings.label, unit,
                 base, [m.model_id for m in walker.models])
    return walker.device_map()


async def _find_base(endpoint: Endpoint, unit: int, bases: Sequence[int]) -> int:
    where = f"{endpoint.settings.label} unit {unit}"
    timeout: ModbusTimeout | None = None
    answered = False
    for base in bases:
        try:
            words = await endpoint.read(unit, base, 2)
        except ModbusExceptionResponse as err:
            if err.code in GATEWAY_NO_DEVICE:
                raise NoDevice(
                    f"{where}: the gateway returned exception {err.code}, so no device "
                    "is connected on this unit id; check the unit id"
                ) from err
            answered = True
            continue
        except ModbusTimeout as err:
            timeout = err
            continue
        if tuple(words) == SUNS_MARKER:
            return base
        answered = True

    if timeout is not None and not answered:
        raise timeout
    listed = ", ".join(str(b) for b in bases)
    raise NotSunSpec(
        f"{where}: no SunS marker at {listed}; the device does not speak SunSpec, "
        "so it needs a device profile"
    )


class _ChainWalker:
    """Follow the model chain from a base, one header at a time."""

    def __init__(self, endpoint: Endpoint, unit: int, base: int):
        self.endpoint = endpoint
        self.unit = unit
        self.base = base
        self.where = f"{endpoint.settings.label} unit {unit}"
        self.models: list[ModelRef] = []
        self.devices: list[tuple[int, Identity, list[ModelRef]]] = []
        self.fragile: list[tuple[int, int]] = []
        self.problems: list[str] = []

    async def walk(self) -> None:
        address = self.base + 2
        while True:
            if address + 2 > 0x10000:
                self._stop(address, "the chain reaches the last register")
                return
            header = await self._read_header(address)
            if not await self._accept(address, header):
                return
            address += 2 + header[1]  # type: ignore[index]

    async def _accept(self, address: int, header: tuple[int, int] | None) -> bool:
        """Record the model at `address`; return False where the chain ends."""
        if header is None or header[0] in (END_MODEL_ID, 0):
            if not self.models:
                raise self._malformed(address, "no model follows the SunS marker")
            return False
        model_id, length = header
        if address + 2 + length > 0x10000:
            return self._stop(address, f"model {model_id} declares L={length}, past "
                              "the last register")
        if model_id == COMMON_MODEL_ID:
            await self._start_device(address, length)
        elif not self.devices:
            raise self._malformed(address, f"the first model is {model_id}, not the "
                                  "common model 1")
        model = ModelRef(model_id, address, length)
        self.models.append(model)
        self.devices[-1][2].append(model)
        return True

    def _stop(self, address: int, reason: str) -> bool:
        if not self.models:
            raise self._malformed(address, reason)
        problem = f"{self.where}: chain ends at {address} because {reason}"
        logger.warning("%s; keeping the %d models before it", problem, len(self.models))
        self.problems.append(problem)
        return False

    def _malformed(self, address: int, reason: str) -> MalformedMap:
        return MalformedMap(
            f"{self.where}: SunSpec map at {self.base} is malformed at register "
            f"{address}: {reason}; check the device's Modbus settings"
        )

    async def _start_device(self, address: int, length: int) -> None:
        if length not in COMMON_MODEL_LENGTHS:
            raise self._malformed(address, f"common model length is {length}, "
                                  "expected 65 or 66")
        reads = plan_reads([ModelRef(1, address, length)],
                           self.endpoint.settings.max_registers, self.fragile)
        cuts = cut_addresses([ModelRef(1, address, length)])
        registers, _ = await read_registers(self.endpoint, self.unit, reads, cuts)
        words = [registers.get(a) for a in range(address, address + 2 + length)]
        words[0:2] = [COMMON_MODEL_ID, length]
        self.devices.append((address, identity_from_common(words), []))

    async def _read_header(self, address: int) -> tuple[int, int] | None:
        """Read a model's ID and L, or return None where the device rejects the read."""
        try:
            model_id, length = await self.endpoint.read(self.unit, address, 2)
            return model_id, length
        except ModbusExceptionResponse as err:
            if err.code != ILLEGAL_DATA_ADDRESS:
                raise
        # Some devices reject a two-register header read but return each register alone.
        try:
            (model_id,) = await self.endpoint.read(self.unit, address, 1)
            (length,) = await self.endpoint.read(self.unit, address + 1, 1)
        except ModbusExceptionResponse as err:
            if err.code != ILLEGAL_DATA_ADDRESS:
                raise
            return None
        self.fragile.append((address, address + 1))
        return model_id, length

    def device_map(self) -> DeviceMap:
        devices = tuple(
            MappedDevice(at, identity, tuple(models))
            for at, identity, models in self.devices
        )
        return DeviceMap(self.unit, self.base, devices, tuple(self.fragile),
                         tuple(self.problems))
