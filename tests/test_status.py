"""The agent's status: the board, the file, the HTTP endpoint and `solarfleet-agent status`.

The integration tests run `solarfleet-agent run` as a subprocess that polls a simulator
on 127.0.0.1 and publishes its status to a real file and a real port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner

from edge_agent.cli import main
from edge_agent.config import StatusConfig, load_config
from edge_agent.errors import StatusError
from edge_agent.readings import DeviceInfo, DeviceState, Poll
from edge_agent.status import (
    AgentStatus,
    BufferStatus,
    CollectorStatus,
    DeviceStatus,
    StatusBoard,
    fetch_status,
    format_status,
    read_status,
    summary,
    write_status,
)
from fake_collector import TOKEN, free_port
from sim_fixtures import DEVICE_1547, serve_image  # noqa: F401

LIMIT = 20.0  # seconds before a test gives up waiting
T0 = 1_764_864_000_000  # 2025-12-04T16:00:00Z in Unix milliseconds

CONFIG = """\
[gateway]
id = "gw-test"

[collector]
url = "{url}"
token = "{token}"
interval = 0.1

[buffer]
path = "buffer.sqlite"
{status}
[[devices]]
name = "inverters"
host = "127.0.0.1"
port = {device_port}
unit_ids = [1, 2]
poll_interval = 0.2
timeout = 0.5
"""


def write_config(tmp_path: Path, status: str = "", device_port: int = 502) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(url=f"http://127.0.0.1:{free_port()}", token=TOKEN,
                                  status=status, device_port=device_port))
    return path


def sample_status(**changes) -> AgentStatus:
    status = AgentStatus(
        gateway_id="gw-test", running=True, pid=4242, started_ms=T0,
        updated_ms=T0 + 65_000, interval=5.0,
        devices=(
            DeviceStatus("127.0.0.1:5020/1", "inverters", "online", ("sn-1",),
                         T0 + 64_000, T0 + 64_000),
            DeviceStatus("127.0.0.1:5020/2", "inverters", "offline",
                         ("127.0.0.1:5020/2",), T0 + 64_500, T0 + 4_000,
                         "127.0.0.1:5020 unit 2: no response within 3 s", T0 + 64_500),
            DeviceStatus("/dev/ttyUSB0/240", "meters"),
        ),
        buffer=BufferStatus("/var/lib/solarfleet-agent/buffer.sqlite", 12, 480,
                            57_344, T0 + 20_000, 45.0, 3, 120, 1, 40),
        collector=CollectorStatus("https://collector.example.com/api/v1/batches",
                                  T0 + 10_000, 7, "collector replied HTTP 503",
                                  T0 + 63_000),
    )
    return AgentStatus(**{**status.to_json(), **changes,
                          "devices": status.devices, "buffer": status.buffer,
                          "collector": status.collector})


SAMPLE_LINES = [
    "agent gw-test: running, pid 4242, started 2025-12-04T16:00:00Z, status of "
    "2025-12-04T16:01:05Z",
    "devices:",
    "  127.0.0.1:5020/1 (sn-1) in inverters: online, last success 2025-12-04T16:01:04Z",
    "  127.0.0.1:5020/2 in inverters: offline, last success 2025-12-04T16:00:04Z",
    "    last error 2025-12-04T16:01:04Z: 127.0.0.1:5020 unit 2: no response within 3 s",
    "  /dev/ttyUSB0/240 in meters: not polled yet, last success never",
    "buffer: 480 readings in 12 polls, 57344 bytes, oldest 45 s old",
    "dropped: 120 readings in 3 polls",
    "quarantined: 1 batches, 40 readings",
    "collector: https://collector.example.com/api/v1/batches, last sent "
    "2025-12-04T16:00:10Z",
    "  failing: 7 failed attempts in a row",
    "  last error 2025-12-04T16:01:03Z: collector replied HTTP 503",
]


# --- config -------------------------------------------------------------------------


def test_config_status_default(tmp_path):
    config = load_config(write_config(tmp_path))
    assert config.status_config == StatusConfig(path=tmp_path / "buffer.status.json")


def test_config_status_table(tmp_path):
    path = write_config(tmp_path, '[status]\nport = 8931\nhost = "0.0.0.0"\n'
                                  "interval = 2\n")
    assert load_config(path).status_config == StatusConfig(
        path=tmp_path / "buffer.status.json", interval=2.0, port=8931, host="0.0.0.0")


def test_config_status_bad_port(tmp_path):
    path = write_config(tmp_path, "[status]\nport = 70000\nprot = 1\n")
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1
    assert result.output == (
        f"{path}: status.prot is not a known key; did you mean port?\n"
        f"{path}: status.port must be an integer 1-65535, got 70000\n")


# --- board and rendering ------------------------------------------------------------


def test_board_records_polls(tmp_path):
    board = StatusBoard.for_config(load_config(write_config(tmp_path)))
    device = DeviceInfo("sn-1", "127.0.0.1:502/1")
    board.record("127.0.0.1:502/1", "inverters",
                 [Poll(device, T0, DeviceState.ONLINE)], None, T0 + 5)
    board.record("127.0.0.1:502/1", "inverters",
                 [Poll(device, T0 + 1000, DeviceState.OFFLINE)], "no response", T0 + 1005)
    board.record("127.0.0.1:502/2", "inverters", [], "poll failed unexpectedly: "
                 "KeyError('W')", T0 + 2000)

    assert board.devices == {
        "127.0.0.1:502/1": DeviceStatus("127.0.0.1:502/1", "inverters", "offline",
                                        ("sn-1",), T0 + 1000, T0, "no response",
                                        T0 + 1000),
        "127.0.0.1:502/2": DeviceStatus("127.0.0.1:502/2", "inverters", "failed",
                                        (), T0 + 2000, None,
                                        "poll failed unexpectedly: KeyError('W')",
                                        T0 + 2000),
    }


def test_format_status_lines():
    assert format_status(sample_status(), now_ms=T0 + 66_000) == SAMPLE_LINES


def test_format_status_stale():
    lines = format_status(sample_status(), now_ms=T0 + 65_000 + 21_000)
    assert lines[1] == ("warning: this status is 21 s old; the agent may be stuck or "
                        "gone, check `systemctl status solarfleet-agent`")
    assert lines[2:] == SAMPLE_LINES[1:]


def test_format_status_stopped_not_stale():
    lines = format_status(sample_status(running=False), now_ms=T0 + 3_600_000)
    assert lines[0] == ("agent gw-test: stopped, pid 4242, started 2025-12-04T16:00:00Z, "
                        "status of 2025-12-04T16:01:05Z")
    assert lines[1:] == SAMPLE_LINES[1:]


def test_summary_line():
    assert summary(sample_status()) == ("1 of 3 units responding; buffer 480 readings, "
                                        "oldest 45 s; collector failing (7 failed "
                                        "attempts)")


# --- file ---------------------------------------------------------------------------


def test_status_file_round_trip(tmp_path):
    path = tmp_path / "buffer.status.json"
    write_status(path, sample_status())
    write_status(path, sample_status(pid=4243))

    assert read_status(path) == sample_status(pid=4243)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buffer.status.json"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_read_status_missing(tmp_path):
    path = tmp_path / "buffer.status.json"
    with pytest.raises(StatusError) as error:
        read_status(path)
    assert str(error.value) == (f"no status file at {path}; it is written by "
                                "`solarfleet-agent run` once it starts")


def test_read_status_not_a_status(tmp_path):
    path = tmp_path / "buffer.status.json"
    path.write_text('{"format": 2}')
    with pytest.raises(StatusError) as error:
        read_status(path)
    assert str(error.value) == (f"{path}: not a status document of format 1; check "
                                "that agent and command are the same version")


def test_status_command_without_file(tmp_path):
    result = CliRunner().invoke(main, ["status", "--config", str(write_config(tmp_path))])
    assert result.exit_code == 2
    assert result.output == (f"error: no status file at {tmp_path}/buffer.status.json; "
                             "it is written by `solarfleet-agent run` once it starts\n")


# --- a running agent ----------------------------------------------------------------


def run_status_command(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--config", str(config_path)],
        capture_output=True, text=True, timeout=LIMIT)


async def get_document(port: int) -> dict | None:
    """Fetch the served status; None while the agent has not built its first one."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/status") as response:
            if response.status == 503:
                return None
            assert response.status == 200
            assert response.content_type == "application/json"
            return await response.json()


async def wait_for_polls(port: int) -> dict:
    """Return the first served status in which both units were polled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    while loop.time() < deadline:
        try:
            document = await get_document(port)
        except aiohttp.ClientConnectionError:
            document = None
        if document and all(d["last_poll_ms"] for d in document["devices"]):
            return document
        await asyncio.sleep(0.1)
    pytest.fail(f"no status with both units polled within {LIMIT} s")


async def test_running_agent_status(tmp_path, serve_image):
    simulator = await serve_image(DEVICE_1547)
    port = free_port()
    config_path = write_config(tmp_path, f"[status]\nport = {port}\ninterval = 1\n",
                               device_port=simulator.port)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", "run", "--config", str(config_path),
        stderr=asyncio.subprocess.PIPE)
    try:
        document = await wait_for_polls(port)
        # The status changes once a second: retry until the command's output and
        # the served documents around it show one status.
        for _ in range(10):
            before = await get_document(port)
            result = await asyncio.to_thread(run_status_command, config_path)
            after = await get_document(port)
            if before == after:
                break
        else:
            pytest.fail("the status changed during every try")
        on_disk = json.loads((tmp_path / "buffer.status.json").read_text())
        served = await get_document(port)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), LIMIT)

    assert process.returncode == 0, stderr.decode()
    # The file contains the document that the endpoint serves, unless a round passed.
    assert on_disk == served or on_disk["updated_ms"] != served["updated_ms"]

    status = AgentStatus.from_json(after)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == format_status(status, status.updated_ms)
    online, offline = status.devices
    label = f"127.0.0.1:{simulator.port}"
    assert (online.address, online.group, online.state) == (f"{label}/1", "inverters",
                                                            "online")
    assert online.last_success_ms == online.last_poll_ms
    assert online.last_error is None
    assert (offline.address, offline.state, offline.last_success_ms) == (
        f"{label}/2", "offline", None)
    assert offline.last_error == (
        f"{label} unit 2: the gateway returned exception 11, so no device is "
        "connected on this unit id; check the unit id")
    assert status.gateway_id == "gw-test"
    assert status.pid == process.pid
    assert status.collector.last_sent_ms is None
    assert status.collector.failures >= 1
    assert status.buffer.path == str(tmp_path / "buffer.sqlite")
    assert status.buffer.readings > 0
    assert document["format"] == 1

    # The stopped agent leaves its last status in the file. The endpoint is gone, so
    # the command names the file it read instead.
    final = read_status(tmp_path / "buffer.status.json")
    assert final.running is False
    result = await asyncio.to_thread(run_status_command, config_path)
    assert result.returncode == 0
    assert result.stderr == (
        f"note: no status from http://127.0.0.1:{port}/status ([Errno 111] Connection "
        f"refused); check that the agent runs; showing the status file "
        f"{tmp_path / 'buffer.status.json'}\n")
    assert result.stdout.splitlines() == format_status(final, final.updated_ms)
    assert result.stdout.startswith(f"agent gw-test: stopped, pid {process.pid}, ")


async def test_status_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_path = write_config(tmp_path, f"[status]\nport = {port}\n")
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config_path)],
            capture_output=True, text=True, timeout=LIMIT)

    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot serve the status on 127.0.0.1:{port} (Address already in "
        "use); choose another [status] port")


def test_fetch_status_no_agent():
    port = free_port()
    with pytest.raises(StatusError) as error:
        fetch_status(StatusConfig(path=Path("unused"), port=port, host="0.0.0.0"))
    assert str(error.value) == (f"no status from http://127.0.0.1:{port}/status "
                                "([Errno 111] Connection refused); check that the "
                                "agent runs")


def test_status_file_next_to_buffer_name(tmp_path):
    config = load_config(write_config(tmp_path))
    assert config.status_config.path.parent == config.buffer.path.parent
    assert os.path.basename(config.status_config.path) == "buffer.status.json"
