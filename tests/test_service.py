"""The agent under systemd: sd_notify datagrams, the watchdog, journal logs, SIGTERM.

A real AF_UNIX datagram socket plays systemd's notification socket, both for the
agent in this process and for `solarfleet-agent run` subprocesses that poll a
simulator on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.agent import SHUTDOWN_TIMEOUT, run_agent
from edge_agent.config import AgentConfig, BufferConfig, CollectorConfig, DeviceGroup
from edge_agent.endpoint import EndpointSettings
from edge_agent.service import (
    EventFormatter,
    Notifier,
    Progress,
    journal_stream,
    run_watchdog,
    watchdog_interval,
)
from fake_collector import TOKEN, FakeCollector, free_port
from sim_fixtures import DEVICE_1547, serve_image  # noqa: F401

LIMIT = 20.0  # seconds before a test gives up waiting
UNITS = Path(__file__).parent.parent / "systemd"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SystemdSocket:
    """A datagram socket that receives sd_notify messages as systemd does."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def receive(self) -> dict[str, str]:
        """Wait for the next datagram; return its assignments."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), LIMIT)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(message)
        return message

    async def receive_until(self, key: str, value: str | None = None) -> dict[str, str]:
        """Receive until a datagram sets `key` (to `value`, where given)."""
        while True:
            message = await self.receive()
            if key in message and value in (None, message[key]):
                return message

    def pending(self) -> list[dict[str, str]]:
        """Receive every datagram waiting now, without blocking."""
        messages = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return messages
            messages.append(dict(line.split("=", 1)
                                 for line in data.decode().splitlines()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd_socket(tmp_path):
    """A notification socket at a file system path; NOTIFY_SOCKET is its `path`."""
    path = tmp_path / "notify.sock"
    listener = SystemdSocket(str(path))
    listener.path = str(path)  # type: ignore[attr-defined]
    yield listener
    listener.close()


# --- sd_notify ----------------------------------------------------------------------


async def test_notifier_path_socket(systemd_socket):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": systemd_socket.path})
    notifier.send("READY=1", "STATUS=polling")
    notifier.status("two\n  lines")
    notifier.close()

    assert await systemd_socket.receive() == {"READY": "1", "STATUS": "polling"}
    assert await systemd_socket.receive() == {"STATUS": "two lines"}


async def test_notifier_abstract_socket():
    name = f"solarfleet-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = SystemdSocket("\0" + name)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        notifier.send("WATCHDOG=1")
        notifier.close()
        assert await listener.receive() == {"WATCHDOG": "1"}
    finally:
        listener.close()


def test_notifier_without_socket():
    notifier = Notifier.from_environ({})
    assert notifier.enabled is False
    notifier.send("READY=1")  # nothing to send to, and no error


def test_notifier_failure_logged_once(tmp_path, caplog):
    missing = tmp_path / "gone.sock"
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(missing)})
    with caplog.at_level(logging.WARNING, logger="edge_agent.service"):
        notifier.send("WATCHDOG=1")
        notifier.send("WATCHDOG=1")
    assert caplog.messages == [
        f"cannot notify systemd at {missing} ([Errno 2] No such file or directory); "
        "readiness and watchdog notifications are lost"
    ]


def test_watchdog_interval():
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}, pid=7) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "7"},
                             pid=7) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "8"},
                             pid=7) is None
    assert watchdog_interval({}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=7) is None


# --- progress and the watchdog ------------------------------------------------------


def test_progress_overdue():
    clock = FakeClock()
    progress = Progress(slack=5.0, clock=clock)
    progress.expect("forwarder", 30.0)
    progress.expect("device group 'inverters'", 10.0)

    clock.now = 15.0
    assert progress.overdue() == {}
    clock.now = 16.0
    assert progress.overdue() == {"device group 'inverters'": 1.0}
    progress.forget("device group 'inverters'")
    clock.now = 36.0
    assert progress.overdue() == {"forwarder": 1.0}


async def test_watchdog_stops_and_resumes(systemd_socket, caplog):
    clock = FakeClock()
    progress = Progress(slack=1.0, clock=clock)
    progress.expect("forwarder", 10.0)
    notifier = Notifier(systemd_socket.path)
    stop = asyncio.Event()
    task = asyncio.create_task(run_watchdog(notifier, progress, 0.01, stop))

    assert await systemd_socket.receive() == {"WATCHDOG": "1"}
    with caplog.at_level(logging.INFO, logger="edge_agent.service"):
        clock.now = 12.0
        assert await systemd_socket.receive_until("STATUS") == {
            "STATUS": "forwarder is stuck; waiting for the watchdog restart"}
        # Ten check intervals without a ping.
        await asyncio.sleep(0.1)
        assert {"WATCHDOG": "1"} not in systemd_socket.pending()
        progress.expect("forwarder", 10.0)
        assert await systemd_socket.receive() == {"WATCHDOG": "1"}
    stop.set()
    await task
    notifier.close()

    assert caplog.messages == [
        "forwarder made no progress for 2 s past its expected time; watchdog pings "
        "stop, so systemd restarts the agent",
        "forwarder makes progress again",
    ]


def agent_config(tmp_path: Path, url: str) -> AgentConfig:
    return AgentConfig(
        gateway_id="gw-test",
        # A long interval: the idle forwarder announces one hour of waiting.
        collector=CollectorConfig(url=url, token=TOKEN, interval=3600.0, timeout=5.0),
        buffer=BufferConfig(path=tmp_path / "buffer.sqlite"),
        devices=(DeviceGroup("inverters", EndpointSettings(host="127.0.0.1", port=5020),
                             unit_ids=(1,), poll_interval=1.0),),
    )


async def test_agent_stuck_poller_stops_pings(tmp_path, systemd_socket, caplog):
    rounds = asyncio.Event()

    async def stuck_until_released(settings, unit_ids, poll_interval, sink, stop,
                                   monitor, **options):
        await rounds.wait()
        while not stop.is_set():
            monitor.round_finished(poll_interval)
            await asyncio.sleep(0.01)

    clock = FakeClock()
    stop = asyncio.Event()
    environ = {"NOTIFY_SOCKET": systemd_socket.path, "WATCHDOG_USEC": "20000"}
    config = agent_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    agent = asyncio.create_task(run_agent(
        config, stop, poll_endpoint=stuck_until_released, environ=environ,
        progress=Progress(slack=0.0, clock=clock)))
    try:
        await systemd_socket.receive_until("READY", "1")
        await systemd_socket.receive_until("WATCHDOG", "1")
        # Past the group's round limit (126 s at a 3 s timeout), short of the
        # forwarder's hour.
        clock.now = 1000.0
        with caplog.at_level(logging.ERROR, logger="edge_agent.service"):
            message = await systemd_socket.receive_until("STATUS")
            while "stuck" not in message["STATUS"]:
                message = await systemd_socket.receive_until("STATUS")
            await asyncio.sleep(0.1)  # five ping intervals
            assert {"WATCHDOG": "1"} not in systemd_socket.pending()

        rounds.set()
        await systemd_socket.receive_until("WATCHDOG", "1")
    finally:
        stop.set()
        await asyncio.wait_for(agent, LIMIT)

    assert message == {"STATUS": "device group 'inverters' is stuck; waiting for "
                                 "the watchdog restart"}
    [error] = caplog.messages
    assert error.startswith("device group 'inverters' made no progress for ")
    assert await systemd_socket.receive_until("STOPPING", "1") == {
        "STOPPING": "1", "STATUS": f"stopping within {SHUTDOWN_TIMEOUT:g} s"}


# --- journal logging ----------------------------------------------------------------


def log_record(message: str, level: int = logging.WARNING, **fields) -> logging.LogRecord:
    record = logging.LogRecord("edge_agent.poller", level, __file__, 1, message, (),
                               None)
    record.__dict__.update(fields)
    return record


def test_formatter_journal_line():
    formatter = EventFormatter(journal=True)
    record = log_record("127.0.0.1:5020/1: no response, reported as offline",
                        device="127.0.0.1:5020/1", batch=None)
    assert formatter.format(record) == (
        "<4>WARNING edge_agent.poller: 127.0.0.1:5020/1: no response, reported as "
        "offline device=127.0.0.1:5020/1")


def test_formatter_quotes_fields():
    formatter = EventFormatter(journal=True)
    record = log_record("sent", logging.INFO, group="roof east", batch="b-1")
    assert formatter.format(record) == (
        '<6>INFO edge_agent.poller: sent group="roof east" batch=b-1')


def test_formatter_traceback_one_line():
    formatter = EventFormatter(journal=True)
    try:
        raise OSError("disk full")
    except OSError:
        record = log_record("storing a poll failed", logging.ERROR,
                            device="/dev/ttyUSB0/3")
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    assert line.startswith("<3>ERROR edge_agent.poller: storing a poll failed "
                           "device=/dev/ttyUSB0/3 | Traceback (most recent call last):")
    assert line.endswith(" | OSError: disk full")


def test_formatter_terminal_has_time():
    formatter = EventFormatter(journal=False)
    line = formatter.format(log_record("sent", logging.INFO, batch="b-1"))
    assert line.endswith(" INFO edge_agent.poller: sent batch=b-1")
    assert line[:4].isdigit()  # the year of asctime


def test_journal_stream_matches_stderr(tmp_path, monkeypatch):
    with open(tmp_path / "stderr", "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        stat = os.fstat(stderr.fileno())
        assert journal_stream({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
        assert not journal_stream({"JOURNAL_STREAM": f"{stat.st_dev}:1"})
        assert not journal_stream({})


# --- a real `solarfleet-agent run` --------------------------------------------------


def write_config(tmp_path: Path, collector_url: str, device_port: int,
                 timeout: float = 5.0) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""\
[gateway]
id = "gw-test"

[collector]
url = "{collector_url}"
token = "{TOKEN}"
interval = 0.1
timeout = {timeout}

[buffer]
path = "buffer.sqlite"

[status]
interval = 0.2

[[devices]]
name = "inverters"
host = "127.0.0.1"
port = {device_port}
unit_ids = [1]
poll_interval = 0.2
timeout = 1.0
""")
    return path


async def start_agent(config_path: Path, **environ: str) -> asyncio.subprocess.Process:
    env = {key: value for key, value in os.environ.items()
           if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                          "JOURNAL_STREAM")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", "run", "--config", str(config_path),
        env=env | environ, stderr=asyncio.subprocess.PIPE,
    )


async def stop_agent(process: asyncio.subprocess.Process) -> str:
    """SIGTERM the agent; return its log. Kills it if it does not stop in time."""
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), LIMIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return stderr.decode()


async def test_run_notifies_systemd(tmp_path, systemd_socket, serve_image):
    simulator = await serve_image(DEVICE_1547)
    collector = FakeCollector()
    await collector.start()
    config_path = write_config(tmp_path, collector.url, simulator.port)
    process = await start_agent(config_path, NOTIFY_SOCKET=systemd_socket.path,
                                WATCHDOG_USEC="1000000")
    try:
        first = await systemd_socket.receive()
        ready = await systemd_socket.receive()
        await systemd_socket.receive_until("WATCHDOG", "1")
        responding = await systemd_socket.receive_until("STATUS")
        while not responding["STATUS"].startswith("1 of 1 units responding"):
            responding = await systemd_socket.receive_until("STATUS")
        log = await stop_agent(process)
    finally:
        await collector.stop()

    assert process.returncode == 0, log
    assert first == {"STATUS": "0 of 1 units responding; buffer 0 readings; "
                               "collector ok"}
    assert ready == {"READY": "1"}
    assert responding["STATUS"].endswith("; collector ok")
    stopping = await systemd_socket.receive_until("STOPPING", "1")
    assert stopping == {"STOPPING": "1", "STATUS": "stopping within 10 s"}
    assert collector.received  # the polls went on to the collector


async def test_run_logs_for_journald(tmp_path, serve_image):
    simulator = await serve_image(DEVICE_1547)
    config_path = write_config(tmp_path, f"http://127.0.0.1:{free_port()}",
                               simulator.port)
    read_end, write_end = os.pipe()
    stat = os.fstat(write_end)
    env = {key: value for key, value in os.environ.items()
           if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config_path)],
        env=env, stderr=write_end)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as stderr:
            # Until the forwarder found the collector down, with a batch to send.
            lines = [stderr.readline()]
            while not lines[-1].startswith("<4>WARNING edge_agent.forwarder: "):
                assert lines[-1], "the agent stopped logging"
                lines.append(stderr.readline())
            process.send_signal(signal.SIGTERM)
            process.wait(LIMIT)
            lines += stderr.read().splitlines(keepends=True)
    finally:
        process.kill()

    log = "".join(lines)
    assert process.returncode == 0, log
    assert ("<6>INFO edge_agent.agent: agent gw-test started: 1 device groups, 1 "
            f"units, buffer {tmp_path / 'buffer.sqlite'}\n") in lines
    collector_down = [line for line in lines if "edge_agent.forwarder: " in line
                      and "cannot reach collector" in line]
    assert collector_down[0].startswith("<4>WARNING edge_agent.forwarder: cannot "
                                        "reach collector http://127.0.0.1:")
    assert re.search(r" batch=[0-9a-f-]{36}\n$", collector_down[0]), log
    assert lines[-1] == "<6>INFO edge_agent.agent: agent gw-test stopped\n"
    assert all(re.match(r"<[2-7]>[A-Z]+ [a-z_.]+: ", line) for line in lines), log


class Blackhole:
    """A TCP listener that accepts connections and never replies, like a hung server."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        async def hold(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the agent hangs up
            writer.close()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.mark.slow
async def test_sigterm_bounded_while_collector_hangs(tmp_path, serve_image):
    simulator = await serve_image(DEVICE_1547)
    blackhole = Blackhole()
    await blackhole.start()
    # The collector timeout is far past the shutdown bound, so only the bound ends
    # the send in flight.
    config_path = write_config(tmp_path, f"http://127.0.0.1:{blackhole.port}",
                               simulator.port, timeout=300.0)
    process = await start_agent(config_path)
    buffer_path = tmp_path / "buffer.sqlite"
    try:
        while count_polls(buffer_path) < 3:
            await asyncio.sleep(0.1)
        started = time.monotonic()
        log = await stop_agent(process)
        elapsed = time.monotonic() - started
    finally:
        await blackhole.stop()

    assert process.returncode == 0, log
    assert elapsed < SHUTDOWN_TIMEOUT + 2.0, log
    assert "did not stop within 5 s; cancelling it" in log
    assert "agent gw-test stopped" in log
    # SQLite checkpoints the WAL into the file and deletes it when the buffer closes.
    assert not Path(f"{buffer_path}-wal").exists()
    # Every poll committed stays in the buffer, and the file is whole.
    db = sqlite3.connect(buffer_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        polls = db.execute("SELECT count(*) FROM polls").fetchone()[0]
    finally:
        db.close()
    assert polls >= 3


def count_polls(path: Path) -> int:
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=1.0)
    try:
        return db.execute("SELECT count(*) FROM polls").fetchone()[0]
    except sqlite3.OperationalError:  # the agent has not created the schema yet
        return 0
    finally:
        db.close()


# --- unit files ---------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def verify_unit(path: Path) -> tuple[int, list[str]]:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode, (result.stdout + result.stderr).splitlines()


@needs_systemd_analyze
@pytest.mark.parametrize("unit, command", [
    ("solarfleet-agent.service", "solarfleet-agent"),
    ("solarfleet-collector.service", "solarfleet-collector"),
])
def test_unit_file_verifies(tmp_path, unit, command):
    # The unit names /usr/local/bin/<command>; an executable that exists here
    # stands in for it, so that only problems of the unit itself remain.
    installed = Path(sys.executable).parent / command
    assert installed.exists(), f"run `pip install -e .` to get {installed}"
    text = (UNITS / unit).read_text()
    (tmp_path / unit).write_text(text.replace(f"/usr/local/bin/{command}",
                                              str(installed)))

    returncode, output = verify_unit(tmp_path / unit)

    assert output == []
    assert returncode == 0


def test_unit_file_notify_settings():
    text = (UNITS / "solarfleet-agent.service").read_text()
    settings = [line for line in text.splitlines() if line and line[0].isalpha()]
    for expected in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60s",
                     "Restart=on-failure", "StateDirectory=solarfleet-agent",
                     "SupplementaryGroups=dialout", "ProtectSystem=strict",
                     "NoNewPrivileges=true", "PrivateTmp=true"):
        assert expected in settings
