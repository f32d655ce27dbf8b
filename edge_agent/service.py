"""Both services under systemd: readiness and watchdog notifications, journal logging.

A unit of ``Type=notify`` gets the address of systemd's notification socket in
NOTIFY_SOCKET: a file system path, or an abstract socket name written with a leading
``@``. The service sends it datagrams of newline-separated ``KEY=VALUE`` assignments
(sd_notify(3)): ``READY=1`` once it serves, ``STATUS=`` with a one-line summary,
``STOPPING=1`` when it shuts down, and ``WATCHDOG=1`` at least every WATCHDOG_USEC
microseconds when the unit sets ``WatchdogSec``. Without NOTIFY_SOCKET every
notification is skipped, so the agent runs the same outside systemd.

The agent sends ``WATCHDOG=1`` only while each of its loops makes progress (`Progress`).
A loop that stops making progress stops the pings, and systemd restarts the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

# Seconds a loop may exceed the time it announced before the watchdog counts it as
# stuck. It covers work that the announcements leave out, such as SQLite commits on
# a slow SD card.
PROGRESS_SLACK = 60.0


class Notifier:
    """Sends sd_notify datagrams to systemd; does nothing without NOTIFY_SOCKET."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._socket: socket.socket | None = None
        self._failed = False  # a send failed, and the failure was logged

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build the notifier for the NOTIFY_SOCKET of `environ`, if any."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens for notifications."""
        return self.address is not None

    def send(self, *assignments: str) -> None:
        """Send ``KEY=VALUE`` assignments in one datagram; log a failure once."""
        if self.address is None:
            return
        message = "\n".join(assignments).encode()
        try:
            self._connected().send(message)
        except OSError as err:
            if not self._failed:
                logger.warning("cannot notify systemd at %s (%s); readiness and "
                               "watchdog notifications are lost", self.address, err)
            self._failed = True
            self.close()
            return
        if self._failed:
            logger.info("notifying systemd at %s again", self.address)
            self._failed = False

    def status(self, text: str) -> None:
        """Send a one-line STATUS= summary, shown by `systemctl status`."""
        self.send("STATUS=" + " ".join(text.split()))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _connected(self) -> socket.socket:
        if self._socket is None:
            assert self.address is not None
            address = self.address
            if address.startswith("@"):
                address = "\0" + address[1:]  # Linux abstract namespace
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.setblocking(False)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self._socket


def watchdog_interval(environ: Mapping[str, str] = os.environ,
                      pid: int | None = None) -> float | None:
    """Return the watchdog timeout in seconds that systemd set, or None.

    WATCHDOG_PID, when present, names the process the timeout is meant for; another
    process (a child of the agent) gets None.
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not a number of microseconds; sending no "
                       "watchdog pings", usec)
        return None
    return seconds if seconds > 0 else None


class Progress:
    """The time by which each loop of the agent must report progress again.

    A loop calls `expect(name, within)` when it made progress, with the seconds it
    may take until its next report. It is overdue once that time and `slack` passed.
    """

    def __init__(self, slack: float = PROGRESS_SLACK,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slack = slack
        self.clock = clock
        self._deadlines: dict[str, float] = {}

    def expect(self, name: str, within: float) -> None:
        """Record progress of `name`; it reports again within `within` seconds."""
        self._deadlines[name] = self.clock() + max(within, 0.0) + self.slack

    def forget(self, name: str) -> None:
        """Stop watching `name`, for a loop that ended on purpose."""
        self._deadlines.pop(name, None)

    def overdue(self) -> dict[str, float]:
        """Return the loops past their deadline, with the seconds they are late."""
        now = self.clock()
        return {name: now - deadline for name, deadline in self._deadlines.items()
                if now > deadline}


async def run_watchdog(notifier: Notifier, progress: Progress, interval: float,
                       stop: asyncio.Event) -> None:
    """Send WATCHDOG=1 every `interval` seconds while no loop is overdue, until stop."""
    stalled: set[str] = set()
    while not stop.is_set():
        late = progress.overdue()
        for name in sorted(late.keys() - stalled):
            logger.error("%s made no progress for %.0f s past its expected time; "
                         "watchdog pings stop, so systemd restarts the agent",
                         name, late[name] + progress.slack)
            notifier.status(f"{name} is stuck; waiting for the watchdog restart")
        for name in sorted(stalled - late.keys()):
            logger.info("%s makes progress again", name)
        stalled = set(late)
        if not stalled:
            notifier.send("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


# --- logging ------------------------------------------------------------------------

# Context fields that log calls pass with `extra=`, shown as key=value in this order.
LOG_FIELDS = ("device", "group", "batch", "shard")
# syslog priorities, which journald reads from a "<N>" prefix on each line.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
               logging.ERROR: 3, logging.CRITICAL: 2}


class EventFormatter(logging.Formatter):
    """Formats a record as one line with its context fields as key=value at the end.

    For journald (`journal=True`) the line has no timestamp, because journald adds
    its own, starts with the syslog priority, and a traceback joins it with " | ",
    because journald stores every line of a stream as an entry of its own.
    """

    def __init__(self, journal: bool = False) -> None:
        layout = "%(levelname)s %(name)s: %(message)s"
        super().__init__(layout if journal else "%(asctime)s " + layout)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{name}={_field_value(getattr(record, name))}"
                  for name in LOG_FIELDS if getattr(record, name, None) is not None]
        if fields:
            head, newline, rest = text.partition("\n")
            text = " ".join([head, *fields]) + newline + rest
        if not self.journal:
            return text
        priority = _PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>" + " | ".join(text.splitlines())


def _field_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def journal_stream(environ: Mapping[str, str] = os.environ) -> bool:
    """Tell whether stderr is connected to journald.

    systemd sets JOURNAL_STREAM to the device and inode of the stream it connected.
    A process whose stderr was redirected since then no longer logs to journald.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def configure_logging(level: int, environ: Mapping[str, str] = os.environ) -> None:
    """Log to stderr at `level`, in the journald format when stderr is journald's."""
    handler = logging.StreamHandler()
    handler.setFormatter(EventFormatter(journal=journal_stream(environ)))
    logging.basicConfig(level=level, handlers=[handler])
