"""The running agent's status: each device's last poll, the buffer and the collector.

The agent collects what its pollers and forwarder report on a `StatusBoard`, and a
`StatusPublisher` rewrites a JSON status file beside the buffer every
`[status] interval` seconds, atomically, so a reader sees the previous or the new
document, never a mix. With `[status] port` set, `StatusServer` serves the same
document over HTTP at ``/status``. `solarfleet-agent status` prints it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from edge_agent.buffer import Buffer
from edge_agent.config import AgentConfig, DeviceGroup, StatusConfig
from edge_agent.errors import BufferFileError, StatusError
from edge_agent.forwarder import Forwarder
from edge_agent.poller import round_limit
from edge_agent.readings import DeviceState, Poll
from edge_agent.service import Notifier, Progress

logger = logging.getLogger(__name__)

STATUS_FORMAT = 1
STATUS_PATH = "/status"
NOT_POLLED = "not polled yet"  # state of a unit before its first poll
FAILED = "failed"  # state of a unit whose poller raised an unexpected error
RESPONDING = {DeviceState.ONLINE.value, DeviceState.SLEEPING.value}
# A status older than this many intervals is flagged: the agent may be stuck or gone.
STALE_INTERVALS = 3


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """The last poll of one unit id, and its last success and last error."""

    address: str  # "<host>:<port>/<unit id>" or "<serial port>/<unit id>"
    group: str  # name of the [[devices]] table
    state: str = NOT_POLLED  # a DeviceState value, NOT_POLLED or FAILED
    device_ids: tuple[str, ...] = ()  # devices found behind the unit id
    last_poll_ms: int | None = None
    last_success_ms: int | None = None  # last poll in which the device responded
    last_error: str | None = None  # kept after a recovery, with its time
    last_error_ms: int | None = None


@dataclass(frozen=True, slots=True)
class BufferStatus:
    """Depth, age and drops of the buffer file."""

    path: str
    polls: int
    readings: int
    bytes: int
    oldest_ms: int | None
    oldest_age: float | None  # seconds, when the status was written
    dropped_polls: int
    dropped_readings: int
    quarantined_batches: int
    quarantined_readings: int


@dataclass(frozen=True, slots=True)
class CollectorStatus:
    """The forwarder's view of the collector."""

    url: str
    last_sent_ms: int | None
    failures: int  # failed attempts in the current outage
    last_error: str | None
    last_error_ms: int | None


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """One status document, as written to the status file and served over HTTP."""

    gateway_id: str
    running: bool
    pid: int
    started_ms: int
    updated_ms: int
    interval: float  # seconds between two documents
    devices: tuple[DeviceStatus, ...]
    buffer: BufferStatus
    collector: CollectorStatus
    format: int = STATUS_FORMAT

    def to_json(self) -> dict[str, Any]:
        """Return the document as JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_json(cls, document: Any) -> AgentStatus:
        """Build a status from its JSON data.

        :raises ValueError: when the document is not a status of this format.
        """
        if not isinstance(document, dict) or document.get("format") != STATUS_FORMAT:
            raise ValueError(f"not a status document of format {STATUS_FORMAT}")
        try:
            devices = tuple(
                DeviceStatus(**{**d, "device_ids": tuple(d["device_ids"])})
                for d in document["devices"]
            )
            return cls(**{**document, "devices": devices,
                          "buffer": BufferStatus(**document["buffer"]),
                          "collector": CollectorStatus(**document["collector"])})
        except (KeyError, TypeError) as err:
            raise ValueError(f"status document lacks a field or has an extra one "
                             f"({err})") from err


# --- collecting -----------------------------------------------------------------------


@dataclass
class StatusBoard:
    """The latest status of every unit id, updated by the pollers' monitors."""

    devices: dict[str, DeviceStatus] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: AgentConfig) -> StatusBoard:
        """Build a board listing every configured unit id as not polled yet."""
        board = cls()
        for group in config.devices:
            for unit in group.unit_ids:
                address = f"{group.settings.label}/{unit}"
                board.devices[address] = DeviceStatus(address, group.name)
        return board

    def record(self, address: str, group: str, polls: Sequence[Poll],
               error: str | None, now_ms: int) -> None:
        """Record one poll of a unit id: its polls, or none when the poller failed."""
        previous = self.devices.get(address, DeviceStatus(address, group))
        state = polls[0].state.value if polls else FAILED
        time_ms = polls[0].time_ms if polls else now_ms
        current = replace(previous, state=state, last_poll_ms=time_ms,
                          device_ids=tuple(p.device.device_id for p in polls)
                          or previous.device_ids)
        if state in RESPONDING:
            current = replace(current, last_success_ms=time_ms)
        if error is not None:
            current = replace(current, last_error=error, last_error_ms=time_ms)
        self.devices[address] = current

    def monitor(self, group: DeviceGroup, progress: Progress) -> GroupMonitor:
        """Build the monitor that one device group's poll loop reports to."""
        return GroupMonitor(self, group, progress)


class GroupMonitor:
    """Records a device group's polls on the board, and its rounds as progress."""

    def __init__(self, board: StatusBoard, group: DeviceGroup,
                 progress: Progress) -> None:
        self.board = board
        self.group = group
        self.progress = progress
        self.name = f"device group {group.name!r}"
        # Rounds may take this long on top of the poll interval.
        self.round_limit = round_limit(group.settings, len(group.unit_ids))

    def started(self) -> None:
        """Give the loop, started or restarted now, time for its first round."""
        self.progress.expect(self.name, self.round_limit)

    def polled(self, address: str, polls: Sequence[Poll], error: str | None) -> None:
        self.board.record(address, self.group.name, polls, error, _now_ms())

    def round_finished(self, next_round_in: float) -> None:
        self.progress.expect(self.name, next_round_in + self.round_limit)


# --- publishing ---------------------------------------------------------------------


class StatusPublisher:
    """Builds status documents and writes them to the file, the server and systemd."""

    def __init__(self, config: AgentConfig, board: StatusBoard, buffer: Buffer,
                 forwarder: Forwarder, notifier: Notifier,
                 server: StatusServer | None = None) -> None:
        self.config = config
        self.settings = config.status_config
        self.board = board
        self.buffer = buffer
        self.forwarder = forwarder
        self.notifier = notifier
        self.server = server
        self.started_ms = _now_ms()
        self._write_failed = False
        self._stats_error: str | None = None  # why reading the buffer fails, if it does

    async def run(self, stop: asyncio.Event) -> None:
        """Publish every interval until `stop` is set; a failed round is logged."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.settings.interval)
            except TimeoutError:
                pass
            if stop.is_set():
                return
            try:
                await self.publish()
                self._stats_error = None
            except BufferFileError as err:
                # Logged once: the buffer logs its own write failures, and a corrupt
                # file stays corrupt until the operator moves it aside.
                if self._stats_error is None:
                    logger.error("publishing the status failed: %s", err)
                self._stats_error = str(err)
            except Exception:
                # The next round tries again; polling and forwarding go on meanwhile.
                logger.exception("publishing the status failed")

    async def publish(self, running: bool = True) -> AgentStatus:
        """Build the current status and publish it; return it."""
        stats = await asyncio.to_thread(self.buffer.stats)
        status = self.build(stats, running)
        if self.server is not None:
            self.server.status = status
        await asyncio.to_thread(self._write, status)
        if running:
            self.notifier.status(summary(status))
        return status

    def build(self, stats: Any, running: bool) -> AgentStatus:
        """Assemble a status document from buffer stats and the board."""
        now_ms = _now_ms()
        forwarder = self.forwarder
        age = stats.oldest_age(now_ms)
        return AgentStatus(
            gateway_id=self.config.gateway_id, running=running, pid=os.getpid(),
            started_ms=self.started_ms, updated_ms=now_ms,
            interval=self.settings.interval,
            devices=tuple(self.board.devices.values()),
            buffer=BufferStatus(
                str(self.buffer.path), stats.polls, stats.readings, stats.bytes,
                stats.oldest_ms, None if age is None else round(age, 1),
                stats.dropped_polls, stats.dropped_readings,
                stats.quarantined_batches, stats.quarantined_readings),
            collector=CollectorStatus(
                forwarder.url, forwarder.last_sent_ms, forwarder.failures,
                forwarder.last_error, forwarder.last_error_ms),
        )

    def _write(self, status: AgentStatus) -> None:
        try:
            write_status(self.settings.path, status)
        except OSError as err:
            if not self._write_failed:
                logger.warning("cannot write status file %s (%s); `solarfleet-agent "
                               "status` shows an old status until it can",
                               self.settings.path, err)
            self._write_failed = True
            return
        if self._write_failed:
            logger.info("status file %s written again", self.settings.path)
            self._write_failed = False


def write_status(path: Path, status: AgentStatus) -> None:
    """Replace the status file atomically: write a temporary file, then rename it."""
    text = json.dumps(status.to_json(), indent=2) + "\n"
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name,
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class StatusServer:
    """Serves the latest status as JSON at GET /status. Use it as an async context."""

    def __init__(self, settings: StatusConfig) -> None:
        assert settings.port is not None
        self.settings = settings
        self.status: AgentStatus | None = None
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> StatusServer:
        app = web.Application()
        app.router.add_get(STATUS_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise StatusError(
                f"cannot serve the status on {self.settings.host}:{self.settings.port} "
                f"({reason}); choose another [status] port"
            ) from err
        logger.info("serving the status at http://%s:%d%s", self.settings.host,
                    self.settings.port, STATUS_PATH)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        if self.status is None:
            return web.json_response({"error": "no status yet; retry in a second"},
                                     status=503)
        return web.json_response(self.status.to_json())


# --- reading --------------------------------------------------------------------------


def read_status(path: Path) -> AgentStatus:
    """Read a status file.

    :raises StatusError: when the file is missing, unreadable or not a status.
    """
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise StatusError(f"no status file at {path}; it is written by "
                          "`solarfleet-agent run` once it starts") from None
    except OSError as err:
        raise StatusError(f"cannot read status file {path} ({err.strerror}); run the "
                          "command as the agent's user or root") from err
    except ValueError as err:
        raise StatusError(f"status file {path} is not JSON ({err}); the agent "
                          "rewrites it within one status interval") from err
    return _parse(document, str(path))


def fetch_status(settings: StatusConfig, timeout: float = 5.0) -> AgentStatus:
    """Get the status from the agent's HTTP endpoint.

    :raises StatusError: when the agent does not reply with a status.
    """
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}{STATUS_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            document = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise StatusError(f"no status from {url} ({reason}); check that the agent "
                          "runs") from err
    return _parse(document, url)


def _parse(document: Any, source: str) -> AgentStatus:
    try:
        return AgentStatus.from_json(document)
    except ValueError as err:
        raise StatusError(f"{source}: {err}; check that agent and command are the "
                          "same version") from err


# --- showing --------------------------------------------------------------------------


def summary(status: AgentStatus) -> str:
    """Summarise a status in one line, for systemd's STATUS=."""
    responding = sum(1 for d in status.devices if d.state in RESPONDING)
    buffer = status.buffer
    oldest = "" if buffer.oldest_age is None else f", oldest {buffer.oldest_age:.0f} s"
    collector = status.collector
    link = ("collector ok" if collector.failures == 0
            else f"collector failing ({collector.failures} failed attempts)")
    return (f"{responding} of {len(status.devices)} units responding; buffer "
            f"{buffer.readings} readings{oldest}; {link}")


def format_status(status: AgentStatus, now_ms: int) -> list[str]:
    """Render a status as the lines that `solarfleet-agent status` prints."""
    state = "running" if status.running else "stopped"
    lines = [f"agent {status.gateway_id}: {state}, pid {status.pid}, started "
             f"{utc(status.started_ms)}, status of {utc(status.updated_ms)}"]
    age = (now_ms - status.updated_ms) / 1000
    if status.running and age > STALE_INTERVALS * status.interval + 5:
        lines.append(f"warning: this status is {age:.0f} s old; the agent may be "
                     "stuck or gone, check `systemctl status solarfleet-agent`")
    lines.append("devices:")
    lines += [line for device in status.devices for line in _device_lines(device)]
    lines += _buffer_lines(status.buffer)
    lines += _collector_lines(status.collector)
    return lines


def _device_lines(device: DeviceStatus) -> list[str]:
    ids = f" ({', '.join(device.device_ids)})" if device.device_ids not in (
        (), (device.address,)) else ""
    success = "never" if device.last_success_ms is None else utc(device.last_success_ms)
    lines = [f"  {device.address}{ids} in {device.group}: {device.state}, last success "
             f"{success}"]
    if device.last_error is not None and device.last_error_ms is not None:
        lines.append(f"    last error {utc(device.last_error_ms)}: {device.last_error}")
    return lines


def _buffer_lines(buffer: BufferStatus) -> list[str]:
    oldest = "none" if buffer.oldest_age is None else f"{buffer.oldest_age:.0f} s old"
    return [
        f"buffer: {buffer.readings} readings in {buffer.polls} polls, {buffer.bytes} "
        f"bytes, oldest {oldest}",
        f"dropped: {buffer.dropped_readings} readings in {buffer.dropped_polls} polls",
        f"quarantined: {buffer.quarantined_batches} batches, "
        f"{buffer.quarantined_readings} readings",
    ]


def _collector_lines(collector: CollectorStatus) -> list[str]:
    sent = "never" if collector.last_sent_ms is None else utc(collector.last_sent_ms)
    lines = [f"collector: {collector.url}, last sent {sent}"]
    if collector.failures:
        lines.append(f"  failing: {collector.failures} failed attempts in a row")
    if collector.last_error is not None and collector.last_error_ms is not None:
        lines.append(f"  last error {utc(collector.last_error_ms)}: "
                     f"{collector.last_error}")
    return lines


def utc(time_ms: int) -> str:
    """Format Unix milliseconds as an ISO 8601 UTC time to the second."""
    return f"{datetime.fromtimestamp(time_ms / 1000, UTC):%Y-%m-%dT%H:%M:%SZ}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
