"""Agent service: fake pollers through the real buffer and forwarder to a test collector."""

import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.agent import open_buffer, run_agent
from edge_agent.buffer import Buffer
from edge_agent.errors import BufferFileError
from edge_agent.config import AgentConfig, BufferConfig, CollectorConfig, DeviceGroup
from edge_agent.endpoint import EndpointSettings
from edge_agent.readings import DeviceInfo, DeviceState, Poll
from edge_agent.retry import Backoff
from fake_collector import TOKEN, FakeCollector, free_port

FAST = Backoff(initial=0.001, maximum=0.01)
LIMIT = 10.0  # seconds before a test gives up waiting


def agent_config(tmp_path: Path, url: str, interval: float = 0.01) -> AgentConfig:
    return AgentConfig(
        gateway_id="gw-test",
        collector=CollectorConfig(url=url, token=TOKEN, interval=interval, timeout=5.0),
        buffer=BufferConfig(path=tmp_path / "buffer.sqlite"),
        devices=(
            DeviceGroup("inverters", EndpointSettings(host="127.0.0.1", port=5020),
                        unit_ids=(1, 2), poll_interval=1.0),
            DeviceGroup("meters", EndpointSettings(host="127.0.0.2", port=5020),
                        unit_ids=(3,), poll_interval=1.0),
        ),
    )


def unit_poll(settings: EndpointSettings, unit_id: int) -> Poll:
    address = f"{settings.label}/{unit_id}"
    return Poll(DeviceInfo(device_id=address, address=address), 1000 + unit_id,
                DeviceState.ONLINE, values={"701.W": 100.0 * unit_id})


async def poll_once_then_wait(settings, unit_ids, poll_interval, sink, stop,
                              **options):
    """Fake poller: commit one poll per unit, then wait for stop."""
    for unit_id in unit_ids:
        await sink(unit_poll(settings, unit_id))
    await stop.wait()


def buffered_readings(path: Path) -> int:
    with Buffer(path, gateway_id="gw-test") as buffer:
        return buffer.stats().readings


@pytest.fixture
async def collector():
    fake = FakeCollector()
    await fake.start()
    yield fake
    await fake.stop()


def sent_readings(collector: FakeCollector) -> list[list]:
    return sorted(row for request in collector.received
                  for row in request.document["readings"])


def stop_when_readings(count: int, stop: asyncio.Event):
    def hook(collector: FakeCollector) -> None:
        if len(sent_readings(collector)) >= count:
            stop.set()

    return hook


async def test_polls_reach_collector(tmp_path, collector):
    config = agent_config(tmp_path, collector.url)
    stop = asyncio.Event()
    collector.on_request = stop_when_readings(3, stop)

    await asyncio.wait_for(
        run_agent(config, stop, poll_endpoint=poll_once_then_wait, backoff=FAST), LIMIT
    )

    assert sent_readings(collector) == [
        ["127.0.0.1:5020/1", "701.W", 1001, 100.0],
        ["127.0.0.1:5020/2", "701.W", 1002, 200.0],
        ["127.0.0.2:5020/3", "701.W", 1003, 300.0],
    ]
    assert {r.document["gateway_id"] for r in collector.received} == {"gw-test"}
    assert buffered_readings(config.buffer.path) == 0


async def test_last_send_on_stop(tmp_path, collector):
    # The forwarder's loop ends at stop, so a poll committed while stopping can only
    # reach the collector through the last send.
    async def poll_at_stop(settings, unit_ids, poll_interval, sink, stop, **options):
        await stop.wait()
        for unit_id in unit_ids:
            await sink(unit_poll(settings, unit_id))

    config = agent_config(tmp_path, collector.url, interval=3600)
    stop = asyncio.Event()
    stop.set()

    await asyncio.wait_for(
        run_agent(config, stop, poll_endpoint=poll_at_stop, backoff=FAST), LIMIT
    )

    assert len(sent_readings(collector)) == 3
    assert buffered_readings(config.buffer.path) == 0


async def test_failed_poller_restarted(tmp_path, collector, caplog):
    calls = []

    async def fail_first(settings, unit_ids, poll_interval, sink, stop, **options):
        calls.append(settings.label)
        if calls.count(settings.label) == 1:
            raise RuntimeError("bus glitch")
        await poll_once_then_wait(settings, unit_ids, poll_interval, sink, stop)

    config = agent_config(tmp_path, collector.url)
    stop = asyncio.Event()
    collector.on_request = stop_when_readings(3, stop)

    with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
        await asyncio.wait_for(
            run_agent(config, stop, poll_endpoint=fail_first, backoff=FAST), LIMIT
        )

    assert sorted(calls) == ["127.0.0.1:5020"] * 2 + ["127.0.0.2:5020"] * 2
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert failures[0].getMessage().startswith("device group 'inverters' failed; "
                                               "restarting it in ")
    assert str(failures[0].exc_info[1]) == "bus glitch"
    assert len(sent_readings(collector)) == 3


async def test_early_return_logged(tmp_path, collector, caplog):
    calls = []

    async def return_once(settings, unit_ids, poll_interval, sink, stop, **options):
        calls.append(settings.label)
        if len(calls) > 1:
            await poll_once_then_wait(settings, unit_ids, poll_interval, sink, stop)

    config = agent_config(tmp_path, collector.url)
    config = AgentConfig(config.gateway_id, config.collector, config.buffer,
                         config.devices[:1])
    stop = asyncio.Event()
    collector.on_request = stop_when_readings(2, stop)

    with caplog.at_level(logging.ERROR, logger="edge_agent.agent"):
        await asyncio.wait_for(
            run_agent(config, stop, poll_endpoint=return_once, backoff=FAST), LIMIT
        )

    [failure] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert failure.startswith("device group 'inverters' returned before the agent "
                              "stopped; restarting it in ")


async def test_stuck_poller_cancelled(tmp_path, caplog):
    committed = asyncio.Event()

    async def ignore_stop(settings, unit_ids, poll_interval, sink, stop, **options):
        await sink(unit_poll(settings, unit_ids[0]))
        committed.set()
        await asyncio.Event().wait()

    url = f"http://127.0.0.1:{free_port()}"
    config = agent_config(tmp_path, url)
    stop = asyncio.Event()

    async def stop_after_commit():
        await committed.wait()
        stop.set()

    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="edge_agent.agent"):
        await asyncio.gather(
            run_agent(config, stop, poll_endpoint=ignore_stop, backoff=FAST,
                      shutdown_timeout=1.0),
            stop_after_commit(),
        )

    assert loop.time() - started < 3.0
    assert "poll inverters did not stop within 0.5 s; cancelling it" in caplog.messages
    # The collector is down, so every committed poll stays in the buffer.
    assert buffered_readings(config.buffer.path) >= 1


async def test_run_command_stops_on_sigterm(tmp_path, collector):
    config_path = tmp_path / "agent.toml"
    config_path.write_text(f"""\
[gateway]
id = "gw-test"

[collector]
url = "{collector.url}"
token = "{TOKEN}"
interval = 0.1

[buffer]
path = "buffer.sqlite"

[[devices]]
name = "nobody-home"
host = "127.0.0.1"
port = {free_port()}
unit_ids = [1]
poll_interval = 0.2
timeout = 0.5
""")
    received = asyncio.Event()
    collector.on_request = lambda _: received.set()

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", "run", "--config", str(config_path),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(received.wait(), LIMIT)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), LIMIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    log = stderr.decode()
    assert process.returncode == 0, log
    assert "edge_agent.agent: agent gw-test started: 1 device groups, 1 units" in log
    assert "edge_agent.agent: agent gw-test stopped" in log
    assert collector.received[0].document["states"][0][2] in ("offline", "refused")


async def test_groups_get_name_and_shared_ids(tmp_path, collector):
    config = agent_config(tmp_path, collector.url)
    options_seen: dict[str, dict] = {}
    stop = asyncio.Event()

    async def record_options(settings, unit_ids, poll_interval, sink, stop, **options):
        options_seen[settings.label] = options
        if len(options_seen) == 2:
            stop.set()
        await stop.wait()

    await asyncio.wait_for(
        run_agent(config, stop, poll_endpoint=record_options, backoff=FAST), LIMIT
    )

    inverters, meters = options_seen["127.0.0.1:5020"], options_seen["127.0.0.2:5020"]
    assert inverters["name"] == "inverters"
    assert meters["name"] == "meters"
    assert inverters["device_ids"] is meters["device_ids"]


def test_open_buffer_creates_folder(tmp_path):
    config = replace(
        agent_config(tmp_path, "http://127.0.0.1:9"),
        buffer=BufferConfig(path=tmp_path / "state" / "agent" / "buffer.sqlite"),
    )
    with open_buffer(config):
        pass
    assert (tmp_path / "state" / "agent" / "buffer.sqlite").is_file()


def test_open_buffer_folder_not_creatable(tmp_path):
    (tmp_path / "file").write_text("")
    config = replace(
        agent_config(tmp_path, "http://127.0.0.1:9"),
        buffer=BufferConfig(path=tmp_path / "file" / "buffer.sqlite"),
    )
    with pytest.raises(BufferFileError) as error:
        open_buffer(config)
    assert str(error.value) == (
        f"cannot create the buffer folder {tmp_path / 'file'} (File exists); create it, "
        "writable by the agent's user, or set [buffer] path to a writable folder")
