"""Bad input over real HTTP: each gets a JSON error naming the fault, never a 500."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from collector import ingest
from conftest import CollectorDatabases
from collector_http import READINGS_A, Fleet, add_fleet, make_batch, post, start_client

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config())
    yield client
    await client.close()


def batch_with(**changes: Any) -> dict[str, Any]:
    data = make_batch("gw-a", READINGS_A)
    device = changes.pop("device", {})
    data["devices"][0] |= device
    return data | changes


BAD_TEXT = [
    (batch_with(batch_id="b\x00"), "batch_id 'b\\x00'"),
    (batch_with(batch_id="\ud800"), "batch_id '\\ud800'"),
    (batch_with(device={"name": "inverter\x00"}), "devices[0].name 'inverter\\x00'"),
    (
        batch_with(device={"manufacturer": "Fronius\x00"}),
        "devices[0].manufacturer 'Fronius\\x00'",
    ),
]


@pytest.mark.parametrize(("data", "field"), BAD_TEXT)
async def test_control_text_400(
    client: TestClient, fleet: Fleet, data: dict[str, Any], field: str
) -> None:
    status, reply = await post(client, fleet.token_a, data)

    assert status == 400
    assert reply["error"].startswith(f"{field} contains the control character")


async def test_device_id_nul_400(client: TestClient, fleet: Fleet) -> None:
    readings = [["sn\x001", "701.W", READINGS_A[0][2], 1.0]]

    status, reply = await post(client, fleet.token_a, make_batch("gw-a", readings))

    assert status == 400
    assert reply["error"].startswith("devices[0].device_id 'sn\\x001' contains")


@pytest.mark.parametrize("state", [["online"], {"online": True}])
async def test_state_unhashable_400(
    client: TestClient, fleet: Fleet, state: Any
) -> None:
    data = batch_with(states=[["sn-1", READINGS_A[0][2], state]])

    status, reply = await post(client, fleet.token_a, data)

    assert status == 400
    assert reply["error"].startswith(f"states[0]: state {state!r} is unknown")


async def test_unexpected_error_json_500(
    client: TestClient, fleet: Fleet, monkeypatch, caplog
) -> None:
    async def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ingest, "store_batch", broken)
    caplog.set_level(logging.ERROR, logger="collector.app")

    status, reply = await post(client, fleet.token_a, make_batch("gw-a", READINGS_A))

    request_id = caplog.records[-1].getMessage().split("request id ")[1].rstrip(")")
    assert status == 500
    assert reply == {
        "error": f"internal error; see the collector log (request id {request_id})"
    }
    assert len(caplog.records) == 1
    assert caplog.records[0].exc_info is not None
    assert caplog.records[0].getMessage() == (
        f"POST /api/v1/batches failed (request id {request_id})"
    )


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
async def test_utf16_body_400(client: TestClient, fleet: Fleet, encoding: str) -> None:
    data = json.dumps(make_batch("gw-a", READINGS_A)).encode(encoding)

    status, reply = await post(client, fleet.token_a, data)

    assert status == 400
    assert reply["error"].startswith("body is not valid UTF-8")
