"""Device profiles: register maps for devices without SunSpec, and SunSpec quirks.

A profile is a TOML file in `device_profiles/` (built in) or in the config's
`profiles_dir`; its name is the file name without ``.toml``. A file holds either

- a register map: a ``[device]`` table and ``[[registers]]`` tables, one per channel
  ``profile.<name>``; or
- quirks: ``[[quirks]]`` tables that match SunSpec devices on model 1's manufacturer
  and model strings and set how they must be read.

Every problem is reported as ``<file>:<line>: <what is wrong>; <fix>``. tomllib gives
line numbers only for syntax errors, so the line of an offending key is found by
scanning the file's text for the table header and then for the key.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from edge_agent.decode import SCALE_FACTOR_RANGE, decode_profile_register, finite
from edge_agent.endpoint import MAX_CONNECT_DELAY, MAX_REQUEST_GAP
from edge_agent.errors import ConfigError
from edge_agent.wire import MAX_ID_LENGTH, MAX_TEXT_LENGTH, MAX_UNIT_LENGTH, text_problem



def _builtin_dir() -> Path:
    """Locate the built-in profiles: inside an installed wheel, else the source tree."""
    installed = Path(__file__).resolve().parent / "device_profiles"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "device_profiles"


BUILTIN_DIR = _builtin_dir()

REGISTER_SIZES = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "uint64": 4,
                  "float32": 2}
ORDERS = ("big", "little")
MAX_READ = 125  # protocol limit of one FC3/FC4 read
# A register's channel, "profile.<name>", must fit the collector's id limit.
_NAME = re.compile(rf"[A-Za-z0-9_]{{1,{MAX_ID_LENGTH - len('profile.')}}}")


class ProfileError(ConfigError):
    """A device profile is invalid, or a config names a profile that does not exist."""


# --- records ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits a device needs; None leaves the endpoint's own setting."""

    max_registers: int | None = None
    request_gap: float | None = None  # seconds
    connect_delay: float | None = None  # seconds
    close_after_poll: bool | None = None

    def describe(self) -> list[str]:
        """Return the limits that are set, as `key = value` texts."""
        texts = []
        for name in ("max_registers", "request_gap", "connect_delay", "close_after_poll"):
            value = getattr(self, name)
            if value is not None:
                texts.append(f"{name} = {str(value).lower()}")
        return texts


@dataclass(frozen=True, slots=True)
class Register:
    """One vendor register (or register pair) that becomes channel `profile.<name>`."""

    name: str
    function_code: int  # 3 holding, 4 input
    address: int  # 0-based protocol address
    type: str  # a key of REGISTER_SIZES
    word_order: str = "big"  # "little": the low word comes first
    byte_order: str = "big"  # "little": the low byte of each word comes first
    multiplier: Decimal | None = None
    exponent: int = 0  # value x 10^exponent, after the multiplier
    unit: str | None = None
    no_value: tuple[int, ...] = ()  # raw values, most significant word first

    @property
    def size(self) -> int:
        """Number of 16-bit registers."""
        return REGISTER_SIZES[self.type]

    @property
    def channel(self) -> str:
        """Channel name: "profile.<name>"."""
        return f"profile.{self.name}"

    def decode(self, words: Sequence[int]) -> float | None:
        """Decode the register's words as read off the wire, or None for no value."""
        if self.byte_order == "little":
            words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
        raw = decode_profile_register(words, self.type, word_order=self.word_order,
                                      no_value=self.no_value)
        if raw is None:
            return None
        # Decimal keeps 0.1 x 2345 at 234.5 instead of 234.50000000000003. A float32
        # arrives as its shortest decimal, so its repr has no float32 noise.
        value = Decimal(repr(raw)) if isinstance(raw, float) else Decimal(raw)
        if self.multiplier is not None:
            value *= self.multiplier
        return finite(float(value.scaleb(self.exponent)))


@dataclass(frozen=True, slots=True)
class ProfileRead:
    """One read request of a register map: `count` registers from `address`."""

    function_code: int
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A device's vendor registers, read in place of (or beside) a SunSpec map."""

    name: str
    path: Path
    manufacturer: str | None = None
    model: str | None = None
    # True for a SunSpec device whose vendor registers are read beside its models.
    sunspec: bool = False
    limits: Limits = Limits()
    registers: tuple[Register, ...] = ()

    def plan(self, max_registers: int) -> list[ProfileRead]:
        """Plan the fewest reads that cover every register, none split over two reads.

        Registers of one function code share a read while the span stays within
        `max_registers`. The gaps between them are read too, so a device that rejects
        reads of unmapped addresses needs a profile whose registers leave no gaps.
        """
        limit = min(max_registers, self.limits.max_registers or MAX_READ)
        reads: list[ProfileRead] = []
        ordered = sorted(self.registers, key=lambda r: (r.function_code, r.address))
        for register in ordered:
            end = register.address + register.size
            last = reads[-1] if reads else None
            if (last is not None and last.function_code == register.function_code
                    and end - last.address <= limit):
                count = max(last.count, end - last.address)
                reads[-1] = ProfileRead(last.function_code, last.address, count)
            else:
                reads.append(ProfileRead(register.function_code, register.address,
                                         register.size))
        return reads


@dataclass(frozen=True, slots=True)
class Quirk:
    """Read settings for the SunSpec devices of one manufacturer and model."""

    name: str
    path: Path
    manufacturer: Callable[[str], bool] = field(compare=False, repr=False)
    model: Callable[[str], bool] = field(compare=False, repr=False)
    limits: Limits = Limits()
    skip: tuple[tuple[int, int], ...] = ()  # (first, last) addresses never requested
    note: str = ""

    def matches(self, manufacturer: str | None, model: str | None) -> bool:
        """Tell whether model 1's manufacturer and model strings match this quirk."""
        return self.manufacturer(manufacturer or "") and self.model(model or "")

    def describe(self) -> str:
        """Return the quirk's settings for messages, e.g. "max_registers = 50"."""
        texts = self.limits.describe()
        texts += [f"skip {first}-{last}" for first, last in self.skip]
        return ", ".join(texts)


@dataclass(frozen=True, slots=True)
class Profiles:
    """Every loaded profile: register maps by name, and quirks in file order."""

    register_maps: dict[str, RegisterMap] = field(default_factory=dict)
    quirks: tuple[Quirk, ...] = ()

    def register_map(self, name: str) -> RegisterMap:
        """Return the register map called `name`.

        :raises ProfileError: no register map has that name.
        """
        found = self.register_maps.get(name)
        if found is None:
            known = ", ".join(sorted(self.register_maps)) or "none"
            raise ProfileError(f'no register map profile "{name}"; use one of: {known}')
        return found

    def quirks_for(self, manufacturer: str | None, model: str | None) -> list[Quirk]:
        """Return the quirks that match a device's manufacturer and model."""
        return [q for q in self.quirks if q.matches(manufacturer, model)]


def load_profiles(*directories: Path | None) -> Profiles:
    """Load the built-in profiles and those in `directories`, later ones winning.

    A profile in a later directory replaces a built-in one of the same name.

    :raises ProfileError: one line per problem, each naming file, line and fix.
    """
    files: dict[str, Path] = {}
    for directory in (BUILTIN_DIR, *directories):
        if directory is None:
            continue
        if not directory.is_dir():
            raise ProfileError(f"{directory}: profiles folder not found; check "
                               "profiles_dir")
        for path in sorted(directory.glob("*.toml")):
            files[path.stem] = path
    return _load_files(tuple(files.values()))


@functools.cache
def builtin_profiles() -> Profiles:
    """Load the built-in profiles once."""
    return load_profiles()


def _load_files(paths: Sequence[Path]) -> Profiles:
    problems: list[str] = []
    register_maps: dict[str, RegisterMap] = {}
    quirks: list[Quirk] = []
    for path in paths:
        loaded = _ProfileFile(path, problems).load()
        if isinstance(loaded, RegisterMap):
            register_maps[loaded.name] = loaded
        elif loaded is not None:
            quirks.extend(loaded)
    if problems:
        raise ProfileError("\n".join(problems))
    return Profiles(register_maps, tuple(quirks))


# --- finding lines ------------------------------------------------------------------


_HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")


class _Lines:
    """Finds the line of a key in a TOML file's text: table header, then key."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (table name, index among tables of that name) -> (header line, end line)
        self.tables: dict[tuple[str, int], tuple[int, int]] = {}
        counts: dict[str, int] = {}
        current, start = ("", 0), 0
        for number, line in enumerate(self.lines, start=1):
            match = _HEADER.match(line)
            if match is None:
                continue
            self.tables[current] = (start, number - 1)
            name = match.group(2)
            index = counts.get(name, 0)
            counts[name] = index + 1
            current, start = (name, index), number
        self.tables[current] = (start, len(self.lines))

    def of(self, table: str = "", index: int = 0, key: str | None = None) -> int:
        """Return the 1-based line of `key` in the table, else of its header, else 1."""
        start, end = self.tables.get((table, index), (0, 0))
        if key is not None:
            pattern = re.compile(rf'\s*"?{re.escape(key)}"?\s*=')
            for number in range(max(start, 1), end + 1):
                if pattern.match(self.lines[number - 1]):
                    return number
        return max(start, 1)


# --- checking values ----------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """Show a value as it is written in TOML."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" or "nan", as TOML writes them
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


class _Table:
    """One table of a profile file, reporting each problem with its line."""

    def __init__(self, owner: _ProfileFile, values: dict[str, Any], table: str,
                 index: int, where: str) -> None:
        self.owner = owner
        self.values = values
        self.table = table
        self.index = index
        self.where = where  # "registers[2]" for messages, "" for the top level

    def problem(self, key: str | None, text: str) -> None:
        line = self.owner.lines.of(self.table, self.index, key)
        self.owner.problems.append(f"{self.owner.path}:{line}: {text}")

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def check_known(self, known: Iterable[str]) -> None:
        known = tuple(known)
        for key in self.values:
            if key not in known:
                self.problem(key, f"{self.name(key)} is not a known key; use one of "
                             f"{', '.join(known)}")

    def get(self, key: str, valid: Callable[[Any], bool], expected: str,
            default: Any = None, required: str = "") -> Any:
        if key not in self.values:
            if required:
                self.problem(None, f"{self.name(key)} is missing; {required}")
            return default
        value = self.values[key]
        if not valid(value):
            self.problem(key, f"{self.name(key)} is {_show(value)}; it must be "
                         f"{expected}")
            return default
        return value

    def text(self, key: str, required: str = "",
             limit: int = MAX_TEXT_LENGTH) -> str | None:
        value = self.get(key, lambda v: isinstance(v, str) and v.strip() != "",
                         "a non-empty string", required=required)
        problem = None if value is None else text_problem(value, limit)
        if problem is not None:
            self.problem(key, f"{self.name(key)} {_show(value)} {problem}")
            return None
        return value

    def choice(self, key: str, choices: Sequence[Any], default: Any) -> Any:
        expected = "one of " + ", ".join(_show(c) for c in choices)
        # The type is compared first, so that a list or table is never compared.
        return self.get(key, lambda v: any(type(v) is type(c) and v == c
                                           for c in choices),
                        expected, default)

    def limits(self) -> Limits:
        return Limits(
            max_registers=self.get("max_registers",
                                   lambda v: _is_int(v) and 1 <= v <= MAX_READ,
                                   f"an integer 1-{MAX_READ}"),
            request_gap=_seconds(self.get(
                "request_gap", lambda v: _is_number(v) and 0 <= v <= MAX_REQUEST_GAP,
                f"a number of seconds 0-{MAX_REQUEST_GAP:g}")),
            connect_delay=_seconds(self.get(
                "connect_delay",
                lambda v: _is_number(v) and 0 <= v <= MAX_CONNECT_DELAY,
                f"a number of seconds 0-{MAX_CONNECT_DELAY:g}")),
            close_after_poll=self.get("close_after_poll",
                                      lambda v: isinstance(v, bool), "true or false"),
        )


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


_LIMIT_KEYS = ("max_registers", "request_gap", "connect_delay", "close_after_poll")
_DEVICE_KEYS = ("manufacturer", "model", "description", "sunspec", "function_code",
                "word_order", "byte_order", *_LIMIT_KEYS)
_REGISTER_KEYS = ("name", "function_code", "address", "type", "word_order",
                  "byte_order", "scale", "scale_exponent", "unit", "no_value",
                  "description")
_QUIRK_KEYS = ("name", "manufacturer", "manufacturer_regex", "model", "model_regex",
               "skip", "note", *_LIMIT_KEYS)


# --- reading a file -----------------------------------------------------------------


class _ProfileFile:
    """Parses and checks one profile file, collecting its problems."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.lines = _Lines("")

    def load(self) -> RegisterMap | list[Quirk] | None:
        document = self._read()
        if document is None:
            return None
        before = len(self.problems)
        top = _Table(self, document, "", 0, "")
        top.check_known(("device", "registers", "quirks"))
        if "registers" in document and "quirks" in document:
            top.problem("quirks", "the file has both [[registers]] and [[quirks]] "
                        "tables; move the quirks to a file of their own")
            return None
        if "registers" not in document and "quirks" not in document:
            top.problem(None, "the file has no [[registers]] or [[quirks]] tables; add "
                        "[[registers]] for a register map or [[quirks]] for SunSpec "
                        "quirks")
            return None
        result: RegisterMap | list[Quirk]
        if "registers" in document:
            result = self._register_map(document)
        else:
            result = self._quirks(document)
        return result if len(self.problems) == before else None

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            self.problems.append(f"{self.path}:1: cannot read the file ({err}); check "
                                 "that it is readable UTF-8 text")
            return None
        self.lines = _Lines(text)
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            match = re.search(r"at line (\d+)", str(err))
            line = match.group(1) if match else "1"
            self.problems.append(f"{self.path}:{line}: invalid TOML: {err}; fix the "
                                 "syntax on that line")
            return None

    # register maps

    def _register_map(self, document: dict[str, Any]) -> RegisterMap:
        device = _Table(self, self._one_table(document, "device"), "device", 0, "device")
        device.check_known(_DEVICE_KEYS)
        defaults = {
            "function_code": device.choice("function_code", (3, 4), 3),
            "word_order": device.choice("word_order", ORDERS, "big"),
            "byte_order": device.choice("byte_order", ORDERS, "big"),
        }
        registers = self._registers(document.get("registers"), defaults)
        return RegisterMap(
            name=self.path.stem,
            path=self.path,
            manufacturer=device.text("manufacturer"),
            model=device.text("model"),
            sunspec=device.get("sunspec", lambda v: isinstance(v, bool),
                               "true or false", False),
            limits=device.limits(),
            registers=registers,
        )

    def _one_table(self, document: dict[str, Any], name: str) -> dict[str, Any]:
        value = document.get(name, {})
        if not isinstance(value, dict):
            _Table(self, document, "", 0, "").problem(
                name, f"{name} must be a table; write it as [{name}]")
            return {}
        return value

    def _registers(self, tables: Any, defaults: dict[str, Any]) -> tuple[Register, ...]:
        if not isinstance(tables, list) or not tables:
            _Table(self, {}, "", 0, "").problem(
                "registers", "registers must be [[registers]] tables; add one per "
                "register")
            return ()
        registers: list[Register] = []
        names: set[str] = set()
        for index, values in enumerate(tables):
            table = _Table(self, values, "registers", index, f"registers[{index + 1}]")
            if not isinstance(values, dict):
                table.problem(None, f"{table.where} must be a table; write it as "
                              "[[registers]]")
                continue
            register = self._register(table, defaults)
            if register is None:
                continue
            if register.name in names:
                table.problem("name", f'{table.name("name")} "{register.name}" is '
                              "used twice; give each register its own name")
            names.add(register.name)
            registers.append(register)
        return tuple(registers)

    def _register(self, table: _Table, defaults: dict[str, Any]) -> Register | None:
        before = len(self.problems)
        table.check_known(_REGISTER_KEYS)
        name = table.get("name", lambda v: isinstance(v, str) and _NAME.fullmatch(v),
                         f"letters, digits and _ only, at most "
                         f"{MAX_ID_LENGTH - len('profile.')}, e.g. \"V_L1\"",
                         required='add name = "..." (the channel becomes '
                         'profile.<name>)')
        kind = table.get("type", lambda v: isinstance(v, str) and v in REGISTER_SIZES,
                         "one of " + ", ".join(REGISTER_SIZES),
                         required='add type = "uint16" (or another register type)')
        address = table.get("address", lambda v: _is_int(v) and 0 <= v <= 0xFFFF,
                            "an integer 0-65535 (0-based, as sent on the wire)",
                            required="add address = <0-based register address>")
        multiplier = table.get("scale",
                               lambda v: _is_number(v) and v != 0 and math.isfinite(v),
                               "a finite non-zero number (the multiplier)")
        low, high = SCALE_FACTOR_RANGE[0], SCALE_FACTOR_RANGE[-1]
        exponent = table.get("scale_exponent",
                             lambda v: _is_int(v) and v in SCALE_FACTOR_RANGE,
                             f"an integer from {low} to {high} (the power of ten)", 0)
        if multiplier is not None and "scale_exponent" in table.values:
            table.problem("scale_exponent", f"{table.name('scale')} and "
                          f"{table.name('scale_exponent')} are both set; keep one")
        unit = table.text("unit", limit=MAX_UNIT_LENGTH)
        no_value = self._no_value(table, kind)

        register = None
        if len(self.problems) == before:
            register = Register(
                name=name, address=address, type=kind,
                function_code=table.choice("function_code", (3, 4),
                                           defaults["function_code"]),
                word_order=table.choice("word_order", ORDERS, defaults["word_order"]),
                byte_order=table.choice("byte_order", ORDERS, defaults["byte_order"]),
                multiplier=None if multiplier is None else Decimal(repr(multiplier)),
                exponent=exponent, unit=unit, no_value=no_value,
            )

        if register is not None and register.address + register.size > 0x10000:
            table.problem("address", f"{table.name('address')} {address} with type "
                          f"{kind} runs past register 65535; check the address")
            return None
        return register if len(self.problems) == before else None

    def _no_value(self, table: _Table, kind: str | None) -> tuple[int, ...]:
        digits = 4 * REGISTER_SIZES.get(kind or "", 4)
        hex_value = re.compile(rf"(0x)?[0-9A-Fa-f]{{1,{digits}}}")
        values = table.get(
            "no_value",
            lambda v: isinstance(v, list)
            and all(isinstance(x, str) and hex_value.fullmatch(x) for x in v),
            f'a list of hex strings of up to {digits} digits, e.g. ["{"F" * digits}"]',
            [],
        )
        return tuple(int(value.removeprefix("0x"), 16) for value in values)

    # quirks

    def _quirks(self, document: dict[str, Any]) -> list[Quirk]:
        tables = document.get("quirks")
        if not isinstance(tables, list) or not tables:
            _Table(self, {}, "", 0, "").problem(
                "quirks", "quirks must be [[quirks]] tables; add one per device family")
            return []
        quirks = []
        for index, values in enumerate(tables):
            table = _Table(self, values, "quirks", index, f"quirks[{index + 1}]")
            if not isinstance(values, dict):
                table.problem(None, f"{table.where} must be a table; write it as "
                              "[[quirks]]")
                continue
            quirk = self._quirk(table)
            if quirk is not None:
                quirks.append(quirk)
        return quirks

    def _quirk(self, table: _Table) -> Quirk | None:
        before = len(self.problems)
        table.check_known(_QUIRK_KEYS)
        name = table.text("name", required='add name = "..." to tell the quirk apart')
        manufacturer = self._pattern(table, "manufacturer", required=True)
        model = self._pattern(table, "model", required=False)
        quirk = Quirk(
            name=name or "", path=self.path,
            manufacturer=manufacturer or _any, model=model or _any,
            limits=table.limits(), skip=self._skip(table),
            note=table.text("note") or "",
        )
        if not any(key in table.values for key in (*_LIMIT_KEYS, "skip")):
            table.problem(None, f"{table.where} sets nothing; add max_registers, "
                          "request_gap, connect_delay, close_after_poll or skip")
        return quirk if len(self.problems) == before else None

    def _pattern(self, table: _Table, key: str,
                 required: bool) -> Callable[[str], bool] | None:
        """Build a matcher from `<key>` (a glob) or `<key>_regex`, both ignoring case."""
        glob = table.text(key)
        regex = table.text(f"{key}_regex")
        if glob is not None and regex is not None:
            table.problem(f"{key}_regex", f"{table.name(key)} and "
                          f"{table.name(key + '_regex')} are both set; keep one")
            return None
        if glob is not None:
            pattern = glob.lower()
            return lambda value: fnmatch.fnmatchcase(value.lower(), pattern)
        if regex is not None:
            try:
                compiled = re.compile(regex, re.IGNORECASE)
            except re.error as err:
                table.problem(f"{key}_regex", f"{table.name(key + '_regex')} is not a "
                              f"valid regular expression ({err}); fix the pattern")
                return None
            return lambda value: compiled.fullmatch(value) is not None
        if required:
            table.problem(None, f"{table.name(key)} is missing; add {key} = \"...\" "
                          f"(a glob such as \"SolarEdge*\") or {key}_regex")
        return None

    def _skip(self, table: _Table) -> tuple[tuple[int, int], ...]:
        ranges = table.get(
            "skip",
            lambda v: isinstance(v, list) and all(
                isinstance(r, list) and len(r) == 2 and all(_is_int(a) for a in r)
                and 0 <= r[0] <= r[1] <= 0xFFFF for r in v),
            "a list of [first, last] address pairs within 0-65535, e.g. "
            "[[40200, 40299]]",
            [],
        )
        return tuple((first, last) for first, last in ranges)


def _any(value: str) -> bool:
    return True
