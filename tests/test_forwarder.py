"""Forwarder against a real aiohttp collector on 127.0.0.1."""

import asyncio
import json
import logging

import pytest

from edge_agent.buffer import Buffer
from edge_agent.config import CollectorConfig
from edge_agent.errors import CollectorUnavailable
from edge_agent.forwarder import Forwarder, Outcome
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll
from edge_agent.retry import Backoff
from fake_collector import (
    TOKEN,
    FakeCollector,
    free_port,
    parse_with_collector,
    stop_after,
)

INVERTER = DeviceInfo(device_id="sn-1", address="127.0.0.1:5020/1", name="inverter",
                      manufacturer="SunSpecTest", model="Test-1547-1", serial="sn-1",
                      version="1.2.3")
FAST = Backoff(initial=0.001, maximum=0.01)
LIMIT = 10.0  # seconds before a test gives up waiting


def poll(time_ms: int) -> Poll:
    return Poll(INVERTER, time_ms, DeviceState.ONLINE,
                values={"701.W": 9800.0, "701.PhVphB": None},
                channels=(Channel("701.W", "W"), Channel("701.PhVphB", "V")))


@pytest.fixture
def buffer(tmp_path):
    with Buffer(tmp_path / "buffer.sqlite", gateway_id="gw-test") as opened:
        yield opened


@pytest.fixture
async def collector():
    fake = FakeCollector()
    await fake.start()
    yield fake
    await fake.stop()


def forwarder_for(buffer: Buffer, url: str, batch_size: int = 100) -> Forwarder:
    settings = CollectorConfig(url=url, token=TOKEN, batch_size=batch_size,
                               interval=0.01, timeout=5.0)
    return Forwarder(buffer, settings, "gw-test", FAST)


async def run_until_stopped(forwarder: Forwarder, stop: asyncio.Event) -> None:
    async with forwarder:
        await asyncio.wait_for(forwarder.run(stop), LIMIT)


class EventOnLog(logging.Handler):
    """Sets an asyncio event when a record at `level` or above arrives."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


async def test_sent_batch_is_deleted(buffer, collector):
    buffer.add_poll(poll(1000))

    async with forwarder_for(buffer, collector.url) as forwarder:
        assert await forwarder.send_once() is Outcome.SENT
        assert await forwarder.send_once() is Outcome.EMPTY

    assert buffer.stats().readings == 0
    assert buffer.next_batch(100) is None


async def test_request_is_wire_format(buffer, collector):
    buffer.add_poll(poll(1000))
    batch_id = buffer.next_batch(100).batch_id

    async with forwarder_for(buffer, collector.url) as forwarder:
        await forwarder.send_once()

    [request] = collector.received
    assert request.authorization == f"Bearer {TOKEN}"
    assert request.content_type == "application/json"
    assert request.content_encoding == "gzip"
    assert request.document == {
        "format": 1,
        "batch_id": batch_id,
        "gateway_id": "gw-test",
        "devices": [{"device_id": "sn-1", "address": "127.0.0.1:5020/1",
                     "name": "inverter", "manufacturer": "SunSpecTest",
                     "model": "Test-1547-1", "serial": "sn-1", "version": "1.2.3"}],
        "channels": [{"device_id": "sn-1", "name": "701.PhVphB", "unit": "V"},
                     {"device_id": "sn-1", "name": "701.W", "unit": "W"}],
        "readings": [["sn-1", "701.PhVphB", 1000, None],
                     ["sn-1", "701.W", 1000, 9800.0]],
        "states": [["sn-1", 1000, "online"]],
        "gaps": [],
    }


async def test_503_keeps_batch_and_id(buffer, collector):
    buffer.add_poll(poll(1000))
    collector.replies = [(503, {"error": "shard 2 unreachable"})] * 5
    stop = asyncio.Event()
    collector.on_request = stop_after(3, stop)

    await run_until_stopped(forwarder_for(buffer, collector.url), stop)

    ids = [request.document["batch_id"] for request in collector.received]
    assert len(ids) == 3
    assert len(set(ids)) == 1
    assert buffer.stats().readings == 2
    assert buffer.quarantined() == []


async def test_503_then_200_deletes(buffer, collector, caplog):
    buffer.add_poll(poll(1000))
    collector.replies = [(503, {"error": "shard 2 unreachable"})] * 2
    stop = asyncio.Event()
    collector.on_request = stop_after(3, stop)

    with caplog.at_level(logging.INFO, logger="edge_agent.forwarder"):
        await run_until_stopped(forwarder_for(buffer, collector.url), stop)

    assert buffer.stats().readings == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"collector {collector.url}/api/v1/batches replied "
                                  "HTTP 503 to batch ")
    assert warnings[0].endswith(" (shard 2 unreachable); retrying with backoff, "
                                "readings stay in the buffer")
    assert (f"collector {collector.url}/api/v1/batches reachable again after 2 "
            "failed attempts") in caplog.messages


async def test_400_quarantines_batch(buffer, collector):
    buffer.add_poll(poll(1000))
    buffer.add_poll(poll(2000))
    collector.replies = [(400, {"error": "readings[0]:\n time is not a number"})]
    stop = asyncio.Event()
    collector.on_request = stop_after(2, stop)

    await run_until_stopped(forwarder_for(buffer, collector.url, batch_size=2), stop)

    # The live lane's batch, with the newest poll, goes first in each cycle.
    rejected, accepted = collector.received
    assert rejected.document["states"] == [["sn-1", 2000, "online"]]
    assert accepted.document["states"] == [["sn-1", 1000, "online"]]
    [entry] = buffer.quarantined()
    assert entry.batch_id == rejected.document["batch_id"]
    assert entry.readings == 2
    assert entry.reason == "HTTP 400: readings[0]: time is not a number"
    assert buffer.stats().readings == 0


async def test_401_retried_not_quarantined(buffer, collector):
    buffer.add_poll(poll(1000))
    collector.replies = [(401, {"error": "unknown token"})]

    async with forwarder_for(buffer, collector.url) as forwarder:
        with pytest.raises(CollectorUnavailable) as caught:
            await forwarder.send_once()

    batch_id = collector.received[0].document["batch_id"]
    assert str(caught.value) == (
        f"collector {collector.url}/api/v1/batches replied HTTP 401 to batch "
        f"{batch_id}: the collector rejected the token; check collector.token "
        "(unknown token)"
    )
    assert buffer.quarantined() == []
    assert buffer.next_batch(100).batch_id == batch_id


async def test_refused_retried_until_server_starts(buffer, caplog):
    buffer.add_poll(poll(1000))
    collector = FakeCollector(port=free_port())
    stop = asyncio.Event()
    collector.on_request = stop_after(1, stop)
    outage = EventOnLog(logging.WARNING)
    logging.getLogger("edge_agent.forwarder").addHandler(outage)

    try:
        async with forwarder_for(buffer, collector.url) as forwarder:
            task = asyncio.create_task(forwarder.run(stop))
            await asyncio.wait_for(outage.event.wait(), LIMIT)
            await collector.start()
            await asyncio.wait_for(task, LIMIT)
    finally:
        logging.getLogger("edge_agent.forwarder").removeHandler(outage)
        await collector.stop()

    assert len(collector.received) == 1
    assert buffer.stats().readings == 0


async def test_refused_message(buffer):
    buffer.add_poll(poll(1000))
    url = f"http://127.0.0.1:{free_port()}"

    async with forwarder_for(buffer, url) as forwarder:
        with pytest.raises(CollectorUnavailable) as caught:
            await forwarder.send_once()

    assert str(caught.value).startswith(f"cannot reach collector {url}/api/v1/batches: ")
    assert buffer.stats().readings == 2


async def test_stop_during_backoff(buffer):
    buffer.add_poll(poll(1000))
    url = f"http://127.0.0.1:{free_port()}"
    settings = CollectorConfig(url=url, token=TOKEN, interval=0.01, timeout=5.0)
    stop = asyncio.Event()
    outage = EventOnLog(logging.WARNING)
    logging.getLogger("edge_agent.forwarder").addHandler(outage)

    try:
        # A backoff of an hour: only the stop event can end the wait.
        async with Forwarder(buffer, settings, "gw-test",
                             Backoff(initial=3600, maximum=3600)) as forwarder:
            task = asyncio.create_task(forwarder.run(stop))
            await asyncio.wait_for(outage.event.wait(), LIMIT)
            stop.set()
            await asyncio.wait_for(task, LIMIT)
    finally:
        logging.getLogger("edge_agent.forwarder").removeHandler(outage)

    assert buffer.stats().readings == 2


async def test_200_without_batch_id_kept(buffer, collector):
    buffer.add_poll(poll(1000))
    collector.replies = [(200, {"welcome": "captive portal"})]

    async with forwarder_for(buffer, collector.url) as forwarder:
        with pytest.raises(CollectorUnavailable) as caught:
            await forwarder.send_once()

    batch_id = collector.received[0].document["batch_id"]
    assert str(caught.value) == (
        f"{collector.url}/api/v1/batches replied 200 to batch {batch_id} without "
        "confirming it; check collector.url"
    )
    assert buffer.stats().readings == 2


def odd_poll(time_ms: int) -> Poll:
    device = DeviceInfo(device_id="sn-2", address="127.0.0.1:5020/2")
    # A unit longer than the collector's 32 characters gets the batch rejected.
    unit = "kilowatt-hours per square metre per day"
    return Poll(device, time_ms, DeviceState.ONLINE, values={"profile.E": 1.0},
                channels=(Channel("profile.E", unit),))


async def test_400_splits_to_rejected_poll(buffer, collector):
    for time_ms in range(1000, 9000, 1000):
        buffer.add_poll(poll(time_ms))
    buffer.add_poll(odd_poll(4500))
    collector.judge = parse_with_collector

    async with forwarder_for(buffer, collector.url, batch_size=100) as forwarder:
        outcomes = [await forwarder.send_once() for _ in range(10)]

    # Polls 1-4 and 5-9, then 5-6 and 7-9, 7 and 8-9, 8 and the bad poll 9.
    assert outcomes == [Outcome.SPLIT, Outcome.SENT] * 4 + [Outcome.QUARANTINED,
                                                            Outcome.EMPTY]
    [entry] = buffer.quarantined()
    assert entry.polls == 1
    assert entry.reason == ("HTTP 400: channels[0].unit must be a string of at most "
                            "32 characters or null, got 'kilowatt-hours per square "
                            "metre per ...")
    assert buffer.stats().readings == 0
    stored = sorted(row[2] for request in collector.received
                    if parse_with_collector(document_body(request)) is None
                    for row in request.document["readings"])
    assert stored == sorted(list(range(1000, 9000, 1000)) * 2)


async def test_413_halves_until_single_poll(buffer, collector):
    for time_ms in (1000, 2000, 3000):
        buffer.add_poll(poll(time_ms))
    collector.judge = lambda body: (
        (413, {"error": "body too large: send smaller batches"})
        if body.count(b'"online"') > 1 else None)

    async with forwarder_for(buffer, collector.url, batch_size=100) as forwarder:
        outcomes = [await forwarder.send_once() for _ in range(6)]

    assert outcomes == [Outcome.SPLIT, Outcome.SENT, Outcome.SPLIT, Outcome.SENT,
                        Outcome.SENT, Outcome.EMPTY]
    assert buffer.quarantined() == []
    assert buffer.stats().readings == 0
    ids = [request.document["batch_id"] for request in collector.received]
    assert len(set(ids)) == len(ids)


async def test_413_single_poll_quarantined(buffer, collector):
    buffer.add_poll(poll(1000))
    collector.judge = lambda body: (413, {"error": "body too large"})

    async with forwarder_for(buffer, collector.url) as forwarder:
        assert await forwarder.send_once() is Outcome.QUARANTINED

    [entry] = buffer.quarantined()
    assert entry.reason == "HTTP 413: body too large"


def document_body(request) -> bytes:
    return json.dumps(request.document).encode()
