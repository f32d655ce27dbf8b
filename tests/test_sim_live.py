"""Live simulator values: the power curve and the counters, read over a real socket."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from edge_agent.decode import words_to_int
from edge_agent.images import load_image
from edge_agent.sim_live import LivePoint, LiveSite, day_curve, find_live_models
from sim_fixtures import serve_image  # noqa: F401

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo"
BRAVO = DEMO / "site-bravo.json"  # 103 inverter on unit 1, 203 meter on unit 240
ALPHA = DEMO / "site-alpha-1547.json"  # 701 with TotWh_SF = 3 (kWh)
CHARLIE = DEMO / "site-charlie.json"  # 113 float inverter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client_for():
    clients = []

    async def connect(port: int) -> AsyncModbusTcpClient:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
        assert await client.connect()
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


async def read(client: AsyncModbusTcpClient, address: int, count: int, unit: int = 1):
    response = await client.read_holding_registers(address, count=count, device_id=unit)
    assert not response.isError()
    return response.registers


def test_day_curve_shape():
    assert day_curve(0.0, 300.0) == 1.0
    assert day_curve(150.0, 300.0) == pytest.approx(0.15)
    assert day_curve(75.0, 300.0) == pytest.approx(0.575)
    assert day_curve(300.0, 300.0) == pytest.approx(1.0)


def test_find_models_per_image():
    found = {
        path.name: [(m.unit, m.model_id) for m in find_live_models(load_image(path))]
        for path in (ALPHA, BRAVO, CHARLIE)
    }

    assert found["site-alpha-1547.json"] == [(1, 701)]
    assert found["site-bravo.json"] == [(1, 103), (240, 203)]
    assert found["site-charlie.json"] == [(1, 113)]


def test_find_models_addresses():
    inverter, meter = find_live_models(load_image(BRAVO))

    assert inverter.power == LivePoint("W", 40083, "int16", 1, 0)
    assert inverter.positive_counter == LivePoint("WH", 40093, "acc32", 2, 0)
    assert inverter.negative_counter is None
    assert inverter.initial_power == 2773.0
    assert meter.negative_counter == LivePoint("TotWhExp", 40107, "acc32", 2, 0)
    assert meter.initial_energy == (8234567.0, 5123456.0)


def test_encode_clamps_and_floors():
    power = LivePoint("W", 0, "int16", 1, 1)
    counter = LivePoint("WH", 0, "acc32", 2, 3)

    assert power.encode(-1654.0) == [0x10000 - 165]
    assert power.encode(1e9) == [0x7FFF]
    assert counter.encode(151_999.9, counter=True) == [0, 151]
    assert counter.encode(1e20, counter=True) == [0xFFFF, 0xFFFF]


async def test_update_integer_words(serve_image, client_for):
    simulator = await serve_image(BRAVO)
    client = await client_for(simulator.port)
    clock = FakeClock()
    live = LiveSite(simulator, period=300.0, noise=0.0, clock=clock)

    clock.now += 75.0
    await live.update()

    # 2773 W x 0.575 = 1594.475 rounds to 1594; WH 75438296 + 2773 W x 75 s = +57.8 Wh.
    assert await read(client, 40083, 1) == [1594]
    assert await read(client, 40093, 2) == [0x047F, 0x1911]  # 75438353
    # Meter: -2870 W x 0.575 = -1650 W; export 5123456 + 2870 W x 75 s = +59.8 Wh.
    assert await read(client, 40087, 1, unit=240) == [0x10000 - 1650]
    assert await read(client, 40107, 2, unit=240) == [0x004E, 0x2DBB]  # 5123515
    assert await read(client, 40115, 2, unit=240) == [0x007D, 0xA647]  # 8234567


async def test_update_float_words(serve_image, client_for):
    simulator = await serve_image(CHARLIE)
    client = await client_for(simulator.port)
    clock = FakeClock()
    live = LiveSite(simulator, period=300.0, noise=0.0, clock=clock)

    clock.now += 75.0
    await live.update()

    # 640 W x 0.575 = 368 W.
    assert await read(client, 40091, 2) == [0x43B8, 0x0000]
    # 8123456 Wh + 640 W x 75 s = 8123469.33 Wh, nearest float32 8123469.5.
    assert await read(client, 40101, 2) == [0x4AF7, 0xE89B]


async def test_update_kwh_counter_waits_for_step(serve_image, client_for):
    simulator = await serve_image(ALPHA)
    client = await client_for(simulator.port)
    clock = FakeClock()
    live = LiveSite(simulator, period=1e12, noise=0.0, clock=clock)

    clock.now += 60.0
    await live.update()
    after_minute = await read(client, 40089, 4)
    clock.now += 360.0
    await live.update()

    # 9800 W x 60 s = 163 Wh stays below one kWh step; 420 s in all make 1143 Wh.
    assert after_minute == [0, 0, 0, 150]
    assert await read(client, 40089, 4) == [0, 0, 0, 151]
    assert await read(client, 40080, 1) == [9800]


async def test_counters_never_decrease(serve_image, client_for):
    simulator = await serve_image(BRAVO)
    client = await client_for(simulator.port)
    clock = FakeClock()
    rng = random.Random(7)
    live = LiveSite(simulator, period=120.0, noise=0.5, rng=rng, clock=clock)
    counters = [(1, 40093), (240, 40107), (240, 40115)]
    last = {c: words_to_int(await read(client, c[1], 2, unit=c[0])) for c in counters}
    first = dict(last)

    for _ in range(100):
        clock.now += rng.uniform(0.1, 5.0)
        await live.update()
        for unit, address in counters:
            value = words_to_int(await read(client, address, 2, unit=unit))
            assert value >= last[unit, address]
            last[unit, address] = value

    assert last[1, 40093] > first[1, 40093]
    assert last[240, 40107] > first[240, 40107]
    assert last[240, 40115] == first[240, 40115]
