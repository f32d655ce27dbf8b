"""Device images: the registers a simulated site serves, loaded from JSON files.

Two file formats are read:

- raw register images (``"format": 1``): link behaviour, devices with holding and
  input words at 0-based protocol addresses, and optional steps that patch registers
  between polls;
- pysunspec2 device JSON (``{"name": ..., "models": [...]}``): point values per model,
  laid out as a SunSpec map at 40000 with pysunspec2's own model definitions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import sunspec2.device
import sunspec2.mdef

from edge_agent.errors import AgentError

Table = Literal["holding", "input"]

TABLES: dict[int, Table] = {3: "holding", 4: "input"}
SUNSPEC_BASE = 40000
SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MARKER = (0xFFFF, 0x0000)
MAX_UNIT = 247  # highest addressable Modbus unit id
EXCEPTION_CODES = (1, 2, 3, 4, 5, 6, 8, 10, 11)  # codes the Modbus protocol defines

_HEX_WORD = re.compile(r"[0-9a-fA-F]{1,4}")


class ImageError(AgentError):
    """A device image file is invalid; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class LinkBehaviour:
    """How the Modbus server of a site responds, whatever the unit."""

    max_registers_per_read: int = 125  # larger reads get exception 2
    ignore_requests_within_ms_of_connect: int = 0  # such requests get no response
    min_gap_ms: int = 0  # a request sooner after the last reply gets exception 6
    max_clients: int = 0  # 0: any number of TCP clients at once
    absent_units: Literal["exception-11", "timeout"] = "exception-11"


@dataclass(frozen=True, slots=True)
class RegisterBlock:
    """Consecutive register words starting at a 0-based protocol address."""

    address: int
    words: tuple[int, ...]

    @property
    def end(self) -> int:
        """Address just past the last word."""
        return self.address + len(self.words)


@dataclass(frozen=True, slots=True)
class ExceptionRange:
    """Exception `code` for reads of min_count+ registers overlapping [first, last]."""

    first: int
    last: int
    code: int = 2
    min_count: int = 1

    def matches(self, address: int, count: int) -> bool:
        """Tell whether a read of `count` registers at `address` gets this exception."""
        overlaps = address <= self.last and address + count - 1 >= self.first
        return overlaps and count >= self.min_count


@dataclass(frozen=True, slots=True)
class DeviceImage:
    """Registers and quirks of the device behind one unit id."""

    unit: int
    holding: tuple[RegisterBlock, ...] = ()
    input: tuple[RegisterBlock, ...] = ()
    unmapped: Literal["exception-2", "timeout"] = "exception-2"
    exceptions: tuple[ExceptionRange, ...] = ()

    def blocks(self, table: Table) -> tuple[RegisterBlock, ...]:
        """Return the blocks of the holding or the input table."""
        return self.holding if table == "holding" else self.input

    def is_mapped(self, table: Table, address: int, count: int) -> bool:
        """Tell whether every address of the read lies in one of the table's blocks."""
        addresses = set(range(address, address + count))
        for block in self.blocks(table):
            addresses -= set(range(block.address, block.end))
        return not addresses

    def exception_for(self, address: int, count: int) -> int | None:
        """Return the exception code an exception range gives the read, or None."""
        for exception in self.exceptions:
            if exception.matches(address, count):
                return exception.code
        return None

    def read(self, table: Table, address: int, count: int) -> list[int]:
        """Return `count` words from `address`; raise ImageError where unmapped."""
        words = _words_by_address(self.blocks(table))
        missing = [a for a in range(address, address + count) if a not in words]
        if missing:
            raise ImageError(
                f"unit {self.unit}: {table} register {missing[0]} is not in the image"
            )
        return [words[a] for a in range(address, address + count)]

    def patched(self, step: Step) -> DeviceImage:
        """Return a copy with the step's words written over the registers."""
        holding = _patch_blocks(self.holding, step.holding)
        input_ = _patch_blocks(self.input, step.input)
        return replace(self, holding=holding, input=input_)


@dataclass(frozen=True, slots=True)
class Step:
    """Register patches applied to one unit before one poll; `silent`: no responses."""

    unit: int
    holding: tuple[RegisterBlock, ...] = ()
    input: tuple[RegisterBlock, ...] = ()
    silent: bool = False

    def blocks(self, table: Table) -> tuple[RegisterBlock, ...]:
        """Return the patches of the holding or the input table."""
        return self.holding if table == "holding" else self.input


@dataclass(frozen=True, slots=True)
class SiteImage:
    """Everything a simulated site serves: devices by unit id, link quirks, steps."""

    name: str
    devices: tuple[DeviceImage, ...]
    link: LinkBehaviour = LinkBehaviour()
    steps: tuple[Step, ...] = ()

    @property
    def units(self) -> tuple[int, ...]:
        """Unit ids of the devices, in file order."""
        return tuple(device.unit for device in self.devices)

    def device(self, unit: int) -> DeviceImage:
        """Return the device image of `unit`; raise ImageError where there is none."""
        for device in self.devices:
            if device.unit == unit:
                return device
        raise ImageError(f"{self.name}: no device with unit id {unit}")

    def at_step(self, index: int) -> SiteImage:
        """Return the image as served while step `index` is current (0-based)."""
        if not 0 <= index < len(self.steps):
            raise ImageError(
                f"{self.name}: no step {index}; the image has {len(self.steps)} steps"
            )
        devices = self.devices
        for step in self.steps[: index + 1]:
            devices = tuple(
                d.patched(step) if d.unit == step.unit else d for d in devices
            )
        return replace(self, devices=devices)


def load_image(path: str | Path, unit: int | None = None) -> SiteImage:
    """Load a raw register image or a pysunspec2 device JSON file.

    `unit` is the unit id of a pysunspec2 device (default 1). For a raw register image
    with one device, `unit` replaces the device's unit id and the unit id of its steps.

    :raises ImageError: the file cannot be read or is not a valid image.
    """
    path = Path(path)
    document = _read_document(path)
    if "format" in document:
        image = _parse_register_image(path, document)
        return _with_unit(path, image, unit) if unit is not None else image
    if "models" in document:
        return _parse_sunspec_device(path, document, 1 if unit is None else unit)
    raise ImageError(
        f"{path}: unknown image format; expected \"format\": 1 (register image) "
        "or \"models\" (pysunspec2 device JSON)"
    )


def load_images(paths: list[Path]) -> list[SiteImage]:
    """Load images to serve on one port, giving pysunspec2 devices unit ids in order.

    Register images keep their unit ids, and the Nth pysunspec2 device file in `paths`
    gets unit id N.
    """
    images = []
    sunspec_devices = 0
    for path in paths:
        unit = None
        if "models" in _read_document(path):
            sunspec_devices += 1
            unit = sunspec_devices
        images.append(load_image(path, unit))
    return images


def merge_images(images: list[SiteImage]) -> SiteImage:
    """Combine site images into one served on one port, keeping each unit id.

    :raises ImageError: two images use one unit id, set different link behaviour,
        or more than one has steps.
    """
    owners: dict[int, str] = {}
    for image in images:
        for unit in image.units:
            if unit in owners:
                raise ImageError(
                    f"unit id {unit} is used by both {owners[unit]} and {image.name}; "
                    "serve them on separate ports"
                )
            owners[unit] = image.name
    links = {image.link for image in images}
    if len(links) > 1:
        names = ", ".join(image.name for image in images)
        raise ImageError(
            f"images {names} set different link behaviour; serve them on separate ports"
        )
    stepped = [image for image in images if image.steps]
    if len(stepped) > 1:
        raise ImageError(
            f"images {stepped[0].name} and {stepped[1].name} both have steps; "
            "serve them on separate ports"
        )
    return SiteImage(
        name="+".join(image.name for image in images),
        devices=tuple(device for image in images for device in image.devices),
        link=images[0].link,
        steps=stepped[0].steps if stepped else (),
    )


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ImageError(f"{path}: cannot read image file: {err.strerror}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ImageError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise ImageError(f"{path}: expected a JSON object at the top level")
    return document


# Raw register images (format 1)


def _parse_register_image(path: Path, document: dict[str, Any]) -> SiteImage:
    """Build a SiteImage from a format 1 document, checking every field."""
    if document["format"] != 1:
        raise ImageError(
            f"{path}: format {document['format']!r} is not supported; expected 1"
        )
    link = _parse_link(path, document.get("link", {}))
    raw_devices = _require_list(path, document, "devices", "devices")
    if not raw_devices:
        raise ImageError(f"{path}: devices: the image lists no device")
    devices = tuple(
        _parse_device(path, raw, f"devices[{i}]") for i, raw in enumerate(raw_devices)
    )
    _check_unique_units(path, devices)

    raw_steps = _require_list(path, document, "steps", "steps", default=[])
    steps = tuple(
        _parse_step(path, raw, f"steps[{i}]", devices)
        for i, raw in enumerate(raw_steps)
    )
    name = document.get("id") or path.stem
    return SiteImage(name=str(name), devices=devices, link=link, steps=steps)


def _parse_link(path: Path, raw: Any) -> LinkBehaviour:
    if not isinstance(raw, dict):
        raise ImageError(f"{path}: link: expected an object")
    fields = set(LinkBehaviour.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ImageError(f"{path}: link.{unknown[0]}: unknown setting")
    limits = {
        "max_registers_per_read": (1, 125),
        "ignore_requests_within_ms_of_connect": (0, 3_600_000),
        "min_gap_ms": (0, 3_600_000),
        "max_clients": (0, 1000),
    }
    for key, (low, high) in limits.items():
        if key in raw:
            _require_int(path, raw[key], f"link.{key}", low, high)
    if raw.get("absent_units", "exception-11") not in ("exception-11", "timeout"):
        raise ImageError(
            f"{path}: link.absent_units: {raw['absent_units']!r} is invalid; "
            "use \"exception-11\" or \"timeout\""
        )
    return LinkBehaviour(**raw)


def _parse_device(path: Path, raw: Any, where: str) -> DeviceImage:
    if not isinstance(raw, dict):
        raise ImageError(f"{path}: {where}: expected an object")
    unit = _require_int(path, raw.get("unit"), f"{where}.unit", 1, MAX_UNIT)
    holding = _parse_blocks(path, raw.get("holding", []), f"{where}.holding")
    input_ = _parse_blocks(path, raw.get("input", []), f"{where}.input")
    unmapped = raw.get("unmapped", "exception-2")
    if unmapped not in ("exception-2", "timeout"):
        raise ImageError(
            f"{path}: {where}.unmapped: {unmapped!r} is invalid; "
            "use \"exception-2\" or \"timeout\""
        )
    raw_exceptions = raw.get("exceptions", [])
    if not isinstance(raw_exceptions, list):
        raise ImageError(f"{path}: {where}.exceptions: expected a list")
    exceptions = tuple(
        _parse_exception(path, item, f"{where}.exceptions[{i}]")
        for i, item in enumerate(raw_exceptions)
    )
    return DeviceImage(unit, holding, input_, unmapped, exceptions)


def _parse_exception(path: Path, raw: Any, where: str) -> ExceptionRange:
    if not isinstance(raw, dict):
        raise ImageError(f"{path}: {where}: expected an object")
    first = _require_int(path, raw.get("first"), f"{where}.first", 0, 0xFFFF)
    last = _require_int(path, raw.get("last"), f"{where}.last", first, 0xFFFF)
    code = _require_int(path, raw.get("code", 2), f"{where}.code", 1, 11)
    if code not in EXCEPTION_CODES:
        raise ImageError(
            f"{path}: {where}.code: {code} is not a Modbus exception code; "
            f"use one of {', '.join(map(str, EXCEPTION_CODES))}"
        )
    min_count = _require_int(
        path, raw.get("min_count", 1), f"{where}.min_count", 1, 125
    )
    return ExceptionRange(first, last, code, min_count)


def _parse_step(
    path: Path, raw: Any, where: str, devices: tuple[DeviceImage, ...]
) -> Step:
    if not isinstance(raw, dict):
        raise ImageError(f"{path}: {where}: expected an object")
    if "unit" in raw:
        unit = _require_int(path, raw["unit"], f"{where}.unit", 1, MAX_UNIT)
    elif len(devices) == 1:
        unit = devices[0].unit
    else:
        raise ImageError(
            f"{path}: {where}.unit: missing; the image has several devices"
        )
    device = next((d for d in devices if d.unit == unit), None)
    if device is None:
        raise ImageError(f"{path}: {where}.unit: no device has unit id {unit}")

    step = Step(
        unit=unit,
        holding=_parse_blocks(path, raw.get("holding", []), f"{where}.holding"),
        input=_parse_blocks(path, raw.get("input", []), f"{where}.input"),
        silent=_require_bool(path, raw.get("silent", False), f"{where}.silent"),
    )
    for table in ("holding", "input"):
        for block in step.blocks(table):
            if not device.is_mapped(table, block.address, len(block.words)):
                raise ImageError(
                    f"{path}: {where}.{table}: address {block.address} count "
                    f"{len(block.words)} patches registers the device image lacks"
                )
    return step


def _parse_blocks(path: Path, raw: Any, where: str) -> tuple[RegisterBlock, ...]:
    if not isinstance(raw, list):
        raise ImageError(f"{path}: {where}: expected a list of blocks")
    blocks = [_parse_block(path, item, f"{where}[{i}]") for i, item in enumerate(raw)]
    blocks.sort(key=lambda block: block.address)
    for before, after in zip(blocks, blocks[1:]):
        if after.address < before.end:
            raise ImageError(
                f"{path}: {where}: blocks at {before.address} and {after.address} "
                "overlap; merge them into one block"
            )
    return tuple(blocks)


def _parse_block(path: Path, raw: Any, where: str) -> RegisterBlock:
    if not isinstance(raw, dict):
        raise ImageError(f"{path}: {where}: expected an object with address and words")
    address = _require_int(path, raw.get("address"), f"{where}.address", 0, 0xFFFF)
    text = raw.get("words")
    if not isinstance(text, str):
        raise ImageError(f"{path}: {where}.words: expected a string of hex words")
    words = []
    for token in text.split():
        if not _HEX_WORD.fullmatch(token):
            raise ImageError(
                f"{path}: {where}.words: {token!r} is not a 16-bit hex word; "
                "write up to 4 hex digits per register"
            )
        words.append(int(token, 16))
    if not words:
        raise ImageError(f"{path}: {where}.words: the block has no words")
    if address + len(words) > 0x10000:
        raise ImageError(f"{path}: {where}: the block runs past address 65535")
    return RegisterBlock(address, tuple(words))


def _check_unique_units(path: Path, devices: tuple[DeviceImage, ...]) -> None:
    seen: set[int] = set()
    for device in devices:
        if device.unit in seen:
            raise ImageError(f"{path}: unit id {device.unit} appears twice in devices")
        seen.add(device.unit)


def _with_unit(path: Path, image: SiteImage, unit: int) -> SiteImage:
    """Move the one device of a register image, and its steps, to `unit`."""
    if len(image.devices) != 1:
        raise ImageError(
            f"{path}: the image has {len(image.devices)} devices; "
            "a unit id can only be given for an image with one device"
        )
    _require_int(path, unit, "unit", 1, MAX_UNIT)
    devices = (replace(image.devices[0], unit=unit),)
    steps = tuple(replace(step, unit=unit) for step in image.steps)
    return replace(image, devices=devices, steps=steps)


# pysunspec2 device JSON


def _parse_sunspec_device(path: Path, document: dict[str, Any], unit: int) -> SiteImage:
    """Lay out a pysunspec2 device as a SunSpec map at 40000 for `unit`."""
    _require_int(path, unit, "unit", 1, MAX_UNIT)
    models = _require_list(path, document, "models", "models")
    words: list[int] = list(SUNS_MARKER)
    for index, model in enumerate(models):
        if not isinstance(model, dict) or not isinstance(model.get("ID"), int):
            raise ImageError(f"{path}: models[{index}]: expected an object with an ID")
        if model["ID"] == sunspec2.mdef.END_MODEL_ID:
            break
        words.extend(_model_words(path, index, model))
    words.extend(END_MARKER)

    block = RegisterBlock(SUNSPEC_BASE, tuple(words))
    device = DeviceImage(unit=unit, holding=(block,))
    name = document.get("name") or path.stem
    return SiteImage(name=str(name), devices=(device,))


def _model_words(path: Path, index: int, values: dict[str, Any]) -> list[int]:
    """Encode one model (ID, L and body) with pysunspec2's model definition."""
    model_id = values["ID"]
    try:
        model_def = sunspec2.device.get_model_def(model_id)
    except Exception as err:  # pysunspec2 raises bare Exception for unknown models
        raise ImageError(
            f"{path}: models[{index}]: model {model_id} has no pysunspec2 definition"
        ) from err
    # Model computes L and repeating group counts from the values it is given.
    model = sunspec2.device.Model(model_id=model_id, model_def=model_def, data=values)
    if model.error_info:
        raise ImageError(
            f"{path}: models[{index}]: model {model_id}: {model.error_info.strip()}"
        )
    try:
        data = model.get_mb()
    except sunspec2.device.ModelError as err:
        raise ImageError(f"{path}: models[{index}]: model {model_id}: {err}") from err
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


# Helpers


def _require_list(
    path: Path, document: dict[str, Any], key: str, where: str, default: Any = None
) -> list[Any]:
    value = document.get(key, default)
    if not isinstance(value, list):
        raise ImageError(f"{path}: {where}: expected a list")
    return value


def _require_int(path: Path, value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImageError(f"{path}: {where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise ImageError(
            f"{path}: {where}: {value} is out of range; use {low} to {high}"
        )
    return value


def _require_bool(path: Path, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ImageError(f"{path}: {where}: expected true or false, got {value!r}")
    return value


def _words_by_address(blocks: tuple[RegisterBlock, ...]) -> dict[int, int]:
    return {
        block.address + offset: word
        for block in blocks
        for offset, word in enumerate(block.words)
    }


def _patch_blocks(
    blocks: tuple[RegisterBlock, ...], patches: tuple[RegisterBlock, ...]
) -> tuple[RegisterBlock, ...]:
    """Write patch words over the blocks that contain them."""
    if not patches:
        return blocks
    updates = _words_by_address(patches)
    return tuple(
        RegisterBlock(
            block.address,
            tuple(
                updates.get(block.address + offset, word)
                for offset, word in enumerate(block.words)
            ),
        )
        for block in blocks
    )
