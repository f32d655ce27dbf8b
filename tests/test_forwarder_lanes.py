"""Forwarder lanes and gaps against a collector stand-in on 127.0.0.1."""

import asyncio

import pytest

from edge_agent.buffer import Buffer, BufferLimits, Lane
from edge_agent.config import CollectorConfig
from edge_agent.forwarder import Forwarder, Outcome
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll
from edge_agent.retry import Backoff
from fake_collector import TOKEN, FakeCollector

INVERTER = DeviceInfo(device_id="sn-1", address="127.0.0.1:5020/1", name="inverter")
FAST = Backoff(initial=0.001, maximum=0.01)
LIMIT = 20.0  # seconds before a test gives up waiting
BACKLOG_POLLS = 200
LIVE_POLLS = 60
LIVE_START_MS = 1_000_000


def poll(time_ms: int, channels: int = 2) -> Poll:
    values = {f"701.W{i}": float(i) for i in range(channels)}
    units = tuple(Channel(name, "W") for name in values)
    return Poll(INVERTER, time_ms, DeviceState.ONLINE, values, units)


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


def forwarder_for(buffer: Buffer, url: str, batch_size: int) -> Forwarder:
    settings = CollectorConfig(url=url, token=TOKEN, batch_size=batch_size,
                               interval=0.01, timeout=5.0)
    return Forwarder(buffer, settings, "gw-test", FAST)


def poll_times(document: dict) -> list[int]:
    return [state[1] for state in document["states"]]


async def test_gaps_on_wire(tmp_path, collector):
    limits = BufferLimits(max_bytes=64 * 1024)
    with Buffer(tmp_path / "full.sqlite", gateway_id="gw-test",
                limits=limits) as buffer:
        n = 0
        while buffer.stats().dropped_polls < 3:
            buffer.add_poll(poll(1000 * n, channels=100))
            n += 1
        async with forwarder_for(buffer, collector.url, 100) as forwarder:
            assert await forwarder.send_once() is Outcome.SENT
        [entry] = buffer.gaps()

    [request] = collector.received
    assert request.document["gaps"] == [
        {"device_id": "sn-1", "first_time": 0, "last_time": 2000, "readings": 300,
         "polls": 3, "reason": "buffer-full"},
    ]
    assert request.document["devices"][0]["device_id"] == "sn-1"
    assert entry.reported_ms is not None


async def test_send_cycle_live_first(buffer, collector):
    for n in range(10):
        buffer.add_poll(poll(1000 * n))

    async with forwarder_for(buffer, collector.url, batch_size=4) as forwarder:
        assert await forwarder.send_cycle() is True

    live, backlog = (request.document for request in collector.received)
    assert poll_times(live) == [8000, 9000]
    assert poll_times(backlog) == [0, 1000]


async def test_send_cycle_empty(buffer, collector):
    async with forwarder_for(buffer, collector.url, batch_size=4) as forwarder:
        assert await forwarder.send_cycle() is False
    assert collector.received == []


async def test_live_polls_during_drain(buffer, collector):
    """Each new poll arrives within two requests, and every reading is sent once."""
    for n in range(BACKLOG_POLLS):
        buffer.add_poll(poll(1000 * n))
    added_at: dict[int, int] = {}  # live poll time -> request during which it was added
    stop = asyncio.Event()

    def on_request(fake: FakeCollector) -> None:
        # A poller commits a new poll while each request is in flight.
        if len(added_at) < LIVE_POLLS:
            time_ms = LIVE_START_MS + 1000 * len(added_at)
            buffer.add_poll(poll(time_ms))
            added_at[time_ms] = len(fake.received) - 1
        sent = {t for r in fake.received for t in poll_times(r.document)}
        if len(sent) == BACKLOG_POLLS + LIVE_POLLS:
            stop.set()

    collector.on_request = on_request
    async with forwarder_for(buffer, collector.url, batch_size=10) as forwarder:
        await asyncio.wait_for(forwarder.run(stop), LIMIT)

    documents = [request.document for request in collector.received]
    carried_by = {t: index for index, d in enumerate(documents) for t in poll_times(d)}
    delays = [carried_by[t] - added for t, added in added_at.items()]
    assert max(delays) <= 2
    assert min(delays) >= 1

    rows = [(row[1], row[2]) for d in documents for row in d["readings"]]
    assert len(rows) == len(set(rows))
    assert len(rows) == 2 * (BACKLOG_POLLS + LIVE_POLLS)
    assert len({d["batch_id"] for d in documents}) == len(documents)

    # The first live batch takes the newest backlog polls; the rest drains oldest first.
    assert poll_times(documents[0]) == [1000 * n for n in range(195, 200)]
    backlog = [t for d in documents[1:] for t in poll_times(d) if t < LIVE_START_MS]
    assert backlog == sorted(backlog)
    assert buffer.stats().polls == 0


async def test_retry_keeps_lane_batch(buffer, collector):
    for n in range(10):
        buffer.add_poll(poll(1000 * n))
    collector.replies = [(503, {"error": "shard down"})] * 2
    stop = asyncio.Event()

    def on_request(fake: FakeCollector) -> None:
        if len(fake.received) == 4:
            stop.set()

    collector.on_request = on_request
    async with forwarder_for(buffer, collector.url, batch_size=4) as forwarder:
        await asyncio.wait_for(forwarder.run(stop), LIMIT)

    ids = [request.document["batch_id"] for request in collector.received]
    assert ids[0] == ids[1] == ids[2]
    assert ids[3] != ids[0]
    assert poll_times(collector.received[2].document) == [8000, 9000]
    assert poll_times(collector.received[3].document) == [0, 1000]


def test_forwarder_rejects_other_gateway(buffer):
    settings = CollectorConfig(url="http://127.0.0.1:1", token=TOKEN)
    with pytest.raises(ValueError) as caught:
        Forwarder(buffer, settings, "gw-other")
    assert str(caught.value) == ("buffer of gateway 'gw-test' cannot be forwarded as "
                                 "gateway 'gw-other'")


def test_lane_values():
    assert [str(lane) for lane in Lane] == ["backlog", "live"]
