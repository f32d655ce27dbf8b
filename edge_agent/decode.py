"""Register words to values: point types, not-implemented encodings, scale factors.

SunSpec marks a point the device does not implement with a reserved encoding (0x8000 for
int16, 0xFFFF for uint16, 0 for accumulators, NaN for floats, ...). Every such encoding
decodes to None, and so does every value whose scale factor is missing, not implemented
or outside SunSpec's range of -10 to 10. No decoder returns NaN or an infinity. Scale factors are taken from the same words as the values they scale, never from an
earlier poll, because devices change them at run time.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.sunspec import ModelLayout, PointLayout

Value = int | float | str | None

# Raw values that mean "not implemented", by point type (pysunspec2's sunspec2.mb).
_NOT_IMPLEMENTED: dict[str, int] = {
    "int16": 0x8000,
    "sunssf": 0x8000,
    "uint16": 0xFFFF,
    "count": 0xFFFF,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "acc16": 0,
    "int32": 0x8000_0000,
    "uint32": 0xFFFF_FFFF,
    "enum32": 0xFFFF_FFFF,
    "bitfield32": 0xFFFF_FFFF,
    "acc32": 0,
    "ipaddr": 0,
    "int64": 0x8000_0000_0000_0000,
    "uint64": 0xFFFF_FFFF_FFFF_FFFF,
    "acc64": 0,
    "ipv6addr": 0,
    "eui48": 0xFFFF_FFFF_FFFF,
}
_SIGNED = {"int16", "sunssf", "int32", "int64"}
# One-register integer types: (not-implemented value, signed).
_ONE_WORD: dict[str, tuple[int, bool]] = {
    name: (_NOT_IMPLEMENTED[name], name in _SIGNED)
    for name in ("int16", "sunssf", "uint16", "count", "enum16", "bitfield16", "acc16")
}
_TEXT_TYPES = {"string", "ipaddr", "ipv6addr", "eui48"}

# The range SunSpec allows a sunssf point. A word outside it is a glitch or a device
# fault, and scaling by it would publish 0.0 or 1e14 as a reading.
SCALE_FACTOR_RANGE = range(-10, 11)

# Types that carry no measurement: they never become channels.
NON_CHANNEL_TYPES = {"pad", "sunssf", *_TEXT_TYPES}


def words_to_int(words: Sequence[int]) -> int:
    """Join big-endian 16-bit words, high word first, into one unsigned integer."""
    value = 0
    for word in words:
        value = (value << 16) | word
    return value


def decode_string(words: Sequence[int]) -> str:
    """Decode a SunSpec string: bytes up to the first NUL, ASCII, spaces trimmed.

    Bytes above 0x7F become U+FFFD; control bytes are kept as they are.
    """
    data = b"".join(word.to_bytes(2, "big") for word in words)
    data = data.split(b"\x00", 1)[0]
    return data.decode("ascii", errors="replace").strip(" ")


def decode_raw(point_type: str, words: Sequence[int]) -> Value:
    """Decode one point's words to its unscaled value, or None if not implemented."""
    if point_type == "pad":
        return None
    if point_type == "string":
        text = decode_string(words)
        return text or None
    if point_type in ("float32", "float64"):
        return _decode_float(words)

    raw = words_to_int(words)
    if raw == _NOT_IMPLEMENTED.get(point_type):
        return None
    if point_type == "ipaddr":
        return ".".join(str(byte) for byte in raw.to_bytes(4, "big"))
    if point_type == "ipv6addr":
        return raw.to_bytes(16, "big").hex(":", 2)
    if point_type == "eui48":
        return raw.to_bytes(8, "big")[2:].hex(":")
    if point_type in _SIGNED:
        bits = 16 * len(words)
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    return raw


def _decode_float(words: Sequence[int]) -> float | None:
    data = b"".join(word.to_bytes(2, "big") for word in words)
    if len(words) != 2:
        (value,) = struct.unpack(">d", data)
        return value if math.isfinite(value) else None
    (value,) = struct.unpack(">f", data)
    return shortest_float32(value) if math.isfinite(value) else None


def shortest_float32(value: float) -> float:
    """Return the shortest decimal that reads back as the float32 `value`, as a float.

    0x4366F852 is 230.97 on the device's display, not 230.97000122070312.
    """
    packed = struct.pack(">f", value)
    for digits in range(1, 10):
        shortest = float(f"{value:.{digits}g}")
        try:
            if struct.pack(">f", shortest) == packed:
                return shortest
        except OverflowError:  # rounded up past the largest float32, 3.4028235e38
            continue
    return value  # not reached: 9 significant digits identify every float32


def finite(value: float | None) -> float | None:
    """Return the value, or None when it is NaN or an infinity."""
    if value is None or not math.isfinite(value):
        return None
    return value


def scale(raw: int, exponent: int) -> float:
    """Return raw x 10^exponent, exact to the exponent's decimals (302, -1 -> 30.2)."""
    # Python rounds int / int correctly, so this is the double nearest to the decimal.
    if exponent >= 0:
        return float(raw * 10**exponent)
    return raw / 10**-exponent


def decode_model(layout: ModelLayout, words: Sequence[int | None]) -> dict[str, Value]:
    """Decode every point of one model instance from its words, starting at its ID.

    `words` may hold None for registers that could not be read; points touching them
    decode to None. Returns point names (as in `PointLayout.name`) to scaled values.
    """
    points, scaled = _decode_plan(layout)
    raw: dict[str, Value] = {}
    available = len(words)
    for name, offset, size, point_type, one_word in points:
        if one_word is not None:
            # The result of decode_raw, without its call, for most points.
            word = words[offset] if offset < available else None
            if word is None or word == one_word[0]:
                raw[name] = None
            elif one_word[1] and word >= 0x8000:
                raw[name] = word - 0x10000
            else:
                raw[name] = word
            continue
        point_words = words[offset : offset + size]
        if len(point_words) < size or None in point_words:
            raw[name] = None
        else:
            raw[name] = decode_raw(point_type, point_words)  # type: ignore[arg-type]

    decoded = dict(raw)
    for point in scaled:
        decoded[point.name] = _apply_scale(point, raw)
    return decoded


# A point as decode_model reads it: name, offset, size, type, and _ONE_WORD's entry
# for one-register integer types (else None).
_PlannedPoint = tuple[str, int, int, str, tuple[int, bool] | None]
# Decode plans by id of the layout; each entry keeps its layout, so that the id is
# not reused while the entry exists.
_DECODE_PLANS: dict[
    int, tuple[ModelLayout, tuple[_PlannedPoint, ...], tuple[PointLayout, ...]]
] = {}
_MAX_DECODE_PLANS = 1024


def _decode_plan(
    layout: ModelLayout,
) -> tuple[tuple[_PlannedPoint, ...], tuple[PointLayout, ...]]:
    """Return the layout's points as plain tuples, and its points with a scale factor.

    Layouts are cached and every poll decodes them, so this is built once per layout.
    """
    entry = _DECODE_PLANS.get(id(layout))
    if entry is not None and entry[0] is layout:
        return entry[1], entry[2]
    points = tuple(
        (p.name, p.offset, p.size, p.type,
         _ONE_WORD.get(p.type) if p.size == 1 else None)
        for p in layout.points
    )
    scaled = tuple(p for p in layout.points if p.sf is not None)
    if len(_DECODE_PLANS) >= _MAX_DECODE_PLANS:
        _DECODE_PLANS.clear()
    _DECODE_PLANS[id(layout)] = (layout, points, scaled)
    return points, scaled


def _apply_scale(point: PointLayout, raw: Mapping[str, Value]) -> Value:
    value = raw[point.name]
    if point.sf is None or value is None or point.type in _TEXT_TYPES:
        return value
    exponent = point.sf if isinstance(point.sf, int) else raw.get(point.sf)
    if not isinstance(exponent, int) or exponent not in SCALE_FACTOR_RANGE:
        return None
    if isinstance(value, float):
        return finite(float(Decimal(repr(value)).scaleb(exponent)))
    return finite(scale(int(value), exponent))


# Scale factor words inside SCALE_FACTOR_RANGE, as the power of ten they multiply or
# divide by. Any other word, None and 0x8000 (not implemented) included, is in neither.
_MULTIPLY_BY_WORD = {exponent: 10**exponent for exponent in range(0, 11)}
_DIVIDE_BY_WORD = {0x10000 + exponent: 10**-exponent for exponent in range(-10, 0)}

# Integer types that PointDecoder decodes in its loop, by size: 1, 2 or 4 registers.
_INTEGER_TYPES = {*_ONE_WORD, "int32", "uint32", "enum32", "bitfield32", "acc32",
                  "int64", "uint64", "acc64"}
_UNSIGNED = 1 << 64  # a sign bit that no unsigned value of up to 4 registers reaches

# The steps PointDecoder takes for one point: offset, size, not-implemented value, sign
# bit and offset of its scale factor word (or None). Other points have a function.
_PointFunction = Callable[[list[int | None]], Value]
_Step = tuple[int, int, int, int, int | None, _PointFunction | None]


class PointDecoder:
    """Decodes chosen points of one layout, with each point's steps worked out once.

    `decode(words)` returns what `decode_model(layout, words)` has for those points, in
    the order given, without decoding the other points or building a dict. Polls decode
    the same layouts again and again, so this is built once per layout.
    """

    def __init__(self, layout: ModelLayout, names: Sequence[str]) -> None:
        by_name = {point.name: point for point in layout.points}
        self.size = max((p.offset + p.size for p in layout.points), default=0)
        self.steps: tuple[_Step, ...] = tuple(
            _step(by_name[name], by_name) if name in by_name else _MISSING_STEP
            for name in names
        )

    def decode(self, words: Sequence[int | None]) -> list[Value]:
        """Decode the chosen points from a model's words, starting at its ID."""
        if len(words) < self.size or not isinstance(words, list):
            words = [*words, *[None] * (self.size - len(words))]
        values: list[Value] = []
        append = values.append
        for offset, size, missing, sign_bit, sf_offset, function in self.steps:
            if function is not None:
                append(function(words))
                continue
            if size == 1:
                word = words[offset]
                if word is None:
                    append(None)
                    continue
            elif size == 2:
                high, low = words[offset], words[offset + 1]
                if high is None or low is None:
                    append(None)
                    continue
                word = high << 16 | low
            else:
                part = words[offset : offset + size]
                if None in part:
                    append(None)
                    continue
                word = 0
                for register in part:
                    word = word << 16 | register  # type: ignore[operator]
            if word == missing:
                append(None)
                continue
            if word >= sign_bit:
                word -= sign_bit << 1
            if sf_offset is None:
                append(word)
                continue
            sf_word = words[sf_offset]
            if sf_word in _MULTIPLY_BY_WORD:
                append(float(word * _MULTIPLY_BY_WORD[sf_word]))
            elif sf_word in _DIVIDE_BY_WORD:
                append(word / _DIVIDE_BY_WORD[sf_word])
            else:
                append(None)
        return values


def _step(point: PointLayout, by_name: Mapping[str, PointLayout]) -> _Step:
    sf_point = by_name.get(point.sf) if isinstance(point.sf, str) else None
    if point.type not in _INTEGER_TYPES or isinstance(point.sf, int):
        return (0, 0, 0, 0, None, functools.partial(_decode_point, point, sf_point))
    sign_bit = 1 << (16 * point.size - 1) if point.type in _SIGNED else _UNSIGNED
    fixed = (point.offset, point.size, _NOT_IMPLEMENTED[point.type], sign_bit)
    if point.sf is None:
        return (*fixed, None, None)
    # The tables above read a scale factor word as sunssf does.
    if sf_point is not None and sf_point.size == 1 and \
            _ONE_WORD.get(sf_point.type) == _ONE_WORD["sunssf"]:
        return (*fixed, sf_point.offset, None)
    return (0, 0, 0, 0, None, functools.partial(_decode_point, point, sf_point))


def _missing(words: list[int | None]) -> Value:
    return None


_MISSING_STEP: _Step = (0, 0, 0, 0, None, _missing)


def _decode_point(
    point: PointLayout, sf_point: PointLayout | None, words: list[int | None]
) -> Value:
    """Decode and scale one point as decode_model does, for the types without a step."""
    raw = {point.name: _decode_words(point, words)}
    if sf_point is not None:
        raw[sf_point.name] = _decode_words(sf_point, words)
    return _apply_scale(point, raw)


def _decode_words(point: PointLayout, words: list[int | None]) -> Value:
    point_words = words[point.offset : point.offset + point.size]
    if len(point_words) < point.size or None in point_words:
        return None
    return decode_raw(point.type, point_words)  # type: ignore[arg-type]


def normalise_power_factor(value: float | None) -> float | None:
    """Return a power factor as a fraction in [-1, 1], whatever unit the device used.

    SunSpec models 101-103, 111-113 and 201-204 define PF in percent, but devices send
    a fraction (1.000), a percentage (-98.46) or a float percentage (100.0). A magnitude
    up to 1 is read as a fraction and one up to 100 as a percentage. Anything larger is
    no valid power factor, so it returns None.
    """
    if value is None:
        return None
    magnitude = abs(value)
    if magnitude <= 1:
        return value
    if magnitude <= 100:
        return float(Decimal(repr(value)) / 100)
    return None


def decode_profile_register(
    words: Sequence[int],
    point_type: str,
    *,
    word_order: str = "big",
    no_value: Sequence[int] = (),
) -> float | int | None:
    """Decode one vendor register of a device profile.

    `word_order` "little" means the low word comes first on the wire; `no_value` lists
    raw values (high word first) that mean "no value".
    """
    ordered = list(words) if word_order == "big" else list(reversed(words))
    if words_to_int(ordered) in no_value:
        return None
    if point_type == "float32":
        return _decode_float(ordered)
    raw = words_to_int(ordered)
    if point_type in ("int16", "int32", "int64"):
        bits = 16 * len(ordered)
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    return raw
