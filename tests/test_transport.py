"""ModbusEndpoint against the simulator over real sockets and pseudo-terminals."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct

import pytest

from edge_agent.endpoint import EndpointSettings
from edge_agent.images import LinkBehaviour, SiteImage
from edge_agent.retry import Backoff
from edge_agent.simulator import Simulator
from edge_agent.transport import (
    ModbusConnectionRefused,
    ModbusDisconnected,
    ModbusEndpoint,
    ModbusError,
    ModbusExceptionResponse,
    ModbusMalformedResponse,
    ModbusTimeout,
    split_read,
)
from sim_fixtures import load_case, null_modem, serve_image  # noqa: F401

TIMEOUT = 0.2
SUNS = [0x5375, 0x6E53]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tcp(port: int, **settings: object) -> ModbusEndpoint:
    options = {"transport": "tcp", "host": "127.0.0.1", "port": port,
               "timeout": TIMEOUT} | settings
    return ModbusEndpoint(EndpointSettings(**options))  # type: ignore[arg-type]


def with_link(image: SiteImage, **link: object) -> SiteImage:
    return dataclasses.replace(image, link=LinkBehaviour(**link))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_split_read():
    assert split_read(40000, 120, 50) == [(40000, 50), (40050, 50), (40100, 20)]
    assert split_read(40000, 50, 50) == [(40000, 50)]
    assert split_read(0, 1, 125) == [(0, 1)]


async def test_read_holding(serve_image):
    simulator = await serve_image("C06")
    endpoint = tcp(simulator.port)

    assert await endpoint.read(1, 40000, 4) == [*SUNS, 1, 0x41]
    assert await endpoint.read(240, 40069, 1) == [203]
    await endpoint.close()


async def test_read_input(serve_image):
    simulator = await serve_image("C01a")
    endpoint = tcp(simulator.port)

    assert await endpoint.read(3, 30775, 2, function_code=4) == [0x0000, 0x0992]
    await endpoint.close()


async def test_split_long_read(serve_image):
    image = load_case("C10")
    simulator = await serve_image(image)
    endpoint = tcp(simulator.port, max_registers=50)

    words = await endpoint.read(1, 40000, 300)

    assert words == image.device(1).read("holding", 40000, 300)
    await endpoint.close()


async def test_read_over_device_limit(serve_image):
    simulator = await serve_image("C10")
    endpoint = tcp(simulator.port)

    with pytest.raises(ModbusExceptionResponse) as caught:
        await endpoint.read(1, 40000, 51)

    assert caught.value.code == 2
    assert str(caught.value) == (
        f"127.0.0.1:{simulator.port} unit 1: read 40000 count 51 (FC3): "
        "device responded with exception 2 (illegal data address)"
    )
    assert caught.value.unit == 1
    assert caught.value.address == 40000
    assert caught.value.count == 51
    assert endpoint.connected
    await endpoint.close()


async def test_exception_11_absent_unit(serve_image):
    simulator = await serve_image("C06")
    endpoint = tcp(simulator.port)

    with pytest.raises(ModbusExceptionResponse) as caught:
        await endpoint.read(2, 40000, 2)

    assert caught.value.code == 11
    assert await endpoint.read(1, 40000, 2) == SUNS
    await endpoint.close()


async def test_timeout_keeps_connection(serve_image):
    simulator = await serve_image(with_link(load_case("C06"), absent_units="timeout"))
    endpoint = tcp(simulator.port)

    with pytest.raises(ModbusTimeout) as caught:
        await endpoint.read(2, 40000, 2)

    assert str(caught.value).startswith(
        f"127.0.0.1:{simulator.port} unit 2: read 40000 count 2 (FC3): "
        "no response within 0.2 s"
    )
    assert endpoint.connected
    assert await endpoint.read(1, 40000, 2) == SUNS
    assert simulator.clients == 1
    await endpoint.close()


async def test_request_gap(serve_image):
    simulator = await serve_image(with_link(load_case("C03"), min_gap_ms=150))
    endpoint = tcp(simulator.port, request_gap=0.16)

    for _ in range(3):
        assert await endpoint.read(1, 40000, 2) == SUNS
    await endpoint.close()


async def test_no_gap_stays_busy(serve_image):
    simulator = await serve_image(with_link(load_case("C03"), min_gap_ms=150))
    endpoint = tcp(simulator.port)
    await endpoint.read(1, 40000, 2)

    with pytest.raises(ModbusExceptionResponse) as caught:
        await endpoint.read(1, 40000, 2)

    assert caught.value.code == 6
    await endpoint.close()


async def test_busy_retried(serve_image):
    simulator = await serve_image(with_link(load_case("C03"), min_gap_ms=50))
    endpoint = tcp(simulator.port)

    assert await endpoint.read(1, 40000, 2) == SUNS
    assert await endpoint.read(1, 40000, 2) == SUNS
    await endpoint.close()


async def test_connect_delay(serve_image):
    image = with_link(load_case("C03"), ignore_requests_within_ms_of_connect=100)
    simulator = await serve_image(image)
    endpoint = tcp(simulator.port, connect_delay=0.12)

    assert await endpoint.read(1, 40000, 2) == SUNS
    await endpoint.close()


async def test_no_connect_delay_times_out(serve_image):
    image = with_link(load_case("C03"), ignore_requests_within_ms_of_connect=300)
    simulator = await serve_image(image)
    endpoint = tcp(simulator.port)

    with pytest.raises(ModbusTimeout):
        await endpoint.read(1, 40000, 2)
    await endpoint.close()


async def test_refused_then_backoff(caplog):
    caplog.set_level(logging.INFO, logger="edge_agent.transport")
    clock = FakeClock()
    port = free_port()
    settings = EndpointSettings(host="127.0.0.1", port=port, timeout=TIMEOUT)
    endpoint = ModbusEndpoint(settings, backoff=Backoff(1.0, 1.0), clock=clock)

    with pytest.raises(ModbusConnectionRefused) as caught:
        await endpoint.read(1, 40000, 2)
    assert str(caught.value) == (
        f"127.0.0.1:{port}: connection refused; check the port, and that no other "
        "client holds the device's only connection"
    )

    async with Simulator(load_case("C03"), port=port):
        with pytest.raises(ModbusConnectionRefused, match="next attempt in"):
            await endpoint.read(1, 40000, 2)  # not due yet: no connect attempt
        clock.now += 1.0
        assert await endpoint.read(1, 40000, 2) == SUNS
        await endpoint.close()

    messages = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "edge_agent.transport"
    ]
    assert messages == [
        ("WARNING", f"{caught.value}; retrying with backoff"),
        ("INFO", f"127.0.0.1:{port}: connected again after 1 failed attempts"),
    ]


async def test_reconnect_after_restart(caplog):
    caplog.set_level(logging.WARNING, logger="edge_agent.transport")
    clock = FakeClock()
    simulator = Simulator(load_case("C03"))
    await simulator.start()
    settings = EndpointSettings(host="127.0.0.1", port=simulator.port, timeout=TIMEOUT)
    endpoint = ModbusEndpoint(settings, backoff=Backoff(1.0, 1.0), clock=clock)
    assert await endpoint.read(1, 40000, 2) == SUNS

    await simulator.stop()
    with pytest.raises((ModbusDisconnected, ModbusConnectionRefused)):
        await endpoint.read(1, 40000, 2)
    for _ in range(3):
        with pytest.raises(ModbusConnectionRefused):
            await endpoint.read(1, 40000, 2)

    async with simulator:
        clock.now += 1.0
        assert await endpoint.read(1, 40000, 2) == SUNS
        await endpoint.close()
    warnings = [
        r for r in caplog.records
        if r.name == "edge_agent.transport" and r.levelname == "WARNING"
    ]
    assert len(warnings) == 1


async def test_one_connection_for_units(serve_image):
    simulator = await serve_image("C08")
    endpoint = tcp(simulator.port)

    results = await asyncio.gather(*(endpoint.read(1, 40000 + i, 1) for i in range(5)))

    assert [words[0] for words in results[:2]] == SUNS
    assert simulator.clients == 1
    await endpoint.close()


async def test_second_client_refused(serve_image):
    simulator = await serve_image("C08")
    holder = tcp(simulator.port)
    await holder.read(1, 40000, 2)

    with pytest.raises(ModbusConnectionRefused):
        await tcp(simulator.port).read(1, 40000, 2)
    await holder.close()


async def test_close_after_poll(serve_image):
    simulator = await serve_image("C03")
    endpoint = tcp(simulator.port, close_after_poll=True)

    assert await endpoint.read(1, 40000, 2) == SUNS
    await endpoint.end_poll()
    assert not endpoint.connected
    assert await endpoint.read(1, 40000, 2) == SUNS
    assert endpoint.connected
    await endpoint.close()


async def test_end_poll_keeps_connection(serve_image):
    simulator = await serve_image("C03")
    endpoint = tcp(simulator.port)
    await endpoint.read(1, 40000, 2)

    await endpoint.end_poll()

    assert endpoint.connected
    await endpoint.close()


async def test_rtu_over_tcp(serve_image):
    simulator = await serve_image("C06", framer="rtu-over-tcp")
    endpoint = tcp(simulator.port, transport="rtu-over-tcp")

    assert await endpoint.read(240, 40000, 4) == [*SUNS, 1, 0x41]
    with pytest.raises(ModbusExceptionResponse):
        await endpoint.read(5, 40000, 2)
    await endpoint.close()


async def test_rtu_serial(null_modem):
    device_end, agent_end = null_modem
    image = with_link(load_case("C06"), absent_units="timeout")
    settings = EndpointSettings(
        transport="rtu", serial_port=agent_end, baudrate=9600, timeout=TIMEOUT
    )
    endpoint = ModbusEndpoint(settings)

    async with Simulator(image, framer="rtu", serial_port=device_end):
        assert await endpoint.read(1, 40000, 4) == [*SUNS, 1, 0x41]
        assert await endpoint.read(240, 40069, 1) == [203]
        with pytest.raises(ModbusTimeout, match=f"^{agent_end} unit 5: read 40000"):
            await endpoint.read(5, 40000, 2)
        await endpoint.close()


async def test_serial_port_missing(tmp_path):
    path = tmp_path / "ttyUSB9"
    settings = EndpointSettings(transport="rtu", serial_port=str(path), timeout=TIMEOUT)
    endpoint = ModbusEndpoint(settings)

    with pytest.raises(ModbusDisconnected, match=f"^{path}: cannot connect: "):
        await endpoint.read(1, 40000, 2)


@pytest.mark.parametrize(
    ("unit", "address", "count", "function_code", "message"),
    [
        (1, 40000, 0, 3, "read of 0 registers at 40000 is outside"),
        (1, 65535, 2, 3, "read of 2 registers at 65535 is outside"),
        (256, 0, 1, 3, "unit id 256 is out of range"),
        (1, 0, 1, 6, "function code 6 is not a register read"),
    ],
)
async def test_invalid_read(unit, address, count, function_code, message):
    endpoint = tcp(free_port())

    with pytest.raises(ModbusError, match=message):
        await endpoint.read(unit, address, count, function_code)
    assert not endpoint.connected


def test_backoff_delay_capped():
    backoff = Backoff(initial=1.0, maximum=4.0)

    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        for _ in range(20):
            assert 0.0 <= backoff.delay(attempt) <= ceiling


def read_response(request: bytes, fault: str) -> bytes:
    """Build the MBAP frame answering an FC3 request with registers of value 1.

    `fault` "length" lowers the MBAP length below the PDU, "count" raises the byte
    count above the registers sent, and "" builds a valid frame.
    """
    count = int.from_bytes(request[10:12], "big")
    byte_count = count * 2 + (20 if fault == "count" else 0)
    pdu = bytes([3, byte_count]) + b"\x00\x01" * count
    length = 2 if fault == "length" else len(pdu) + 1
    return request[:2] + b"\x00\x00" + struct.pack(">H", length) + request[6:7] + pdu


async def serve_malformed(fault: str) -> tuple[asyncio.Server, list[str]]:
    """Serve malformed frames on the first connection and valid ones after it."""
    connections: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        connections.append(fault if not connections else "")
        current = connections[-1]
        while request := await reader.read(260):
            writer.write(read_response(request, current))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


@pytest.mark.parametrize("fault", ["length", "count"])
async def test_malformed_frame_is_modbus_error(fault, caplog):
    server, connections = await serve_malformed(fault)
    port = server.sockets[0].getsockname()[1]
    endpoint = tcp(port)

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        with pytest.raises(ModbusMalformedResponse) as caught:
            await endpoint.read(1, 40000, 2)
        assert not endpoint.connected
        assert await endpoint.read(1, 40000, 2) == [1, 1]

    assert str(caught.value) == (
        f"127.0.0.1:{port} unit 1: read 40000 count 2 (FC3): malformed response, its "
        "length fields do not match its data; closed the connection, reconnecting on "
        "the next read")
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    assert connections == [fault, ""]
    await endpoint.close()
    server.close()
    await server.wait_closed()
