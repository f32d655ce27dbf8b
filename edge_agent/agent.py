"""The agent service: pollers commit to the buffer, the forwarder drains it.

One task polls each device group and one task forwards. A task that fails, or returns
before the agent stops, is logged and restarted with backoff, so one failing device group
never stops the others. On stop the agent finishes within `shutdown_timeout` seconds:
pollers finish the commit in progress, the forwarder sends what it can, the buffer closes.

Under systemd (`edge_agent.service`) the agent notifies READY=1 once its tasks run,
STATUS= with every status document, STOPPING=1 on stop, and WATCHDOG=1 while every
task makes progress. Its status goes to a file beside the buffer and, with
`[status] port`, to an HTTP endpoint (`edge_agent.status`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import tenacity

from edge_agent.buffer import Buffer, BufferLimits, Overflow
from edge_agent.config import AgentConfig, DeviceGroup
from edge_agent.errors import BufferFileError, CollectorUnavailable
from edge_agent.forwarder import Forwarder
from edge_agent.poller import DeviceIds, run_endpoint
from edge_agent.readings import Poll
from edge_agent.retry import Backoff
from edge_agent.service import (
    Notifier,
    Progress,
    run_watchdog,
    watchdog_interval,
)
from edge_agent.status import GroupMonitor, StatusBoard, StatusPublisher, StatusServer

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0  # seconds from stop to a closed buffer

Sink = Callable[[Poll], Awaitable[None]]
# Called with settings, unit ids, poll interval, sink and stop event, the keyword
# `monitor` (a poller.RoundMonitor), and the group's profile keyword arguments
# (DeviceGroup.poll_options) where it has any.
PollEndpoint = Callable[..., Awaitable[None]]
FORWARDER = "forwarder"  # the forwarder's name in watchdog messages


class _Stopped(Exception):
    """The stop event was set while waiting to restart a task."""


class _EndedEarly(Exception):
    """A task returned although the agent was not stopping."""


async def run_agent(config: AgentConfig, stop: asyncio.Event, *,
                    poll_endpoint: PollEndpoint | None = None,
                    backoff: Backoff = Backoff(),
                    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
                    environ: Mapping[str, str] | None = None,
                    progress: Progress | None = None) -> None:
    """Poll, buffer and forward until `stop` is set, then shut down in bounded time.

    `poll_endpoint` defaults to `edge_agent.poller.run_endpoint`; tests pass a fake.
    `environ` (default `os.environ`) supplies systemd's NOTIFY_SOCKET and
    WATCHDOG_USEC; `progress` (default: a new `Progress`) is what the watchdog checks.

    :raises BufferFileError: when the buffer file cannot be opened.
    :raises StatusError: when the status port cannot be listened on.
    """
    poll_endpoint = poll_endpoint or run_endpoint
    environ = os.environ if environ is None else environ

    buffer = await asyncio.to_thread(open_buffer, config)
    logger.info("agent %s started: %d device groups, %d units, buffer %s",
                config.gateway_id, len(config.devices), config.unit_count,
                config.buffer.path)
    notifier = Notifier.from_environ(environ)
    try:
        async with AsyncExitStack() as stack:
            forwarder = await stack.enter_async_context(
                Forwarder(buffer, config.collector, config.gateway_id, backoff))
            server = None
            if config.status_config.port is not None:
                server = await stack.enter_async_context(
                    StatusServer(config.status_config))
            publisher = StatusPublisher(config, StatusBoard.for_config(config), buffer,
                                        forwarder, notifier, server)
            watchdog = watchdog_interval(environ)
            await _serve(config, stop, forwarder, publisher, poll_endpoint, backoff,
                         shutdown_timeout, progress or Progress(), watchdog)
    finally:
        await asyncio.to_thread(buffer.close)
        notifier.close()
    logger.info("agent %s stopped", config.gateway_id)


def open_buffer(config: AgentConfig) -> Buffer:
    """Open the config's buffer file, stamped with its gateway id, within its limits.

    The file's folder is created when missing, as systemd's StateDirectory would.

    :raises BufferFileError: when the folder or the file cannot be created or opened.
    """
    folder = Path(config.buffer.path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BufferFileError(
            f"cannot create the buffer folder {folder} ({err.strerror}); create it, "
            "writable by the agent's user, or set [buffer] path to a writable folder"
        ) from err
    limits = BufferLimits(max_bytes=config.buffer.max_bytes,
                          min_free_bytes=config.buffer.min_free_bytes,
                          overflow=Overflow(config.buffer.overflow))
    return Buffer(config.buffer.path, config.buffer.synchronous,
                  gateway_id=config.gateway_id, limits=limits)


async def _serve(config: AgentConfig, stop: asyncio.Event, forwarder: Forwarder,
                 publisher: StatusPublisher, poll_endpoint: PollEndpoint,
                 backoff: Backoff, shutdown_timeout: float, progress: Progress,
                 watchdog: float | None) -> None:
    tasks = _start_tasks(config, stop, forwarder, publisher, poll_endpoint, backoff,
                         progress)
    notifier = publisher.notifier
    await publisher.publish()
    notifier.send("READY=1")
    reporters = [asyncio.create_task(publisher.run(stop), name="status")]
    if watchdog is not None:
        # Two pings per timeout, so one late ping does not trigger a restart.
        reporters.append(asyncio.create_task(
            run_watchdog(notifier, progress, watchdog / 2, stop), name="watchdog"))
    await stop.wait()

    notifier.send("STOPPING=1", f"STATUS=stopping within {shutdown_timeout:g} s")
    logger.info("stopping: waiting up to %g s for pollers and the last send",
                shutdown_timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + shutdown_timeout
    # Pollers get half the time to finish; the last send gets what remains.
    await _finish(tasks, shutdown_timeout / 2)
    await _send_remaining(forwarder, deadline - loop.time())
    await _finish(reporters, 1.0)
    await publisher.publish(running=False)


def _start_tasks(config: AgentConfig, stop: asyncio.Event, forwarder: Forwarder,
                 publisher: StatusPublisher, poll_endpoint: PollEndpoint,
                 backoff: Backoff, progress: Progress) -> list[asyncio.Task[None]]:
    """Start one supervised task per device group and one for the forwarder."""
    sink = _buffer_sink(publisher.buffer)
    device_ids = DeviceIds()  # shared, so no two units of the agent share a serial
    tasks = []
    for group in config.devices:
        monitor = publisher.board.monitor(group, progress)
        start = partial(_poll_group, poll_endpoint, group, sink, stop, monitor,
                        device_ids)
        tasks.append(asyncio.create_task(
            _supervise(monitor.name, start, stop, backoff), name=f"poll {group.name}"))

    forwarder.on_progress = partial(progress.expect, FORWARDER)
    progress.expect(FORWARDER, config.collector.timeout)
    tasks.append(asyncio.create_task(
        _supervise(FORWARDER, partial(forwarder.run, stop), stop, backoff),
        name="forward",
    ))
    return tasks


def _poll_group(poll_endpoint: PollEndpoint, group: DeviceGroup, sink: Sink,
                stop: asyncio.Event, monitor: GroupMonitor,
                device_ids: DeviceIds) -> Awaitable[None]:
    monitor.started()
    # The group's name is sent to the collector as the name of each of its devices.
    return poll_endpoint(group.settings, group.unit_ids, group.poll_interval, sink, stop,
                         monitor=monitor, name=group.name, device_ids=device_ids,
                         **group.poll_options)


def _buffer_sink(buffer: Buffer) -> Sink:
    async def sink(poll: Poll) -> None:
        # Shielded: a poller cancelled at shutdown still completes the commit in its
        # thread, and Buffer.close waits for it.
        await asyncio.shield(asyncio.to_thread(buffer.add_poll, poll))

    return sink


async def _supervise(name: str, start: Callable[[], Awaitable[None]],
                     stop: asyncio.Event, backoff: Backoff) -> None:
    """Run `start()` until `stop` is set, restarting it with backoff when it fails."""

    async def sleep(seconds: float) -> None:
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except TimeoutError:
            return
        raise _Stopped

    async def run_once() -> None:
        await start()
        if not stop.is_set():
            raise _EndedEarly(f"{name} returned before the agent stopped")

    retrying = backoff.retrying(
        Exception, before_sleep=partial(_log_task_failure, name)
    ).copy(sleep=sleep)
    try:
        async for attempt in retrying:
            with attempt:
                await run_once()
    except _Stopped:
        pass


def _log_task_failure(name: str, state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    if isinstance(error, _EndedEarly):
        logger.error("%s; restarting it in %.1f s", error, wait)
    else:
        logger.error("%s failed; restarting it in %.1f s", name, wait, exc_info=error)


async def _finish(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Wait for the tasks to end after stop; cancel those still running at `timeout`."""
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        logger.warning("%s did not stop within %g s; cancelling it",
                       task.get_name(), timeout)
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results):
        if isinstance(result, Exception):
            logger.error("%s failed while stopping", task.get_name(), exc_info=result)


async def _send_remaining(forwarder: Forwarder, timeout: float) -> None:
    """Send batches until the buffer is empty, the collector fails or time runs out."""
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            while await forwarder.send_cycle():
                pass
    except TimeoutError:
        logger.warning("last send did not finish within %.1f s; the rest stays in "
                       "the buffer", timeout)
    except CollectorUnavailable as err:
        logger.warning("last send failed (%s); the rest stays in the buffer", err)
