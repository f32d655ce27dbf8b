"""Field cases end to end: the simulator serves each case over TCP on 127.0.0.1, the real
transport reads it, and the poller's devices, values and states must match the case.

Energy deltas over a case's steps (`expect.after_steps`) are not checked here: they
belong to the energy accounting, which is not part of the poller.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from edge_agent.endpoint import EndpointSettings
from edge_agent.poller import ProfilePoller, UnitPoller
from edge_agent.profiles import RegisterMap, builtin_profiles
from edge_agent.readings import DeviceState, Poll
from edge_agent.sunspec import DeviceMap, layout_model
from edge_agent.transport import ModbusEndpoint
from sim_fixtures import CASES, DEVICE_1547, serve_image  # noqa: F401

def read_case(case_id: str) -> dict[str, Any]:
    return json.loads((CASES / f"{case_id}.json").read_text())


def settings_for(case: dict[str, Any], port: int) -> EndpointSettings:
    """Transport settings an installer would write for the case's link."""
    link = case.get("link", {})
    return EndpointSettings(
        host="127.0.0.1",
        port=port,
        timeout=0.5,
        max_registers=link.get("max_registers_per_read", 125),
        connect_delay=link.get("ignore_requests_within_ms_of_connect", 0) / 1000 + 0.1,
        request_gap=link.get("min_gap_ms", 0) / 1000 + 0.01 * bool(link.get("min_gap_ms")),
    )


@dataclass
class CaseRun:
    """What polling a case produced: polls by (unit, step), device maps by unit."""

    case: dict[str, Any]
    endpoint: Any
    pollers: dict[int, UnitPoller]
    polls: dict[tuple[int, int], list[Poll]] = field(default_factory=dict)

    async def poll(self, step: int) -> None:
        for unit, poller in self.pollers.items():
            self.polls[unit, step] = await poller.poll_devices()

    def device_map(self, unit: int) -> DeviceMap:
        device_map = self.pollers[unit].device_map
        assert device_map is not None, f"unit {unit} was never discovered"
        return device_map


async def start_case(serve_image, case_id: str) -> tuple[Any, CaseRun]:  # noqa: F811
    case = read_case(case_id)
    simulator = await serve_image(case_id)
    endpoint = ModbusEndpoint(settings_for(case, simulator.port))
    units = [device["unit"] for device in case["devices"]]
    pollers = {
        unit: UnitPoller(endpoint, unit, address_label=simulator.address)
        for unit in units
    }
    return simulator, CaseRun(case, endpoint, pollers)


async def run_steps(simulator, run: CaseRun) -> None:
    steps = run.case.get("steps", [])
    if not steps:
        await run.poll(0)
        return
    for index in range(len(steps)):
        await simulator.apply_step(index)
        await run.poll(index)


async def close(endpoint: Any) -> None:
    closer = getattr(endpoint, "close", None)
    if closer is not None:
        await closer()


def float32_equal(got: float, expected: float) -> bool:
    return struct.pack(">f", got) == struct.pack(">f", expected)


def point_type(run: CaseRun, unit: int, channel: str) -> str | None:
    model_id, _, point = channel.partition(".")
    for model in run.device_map(unit).models:
        if str(model.model_id) == model_id:
            layout = layout_model(model.model_id, model.length)
            found = layout.point(point) if layout else None
            return found.type if found else None
    return None


def check_devices(run: CaseRun) -> None:
    for expected in run.case["expect"].get("devices", []):
        unit = expected["unit"]
        devices = run.device_map(unit).devices
        if "at" in expected:
            devices = tuple(d for d in devices if d.at == expected["at"])
        device = devices[0]
        assert device.identity.manufacturer == expected["manufacturer"]
        assert device.identity.serial == expected["serial"]
        assert [m.model_id for m in device.models] == expected["models"]


def check_values(run: CaseRun) -> None:
    for expected in run.case["expect"].get("values", []):
        if expected["channel"].startswith("profile."):
            continue
        unit, channel = expected["unit"], expected["channel"]
        polls = run.polls[unit, expected.get("step", 0)]
        poll = next(p for p in polls if channel in p.values)
        got = poll.values[channel]
        where = f"unit {unit} step {expected.get('step', 0)} {channel}"
        if expected["value"] is None or point_type(run, unit, channel) != "float32":
            assert got == expected["value"], where
        else:
            assert float32_equal(got, expected["value"]), f"{where}: {got}"
        if "normalised" in expected:
            assert poll.values[f"{channel}.normalised"] == expected["normalised"], where


def check_states(run: CaseRun) -> None:
    for expected in run.case["expect"].get("status", []):
        poll = run.polls[expected["unit"], 0][0]
        assert poll.state == DeviceState(expected["state"])


def check_profile_file(run: CaseRun, register_map: RegisterMap) -> None:
    """Check that the shipped profile reads the registers the case describes."""
    registers = {register.name: register for register in register_map.registers}
    for name, spec in run.case["expect"]["profile"].items():
        register = registers[name]
        assert register.function_code == spec["fc"], name
        assert register.address == spec["address"], name
        assert register.type == spec["type"], name
        if register.size > 1:
            assert register.word_order == spec["word_order"], name
        nan = tuple(int(raw, 16) for raw in spec.get("nan", []))
        assert register.no_value == nan, name


def check_profile_values(run: CaseRun) -> None:
    for expected in run.case["expect"]["values"]:
        channel = expected["channel"]
        if not channel.startswith("profile."):
            continue
        poll = run.polls[expected["unit"], expected.get("step", 0)][0]
        got = poll.values[channel]
        if expected["value"] is not None and isinstance(got, float):
            assert float32_equal(got, expected["value"]), f"{channel}: {got}"
        else:
            assert got == expected["value"], channel


async def check_case(serve_image, case_id: str) -> CaseRun:  # noqa: F811
    simulator, run = await start_case(serve_image, case_id)
    try:
        await run_steps(simulator, run)
        check_devices(run)
        check_values(run)
        check_states(run)
    finally:
        await close(run.endpoint)
    return run


@pytest.mark.parametrize(
    "case_id",
    ["C01a", "C01b", "C03", "C04a", "C04b", "C05", "C06", "C11a", "C11b", "C11c",
     "C13", "C14", "C15", "C16a", "C16b", "C16c", "C20", "C27"],
)
async def test_case(serve_image, case_id):  # noqa: F811
    await check_case(serve_image, case_id)


async def test_case_c06_absent_unit(serve_image):  # noqa: F811
    simulator, run = await start_case(serve_image, "C06")
    run.pollers[2] = UnitPoller(run.endpoint, 2, address_label=simulator.address)
    try:
        await run.poll(0)
        check_devices(run)
        check_values(run)
        assert run.polls[2, 0][0].state == DeviceState.OFFLINE
    finally:
        await close(run.endpoint)


async def test_case_c08_one_client(serve_image):  # noqa: F811
    simulator, run = await start_case(serve_image, "C08")
    # Another client (a vendor app) has the only connection the device accepts.
    _, holder = await asyncio.open_connection("127.0.0.1", simulator.port)
    try:
        await run.poll(0)
        check_states(run)
        holder.close()
        await holder.wait_closed()
        # The device listens again once it notices the other client left; the agent
        # simply polls again on its next round.
        for _ in range(100):
            await run.poll(0)
            if run.polls[1, 0][0].state != DeviceState.REFUSED:
                break
            await asyncio.sleep(0.01)
        check_devices(run)
        check_values(run)
        assert run.polls[1, 0][0].state == DeviceState.ONLINE
        assert simulator.clients == 1
    finally:
        holder.close()
        await close(run.endpoint)


@pytest.mark.slow
async def test_case_c09_connect_delay(serve_image):  # noqa: F811
    await check_case(serve_image, "C09")


async def test_case_c10_max_50_registers(serve_image):  # noqa: F811
    run = await check_case(serve_image, "C10")
    assert run.endpoint.settings.max_registers == 50


async def test_case_c15_float32_decimals(serve_image):  # noqa: F811
    run = await check_case(serve_image, "C15")
    values = run.polls[1, 0][0].values
    # Each float32 reads as its shortest decimal, with no float32 noise in its repr.
    assert repr(values["113.A"]) == "1.26"
    assert repr(values["113.AphA"]) == "0.42"
    assert repr(values["113.PPVphAB"]) == "405.2"
    assert repr(values["113.Hz"]) == "49.97"
    assert repr(values["113.DCW"]) == "304.46"
    assert repr(values["113.WH"]) == "40061108.0"


async def test_case_c18_vendor_word_order(serve_image):  # noqa: F811
    register_map = builtin_profiles().register_map("solaredge-power-control")
    simulator, run = await start_case(serve_image, "C18")
    run.pollers[1] = UnitPoller(run.endpoint, 1, address_label=simulator.address,
                                extra=register_map)
    try:
        await run.poll(0)
        check_devices(run)
        check_profile_file(run, register_map)
        check_profile_values(run)
        poll = run.polls[1, 0][0]
        assert poll.state == DeviceState.ONLINE
        assert poll.values["103.W"] is not None
    finally:
        await close(run.endpoint)


async def test_case_c19_meter_without_sunspec(serve_image):  # noqa: F811
    register_map = builtin_profiles().register_map("eastron-sdm630")
    simulator, run = await start_case(serve_image, "C19")
    try:
        await run.poll(0)
        assert run.polls[1, 0][0].state == DeviceState.NOT_SUNSPEC
        run.pollers[1] = ProfilePoller(run.endpoint, 1, register_map,
                                       address_label=simulator.address)
        await run.poll(0)
        check_profile_file(run, register_map)
        check_profile_values(run)
        poll = run.polls[1, 0][0]
        assert poll.state == DeviceState.ONLINE
        assert poll.device.manufacturer == "Eastron"
        assert float32_equal(poll.values["profile.kWh_export"], 3021.77)
    finally:
        await close(run.endpoint)


async def test_case_c21_asleep_then_closed(serve_image):  # noqa: F811
    simulator, run = await start_case(serve_image, "C21")
    try:
        await run.poll(0)
        check_devices(run)
        check_values(run)
        check_states(run)
        # Other sites close TCP at sunset: the device is offline, then back.
        await simulator.stop()
        await run.poll(1)
        assert run.polls[1, 1][0].state == DeviceState.OFFLINE
        await simulator.start()
        await run.poll(2)
        assert run.polls[1, 2][0].state == DeviceState.SLEEPING
    finally:
        await close(run.endpoint)


@pytest.mark.parametrize("case_id", ["C22", "C23", "C25"])
async def test_case_counter_values(serve_image, case_id):  # noqa: F811
    await check_case(serve_image, case_id)


async def test_device_1547(serve_image):  # noqa: F811
    simulator = await serve_image(DEVICE_1547)
    endpoint = ModbusEndpoint(EndpointSettings(host="127.0.0.1", port=simulator.port,
                                               timeout=0.5))
    poller = UnitPoller(endpoint, 1, address_label=simulator.address)
    try:
        poll = await poller.poll()
    finally:
        await close(endpoint)
    assert poll.state == DeviceState.ONLINE
    assert poll.device.manufacturer == "SunSpecTest"
    assert poll.device.serial == "sn-123456789"
    assert poll.device.device_id == "sn-123456789"
    assert poll.values["701.W"] == 9800.0
    assert poll.values["701.Hz"] == 60.01
    assert poll.values["701.PF"] == 0.985
    assert poll.values["701.TotWhInj"] == 150000.0
