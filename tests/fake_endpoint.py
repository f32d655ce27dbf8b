"""An in-memory Modbus endpoint for unit tests of discovery, decoding and polling.

It serves the registers of a field case's devices through the same interface as
`edge_agent.transport.ModbusEndpoint`, with the same errors. Integration tests use the
real simulator and transport instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.endpoint import EndpointSettings
from edge_agent.transport import (
    ModbusConnectionRefused,
    ModbusExceptionResponse,
    ModbusTimeout,
)

CASES = Path(__file__).parent / "fixtures" / "cases"


def load_case(case_id: str) -> dict[str, Any]:
    """Load one field case from tests/fixtures/cases."""
    return json.loads((CASES / f"{case_id}.json").read_text())


def parse_blocks(blocks: list[dict[str, Any]]) -> dict[int, int]:
    """Turn a case's register blocks (address and hex words) into address -> word."""
    registers = {}
    for block in blocks:
        words = [int(word, 16) for word in block["words"].split()]
        registers.update(zip(range(block["address"], block["address"] + len(words)),
                             words))
    return registers


@dataclass
class FakeUnit:
    """The registers and faults of one unit id."""

    holding: dict[int, int] = field(default_factory=dict)
    input: dict[int, int] = field(default_factory=dict)
    unmapped: str = "exception-2"  # or "timeout"
    exceptions: list[dict[str, int]] = field(default_factory=list)
    silent: bool = False  # no answer at all

    @classmethod
    def from_case(cls, device: dict[str, Any]) -> FakeUnit:
        return cls(
            holding=parse_blocks(device.get("holding", [])),
            input=parse_blocks(device.get("input", [])),
            unmapped=device.get("unmapped", "exception-2"),
            exceptions=list(device.get("exceptions", [])),
        )

    def patch(self, step: dict[str, Any]) -> None:
        """Apply one of a case's steps to the registers."""
        self.holding.update(parse_blocks(step.get("holding", [])))
        self.input.update(parse_blocks(step.get("input", [])))
        self.silent = bool(step.get("silent", False))


class FakeEndpoint:
    """Serve FakeUnits like ModbusEndpoint: split reads, raise the transport's errors."""

    def __init__(
        self,
        units: dict[int, FakeUnit],
        settings: EndpointSettings | None = None,
        *,
        device_max_registers: int = 125,
        absent_units: str = "exception-11",
    ):
        self.units = units
        self.settings = settings or EndpointSettings(host="127.0.0.1", port=1502)
        self.device_max_registers = device_max_registers
        self.absent_units = absent_units
        self.refused = False
        self.requests: list[tuple[int, int, int]] = []  # (unit, address, count)
        self.polls_ended = 0

    @classmethod
    def from_case(cls, case: dict[str, Any], **kwargs: Any) -> FakeEndpoint:
        units = {d["unit"]: FakeUnit.from_case(d) for d in case["devices"]}
        link = case.get("link", {})
        kwargs.setdefault("device_max_registers", link.get("max_registers_per_read", 125))
        kwargs.setdefault("absent_units", link.get("absent_units", "exception-11"))
        return cls(units, **kwargs)

    async def read(
        self, unit: int, address: int, count: int, function_code: int | None = None
    ) -> list[int]:
        words: list[int] = []
        step = self.settings.max_registers
        for start in range(address, address + count, step):
            size = min(step, address + count - start)
            words += self._answer(unit, start, size, function_code)
        return words

    async def end_poll(self) -> None:
        self.polls_ended += 1

    def _answer(self, unit: int, address: int, count: int, fc: int | None) -> list[int]:
        label = self.settings.label
        if self.refused:
            raise ModbusConnectionRefused(f"{label}: connection refused", label=label)
        self.requests.append((unit, address, count))
        device = self.units.get(unit)
        if device is None:
            if self.absent_units == "timeout":
                raise self._timeout(unit, address, count)
            raise self._exception(11, unit, address, count)
        if device.silent:
            raise self._timeout(unit, address, count)
        if count > self.device_max_registers:
            raise self._exception(2, unit, address, count)
        for fault in device.exceptions:
            overlaps = address <= fault["last"] and address + count - 1 >= fault["first"]
            if overlaps and count >= fault.get("min_count", 1):
                raise self._exception(fault["code"], unit, address, count)

        registers = device.input if (fc or self.settings.function_code) == 4 else (
            device.holding)
        addresses = range(address, address + count)
        if any(a not in registers for a in addresses):
            if device.unmapped == "timeout":
                raise self._timeout(unit, address, count)
            raise self._exception(2, unit, address, count)
        return [registers[a] for a in addresses]

    def _timeout(self, unit: int, address: int, count: int) -> ModbusTimeout:
        label = self.settings.label
        return ModbusTimeout(
            f"{label} unit {unit}: no response to a read of {count} at {address}",
            label=label, unit=unit, address=address, count=count,
        )

    def _exception(
        self, code: int, unit: int, address: int, count: int
    ) -> ModbusExceptionResponse:
        label = self.settings.label
        return ModbusExceptionResponse(
            f"{label} unit {unit}: exception {code} to a read of {count} at {address}",
            code=code, label=label, unit=unit, address=address, count=count,
        )
