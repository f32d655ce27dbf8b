"""The Modbus simulator, checked with pymodbus clients over real sockets and ttys."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import signal
import sys

import pytest
from click.testing import CliRunner
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from edge_agent.cli import main
from edge_agent.images import DeviceImage, ImageError, LinkBehaviour, SiteImage, Step
from edge_agent.simulator import Simulator, SimulatorError
from sim_fixtures import (  # noqa: F401
    CASES,
    DEVICE_1547,
    load_case,
    null_modem,
    serve_image,
)

TIMEOUT = 0.2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def connect(port: int, framer: FramerType = FramerType.SOCKET):
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, framer=framer, timeout=TIMEOUT, retries=0,
        reconnect_delay=0,
    )
    assert await client.connect()
    return client


async def read(client, address: int, count: int, unit: int = 1):
    """Return the registers read, or the exception code the device answered."""
    response = await client.read_holding_registers(address, count=count, device_id=unit)
    return response.exception_code if response.isError() else response.registers


def with_link(image: SiteImage, **link: object) -> SiteImage:
    return dataclasses.replace(image, link=LinkBehaviour(**link))


async def test_registers_per_unit(serve_image):
    simulator = await serve_image("C06")
    client = await connect(simulator.port)

    assert await read(client, 40000, 4, unit=1) == [0x5375, 0x6E53, 1, 0x41]
    assert await read(client, 40000, 4, unit=240) == [0x5375, 0x6E53, 1, 0x41]
    assert await read(client, 40069, 1, unit=240) == [203]
    client.close()


async def test_input_registers(serve_image):
    simulator = await serve_image("C01a")
    client = await connect(simulator.port)

    response = await client.read_input_registers(30775, count=2, device_id=3)

    assert response.registers == [0x0000, 0x0992]
    client.close()


async def test_unmapped_exception_2(serve_image):
    simulator = await serve_image("C04a")
    client = await connect(simulator.port)

    assert await read(client, 40479, 1, unit=71) == [0]
    assert await read(client, 40479, 2, unit=71) == 2
    assert await read(client, 0, 1, unit=71) == 2
    client.close()


async def test_unmapped_timeout(serve_image):
    image = load_case("C03")
    device = dataclasses.replace(image.devices[0], unmapped="timeout")
    simulator = await serve_image(dataclasses.replace(image, devices=(device,)))
    client = await connect(simulator.port)

    with pytest.raises(ModbusIOException):
        await read(client, 0, 1)
    assert await read(client, 40000, 2) == [0x5375, 0x6E53]
    client.close()


async def test_max_registers_per_read(serve_image):
    simulator = await serve_image("C10")
    client = await connect(simulator.port)

    assert len(await read(client, 40000, 50)) == 50
    assert await read(client, 40000, 51) == 2
    client.close()


async def test_exception_range(serve_image):
    simulator = await serve_image("C05")
    client = await connect(simulator.port)

    assert await read(client, 41161, 2, unit=126) == 2
    assert await read(client, 41150, 20, unit=126) == 2
    assert await read(client, 41161, 1, unit=126) == [714]
    assert await read(client, 41163, 3, unit=126) == [0xFFFF, 0xFFFF, 3]
    client.close()


async def test_absent_unit_exception_11(serve_image):
    simulator = await serve_image("C06")
    client = await connect(simulator.port)

    assert await read(client, 40000, 2, unit=2) == 11
    client.close()


async def test_absent_unit_timeout(serve_image):
    image = with_link(load_case("C06"), absent_units="timeout")
    simulator = await serve_image(image)
    client = await connect(simulator.port)

    with pytest.raises(ModbusIOException):
        await read(client, 40000, 2, unit=2)
    assert await read(client, 40000, 2, unit=240) == [0x5375, 0x6E53]
    client.close()


async def test_min_gap_exception_6(serve_image):
    clock = FakeClock()
    simulator = await serve_image("C09", clock=clock)
    clock.now += 1.0  # past the window after connect
    client = await connect(simulator.port)
    clock.now += 1.0

    assert await read(client, 40000, 2) == [0x5375, 0x6E53]
    clock.now += 0.040
    assert await read(client, 40000, 2) == 6
    clock.now += 0.040  # the busy reply counts as the last reply
    assert await read(client, 40000, 2) == 6
    clock.now += 0.060
    assert await read(client, 40000, 2) == [0x5375, 0x6E53]
    client.close()


async def test_ignore_after_connect(serve_image):
    clock = FakeClock()
    simulator = await serve_image("C09", clock=clock)
    client = await connect(simulator.port)

    clock.now += 0.999
    with pytest.raises(ModbusIOException):
        await read(client, 40000, 2)
    clock.now += 0.001
    assert await read(client, 40000, 2) == [0x5375, 0x6E53]
    client.close()


async def wait_until(condition, attempts: int = 100) -> None:
    """Let the event loop run until `condition()` holds, at most ~1 s."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_max_clients_refuses_second(serve_image):
    simulator = await serve_image("C08")
    first = await connect(simulator.port)
    await wait_until(lambda: simulator.clients == 1)

    with pytest.raises(ConnectionRefusedError) as refused:
        await asyncio.open_connection("127.0.0.1", simulator.port)
    assert refused.value.errno == errno.ECONNREFUSED
    assert await read(first, 40000, 2) == [0x5375, 0x6E53]

    first.close()
    await wait_until(lambda: simulator.clients == 0)
    second = await asyncio.wait_for(_connect_when_listening(simulator.port), 1)
    assert await read(second, 40000, 2) == [0x5375, 0x6E53]
    second.close()


async def _connect_when_listening(port: int):
    while True:
        try:
            return await connect(port)
        except AssertionError:
            await asyncio.sleep(0.01)


async def test_unlimited_clients(serve_image):
    simulator = await serve_image("C03")
    clients = [await connect(simulator.port) for _ in range(3)]

    for client in clients:
        assert await read(client, 40000, 2) == [0x5375, 0x6E53]
        client.close()


async def test_apply_step(serve_image):
    simulator = await serve_image("C13")
    client = await connect(simulator.port)
    before = await read(client, 40083, 1)

    await simulator.apply_step(1)
    assert await read(client, 40083, 1) == [0x0415]
    assert await read(client, 40272, 3) == [0x00A0, 0xA122, 0x19C8]
    await simulator.apply_step(0)
    assert await read(client, 40083, 1) == before
    assert before != [0x0415]
    client.close()


async def test_apply_step_before_start():
    simulator = Simulator(load_case("C13"))
    await simulator.apply_step(1)

    async with simulator:
        client = await connect(simulator.port)
        assert await read(client, 40083, 1) == [0x0415]
        client.close()


async def test_apply_step_out_of_range(serve_image):
    simulator = await serve_image("C13")

    with pytest.raises(ImageError, match="C13: no step 2; the image has 2 steps"):
        await simulator.apply_step(2)


async def test_write_while_serving(serve_image):
    simulator = await serve_image("C06")
    client = await connect(simulator.port)

    await simulator.write(240, 40070, [0x1234, 0xABCD])

    assert await read(client, 40069, 3, unit=240) == [203, 0x1234, 0xABCD]
    assert await read(client, 40069, 2, unit=1) == [103, 0x0032]
    client.close()


async def test_write_input_table(serve_image):
    simulator = await serve_image("C01a")
    client = await connect(simulator.port)

    await simulator.write(3, 30775, [0x0001, 0x0002], table="input")
    response = await client.read_input_registers(30775, count=2, device_id=3)

    assert response.registers == [0x0001, 0x0002]
    client.close()


async def test_write_outside_image(serve_image):
    simulator = await serve_image("C06")

    with pytest.raises(ImageError, match="holding registers 39999 count 2 are not"):
        await simulator.write(1, 39999, [0, 0])
    with pytest.raises(ImageError, match="word 65536 at holding register 40070"):
        await simulator.write(1, 40070, [65536])
    with pytest.raises(ImageError, match="no device with unit id 7"):
        await simulator.write(7, 40070, [0])


async def test_write_before_start():
    simulator = Simulator(load_case("C06"))

    with pytest.raises(SimulatorError, match="is not serving; start it"):
        await simulator.write(1, 40070, [0])


async def test_silent_step(serve_image):
    image = load_case("C06")
    steps = (Step(unit=1, silent=True), Step(unit=1))
    simulator = await serve_image(dataclasses.replace(image, steps=steps))
    client = await connect(simulator.port)

    await simulator.apply_step(0)
    with pytest.raises(ModbusIOException):
        await read(client, 40000, 2, unit=1)
    assert await read(client, 40000, 2, unit=240) == [0x5375, 0x6E53]
    await simulator.apply_step(1)
    assert await read(client, 40000, 2, unit=1) == [0x5375, 0x6E53]
    client.close()


async def test_sunspec_device_image(serve_image):
    simulator = await serve_image(DEVICE_1547)
    client = await connect(simulator.port)

    assert await read(client, 40070, 2) == [701, 153]
    assert await read(client, 40080, 1) == [9800]
    client.close()


async def test_coils_illegal_function(serve_image):
    simulator = await serve_image("C03")
    client = await connect(simulator.port)

    response = await client.read_coils(0, count=1, device_id=1)

    assert response.exception_code == 1
    client.close()


async def test_rtu_over_tcp(serve_image):
    simulator = await serve_image("C06", framer="rtu-over-tcp")
    client = await connect(simulator.port, framer=FramerType.RTU)

    assert await read(client, 40000, 2, unit=240) == [0x5375, 0x6E53]
    assert await read(client, 40000, 2, unit=5) == 11
    client.close()


async def test_rtu_serial(null_modem):
    device_end, agent_end = null_modem
    image = with_link(load_case("C06"), absent_units="timeout")
    async with Simulator(image, framer="rtu", serial_port=device_end):
        client = AsyncModbusSerialClient(
            agent_end, framer=FramerType.RTU, baudrate=9600, timeout=TIMEOUT,
            retries=0, reconnect_delay=0,
        )
        assert await client.connect()

        assert await read(client, 40000, 4, unit=1) == [0x5375, 0x6E53, 1, 0x41]
        assert await read(client, 40069, 1, unit=240) == [203]
        with pytest.raises(ModbusIOException):
            await read(client, 40000, 2, unit=5)
        client.close()


async def test_restart_same_port():
    simulator = Simulator(load_case("C03"))
    await simulator.start()
    port = simulator.port
    await simulator.stop()

    async with simulator:
        assert simulator.port == port
        client = await connect(port)
        assert await read(client, 40000, 2) == [0x5375, 0x6E53]
        client.close()


async def test_port_in_use(serve_image):
    simulator = await serve_image("C03")

    message = f"cannot serve on 127.0.0.1:{simulator.port}"
    with pytest.raises(SimulatorError, match=message):
        await Simulator(load_case("C03"), port=simulator.port).start()


def test_rtu_needs_serial_port():
    image = SiteImage("x", (DeviceImage(unit=1),))

    with pytest.raises(SimulatorError, match="needs a serial_port"):
        Simulator(image, framer="rtu")


async def test_cli_simulate_serves_until_sigterm():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", "simulate", str(DEVICE_1547),
        str(CASES / "C01a.json"), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
            for _ in range(3)
        ]
        port = int(lines[0].split(" on 127.0.0.1:")[1].split()[0])
        assert lines == [
            f"serving device_1547 as unit 1 on 127.0.0.1:{port} (tcp)\n",
            f"serving C01a as unit 126 on 127.0.0.1:{port} (tcp)\n",
            f"serving C01a as unit 3 on 127.0.0.1:{port} (tcp)\n",
        ]
        client = await connect(port)
        assert await read(client, 40070, 2, unit=1) == [701, 153]
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 10)
    assert returncode == 0


def test_cli_simulate_unit_clash():
    result = CliRunner().invoke(
        main, ["simulate", str(DEVICE_1547), str(CASES / "C06.json"), "--port", "0"]
    )

    assert result.exit_code == 2
    assert result.output == (
        "error: unit id 1 is used by both device_1547 and C06; "
        "serve them on separate ports\n"
    )
