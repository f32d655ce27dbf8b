"""The whole path on real parts: simulator -> agent -> collector -> two PostgreSQL shards.

Every hop is real: Modbus TCP on 127.0.0.1, the agent's SQLite buffer file, HTTP with gzip
bodies, and two shard databases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg
import pytest
from aiohttp import web

from collector import catalog
from collector.app import create_app
from edge_agent.agent import run_agent
from edge_agent.buffer import Buffer
from edge_agent.config import load_config
from edge_agent.forwarder import encode_batch
from edge_agent.images import load_image
from edge_agent.poller import UnitPoller
from edge_agent.simulator import Simulator
from edge_agent.transport import ModbusEndpoint
from edge_agent.endpoint import EndpointSettings

pytestmark = pytest.mark.postgres

FIXTURES = Path(__file__).parent / "fixtures"
ARRIVAL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Site:
    """One installation with its gateway token and simulated devices."""

    installation_id: int
    gateway_id: str
    token: str
    simulator: Simulator


@pytest.fixture
async def collector_url(collector_databases) -> AsyncIterator[str]:
    """Base URL of a collector serving on a free 127.0.0.1 port."""
    runner = web.AppRunner(create_app(collector_databases.config()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def _start_site(catalog_dsn: str, owner_id: int, name: str, shard: str,
                      image: Path) -> Site:
    installation = catalog.add_installation(catalog_dsn, name, owner_id, shard=shard)
    gateway_id = f"gw-{name}"
    _, token = catalog.add_gateway(catalog_dsn, gateway_id, installation.id)
    simulator = Simulator(load_image(image), port=0)
    await simulator.start()
    return Site(installation.id, gateway_id, token, simulator)


def _write_agent_config(directory: Path, site: Site, url: str) -> Path:
    units = ", ".join(str(unit) for unit in site.simulator.image.units)
    path = directory / f"{site.gateway_id}.toml"
    path.write_text(
        f'[gateway]\nid = "{site.gateway_id}"\n'
        f'[collector]\nurl = "{url}"\ntoken = "{site.token}"\ninterval = 0.2\n'
        f'[buffer]\npath = "{site.gateway_id}.sqlite"\n'
        f'[[devices]]\nname = "gateway"\nhost = "127.0.0.1"\n'
        f"port = {site.simulator.port}\nunit_ids = [{units}]\npoll_interval = 0.5\n"
        f"timeout = 1.0\n"
    )
    return path


def _latest(shard_dsn: str, installation_id: int) -> dict[str, tuple[float | None, str]]:
    with psycopg.connect(shard_dsn) as conn:
        rows = conn.execute(
            "SELECT name, last_value, unit FROM channels WHERE installation_id = %s",
            (installation_id,),
        ).fetchall()
    return {name: (value, unit) for name, value, unit in rows}


def _count(dsn: str, query: str, *params: object) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


async def _wait_for_channel(shard_dsn: str, installation_id: int, channel: str) -> None:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while time.monotonic() < deadline:
        latest = await asyncio.to_thread(_latest, shard_dsn, installation_id)
        if latest.get(channel, (None,))[0] is not None:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"{channel} of installation {installation_id} did not arrive "
                f"within {ARRIVAL_TIMEOUT} s")


async def test_readings_reach_their_own_shard(collector_databases, collector_url, tmp_path):
    dsn = collector_databases.catalog_dsn
    owner = catalog.add_owner(dsn, "Test Owner")
    alpha = await _start_site(dsn, owner.id, "alpha", "shard-1",
                              FIXTURES / "images" / "device_1547.json")
    bravo = await _start_site(dsn, owner.id, "bravo", "shard-2",
                              FIXTURES / "cases" / "C06.json")
    stop = asyncio.Event()
    agents = [
        asyncio.create_task(run_agent(
            load_config(_write_agent_config(tmp_path, site, collector_url)), stop))
        for site in (alpha, bravo)
    ]
    shard_1 = collector_databases.shard_dsn("shard-1")
    shard_2 = collector_databases.shard_dsn("shard-2")
    try:
        await _wait_for_channel(shard_1, alpha.installation_id, "701.TotWhInj")
        await _wait_for_channel(shard_2, bravo.installation_id, "203.TotWhImp")
    finally:
        stop.set()
        await asyncio.gather(*agents)
        await alpha.simulator.stop()
        await bravo.simulator.stop()

    latest = _latest(shard_1, alpha.installation_id)
    assert latest["701.W"] == (9800.0, "W")
    assert latest["701.Hz"] == (60.01, "Hz")
    assert latest["701.PF"][0] == 0.985
    assert latest["701.TotWhInj"] == (150000.0, "Wh")
    with psycopg.connect(shard_1) as conn:
        device = conn.execute(
            "SELECT manufacturer, serial, device_id FROM devices WHERE installation_id = %s",
            (alpha.installation_id,),
        ).fetchone()
    assert device == ("SunSpecTest", "sn-123456789", "sn-123456789")

    bravo_latest = _latest(shard_2, bravo.installation_id)
    assert bravo_latest["103.W"] == (2773.0, "W")
    assert bravo_latest["203.W"] == (-2870.0, "W")
    assert bravo_latest["203.TotWhImp"] == (8234567.0, "Wh")

    # Each installation's rows live only on its own shard.
    for table in ("devices", "channels", "readings"):
        query = f"SELECT count(*) FROM {table} WHERE installation_id = %s"
        assert _count(shard_1, query, bravo.installation_id) == 0
        assert _count(shard_2, query, alpha.installation_id) == 0
        assert _count(shard_1, query, alpha.installation_id) > 0
        assert _count(shard_2, query, bravo.installation_id) > 0


async def _polled_batch_body(tmp_path: Path, simulator: Simulator, gateway_id: str
                             ) -> bytes:
    """Poll a simulated device once through the agent's own path and encode the batch."""
    endpoint = ModbusEndpoint(EndpointSettings(host="127.0.0.1", port=simulator.port,
                                               timeout=1.0))
    try:
        poll = await UnitPoller(endpoint, 1, address_label=simulator.address).poll()
    finally:
        await endpoint.close()
    with Buffer(tmp_path / "resend.sqlite") as buffer:
        buffer.add_poll(poll)
        batch = buffer.next_batch(10_000)
    assert batch is not None
    return encode_batch(batch, gateway_id)


async def _post(url: str, token: str, body: bytes) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}", "Content-Encoding": "gzip",
               "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/v1/batches", data=body,
                                headers=headers) as response:
            return response.status, await response.json()


async def test_resent_batch_stored_once(collector_databases, collector_url, tmp_path):
    dsn = collector_databases.catalog_dsn
    owner = catalog.add_owner(dsn, "Test Owner")
    alpha = await _start_site(dsn, owner.id, "alpha", "shard-1",
                              FIXTURES / "images" / "device_1547.json")
    try:
        body = await _polled_batch_body(tmp_path, alpha.simulator, alpha.gateway_id)
    finally:
        await alpha.simulator.stop()
    shard_1 = collector_databases.shard_dsn("shard-1")
    readings = "SELECT count(*) FROM readings WHERE installation_id = %s"

    first_status, first = await _post(collector_url, alpha.token, body)
    stored = _count(shard_1, readings, alpha.installation_id)
    second_status, second = await _post(collector_url, alpha.token, body)

    assert first_status == 200
    assert first["stored"] == stored
    assert stored > 100
    assert second_status == 200
    assert second["stored"] == 0
    assert _count(shard_1, readings, alpha.installation_id) == stored


async def test_token_cannot_write_other_installation(collector_databases, collector_url,
                                                     tmp_path):
    dsn = collector_databases.catalog_dsn
    owner = catalog.add_owner(dsn, "Test Owner")
    alpha = await _start_site(dsn, owner.id, "alpha", "shard-1",
                              FIXTURES / "images" / "device_1547.json")
    bravo = await _start_site(dsn, owner.id, "bravo", "shard-2",
                              FIXTURES / "cases" / "C06.json")
    try:
        # Alpha's token on a batch that claims to come from bravo's gateway.
        body = await _polled_batch_body(tmp_path, alpha.simulator, bravo.gateway_id)
    finally:
        await alpha.simulator.stop()
        await bravo.simulator.stop()

    status, reply = await _post(collector_url, alpha.token, body)

    assert status == 403
    assert "gw-bravo" in reply["error"]
    for shard in collector_databases.shards:
        assert _count(shard.dsn, "SELECT count(*) FROM readings") == 0
        assert _count(shard.dsn, "SELECT count(*) FROM devices") == 0
