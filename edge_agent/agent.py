"""The agent service: pollers commit to the buffer, the forwarder drains it.

One task polls each device group and one task forwards. A task that fails, or returns
before the agent stops, is logged and restarted with backoff, so one failing device group
never stops the others. On stop the agent finishes within `shutdown_timeout` seconds:
pollers finish the commit in progress, the forwarder sends what it can, the buffer closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import tenacity

from edge_agent.buffer import Buffer, BufferLimits, Overflow
from edge_agent.config import AgentConfig, DeviceGroup
from edge_agent.errors import CollectorUnavailable
from edge_agent.forwarder import Forwarder
from edge_agent.readings import Poll
from edge_agent.retry import Backoff

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0  # seconds from stop to a closed buffer

Sink = Callable[[Poll], Awaitable[None]]
# Called with settings, unit ids, poll interval, sink and stop event, plus the
# group's profile keyword arguments (DeviceGroup.poll_options) where it has any.
PollEndpoint = Callable[..., Awaitable[None]]


class _Stopped(Exception):
    """The stop event was set while waiting to restart a task."""


class _EndedEarly(Exception):
    """A task returned although the agent was not stopping."""


async def run_agent(config: AgentConfig, stop: asyncio.Event, *,
                    poll_endpoint: PollEndpoint | None = None,
                    backoff: Backoff = Backoff(),
                    shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Poll, buffer and forward until `stop` is set, then shut down in bounded time.

    `poll_endpoint` defaults to `edge_agent.poller.run_endpoint`; tests pass a fake.

    :raises BufferFileError: when the buffer file cannot be opened.
    """
    if poll_endpoint is None:
        # Imported here so that the agent's tests, which pass a fake, need no Modbus stack.
        from edge_agent.poller import run_endpoint as poll_endpoint

    buffer = await asyncio.to_thread(open_buffer, config)
    logger.info("agent %s started: %d device groups, %d units, buffer %s",
                config.gateway_id, len(config.devices), config.unit_count,
                config.buffer.path)
    try:
        async with Forwarder(buffer, config.collector, config.gateway_id,
                             backoff) as forwarder:
            await _serve(config, stop, buffer, forwarder, poll_endpoint, backoff,
                         shutdown_timeout)
    finally:
        await asyncio.to_thread(buffer.close)
    logger.info("agent %s stopped", config.gateway_id)


def open_buffer(config: AgentConfig) -> Buffer:
    """Open the config's buffer file, stamped with its gateway id, within its limits.

    :raises BufferFileError: when the file cannot be opened.
    """
    limits = BufferLimits(max_bytes=config.buffer.max_bytes,
                          min_free_bytes=config.buffer.min_free_bytes,
                          overflow=Overflow(config.buffer.overflow))
    return Buffer(config.buffer.path, config.buffer.synchronous,
                  gateway_id=config.gateway_id, limits=limits)


async def _serve(config: AgentConfig, stop: asyncio.Event, buffer: Buffer,
                 forwarder: Forwarder, poll_endpoint: PollEndpoint, backoff: Backoff,
                 shutdown_timeout: float) -> None:
    sink = _buffer_sink(buffer)
    tasks = [
        asyncio.create_task(
            _supervise(f"device group {group.name!r}",
                       partial(_poll_group, poll_endpoint, group, sink, stop),
                       stop, backoff),
            name=f"poll {group.name}",
        )
        for group in config.devices
    ]
    tasks.append(asyncio.create_task(
        _supervise("forwarder", partial(forwarder.run, stop), stop, backoff),
        name="forward",
    ))
    await stop.wait()

    logger.info("stopping: waiting up to %g s for pollers and the last send",
                shutdown_timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + shutdown_timeout
    # Pollers get half the time to finish; the last send gets what remains.
    await _finish(tasks, shutdown_timeout / 2)
    await _send_remaining(forwarder, deadline - loop.time())


def _poll_group(poll_endpoint: PollEndpoint, group: DeviceGroup, sink: Sink,
                stop: asyncio.Event) -> Awaitable[None]:
    return poll_endpoint(group.settings, group.unit_ids, group.poll_interval, sink, stop,
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
