"""Forwarding: batches from the buffer to the collector, retried until it stored them.

Each batch is sent as gzip JSON to ``<url>/api/v1/batches`` with the gateway's bearer
token. A 200 reply that names the batch id confirms the batch, and only then is the batch
deleted from the buffer. No connection, a timeout, a 5xx reply, 408, 429, or a reply that
points at the agent's own settings (401, 403, 404, 3xx) keeps the batch and retries it
with backoff, without end. Any other 4xx reply means the collector rejected this batch's
content and stored nothing of it. A batch of two or more polls is then split in two and
the halves are sent in turn, so that one poll the collector rejects (400) or a batch
too large (413) holds back no other reading. A single poll that is rejected moves to
the buffer's quarantine, and the next batch is sent.

Each send cycle sends a batch of the live lane (the polls written since the last cycle)
and then one of the backlog lane (the oldest polls). So while a backlog drains, oldest
first, the newest readings still arrive one cycle after they were polled.
"""

from __future__ import annotations

import asyncio
import enum
import gzip
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import aiohttp
import tenacity

from edge_agent.buffer import Batch, Buffer, Lane
from edge_agent.config import CollectorConfig
from edge_agent.errors import CollectorUnavailable
from edge_agent.retry import Backoff

logger = logging.getLogger(__name__)

WIRE_FORMAT = 1
BATCHES_PATH = "/api/v1/batches"
_REASON_CHARS = 200  # a quarantine reason is cut to this length

# Replies that are not about the batch itself: waiting may clear them (408, 429), or
# the operator must fix the agent's settings (401 token, 403 gateway id, 404 URL).
_RETRIED_4XX = {
    401: "the collector rejected the token; check collector.token",
    403: "the token belongs to another gateway; check gateway.id and collector.token",
    404: "the collector has no batch endpoint at this URL; check collector.url",
    408: "the collector timed out reading the request",
    429: "the collector asked to slow down",
}


class Outcome(enum.Enum):
    """Result of one send attempt that reached a decision."""

    SENT = "sent"  # the collector stored the batch; it is deleted from the buffer
    EMPTY = "empty"  # nothing to send
    QUARANTINED = "quarantined"  # the collector rejected the batch
    SPLIT = "split"  # the collector rejected the batch; its halves are sent next


class _Stopped(Exception):
    """The stop event was set while waiting for the next retry."""


class Forwarder:
    """Sends the buffer's batches to one collector. Use it as an async context manager."""

    def __init__(self, buffer: Buffer, collector: CollectorConfig, gateway_id: str,
                 backoff: Backoff = Backoff()) -> None:
        # The buffer hands out only polls stamped with its own gateway id, so sending
        # them under another id would pass off one gateway's readings as another's.
        if buffer.gateway_id != gateway_id:
            raise ValueError(f"buffer of gateway {buffer.gateway_id!r} cannot be "
                             f"forwarded as gateway {gateway_id!r}")
        self.buffer = buffer
        self.collector = collector
        self.gateway_id = gateway_id
        self.backoff = backoff
        self.url = collector.url.rstrip("/") + BATCHES_PATH
        self._session: aiohttp.ClientSession | None = None
        self._failures = 0  # failed attempts in the current outage
        self._batch_id: str | None = None  # the batch of the attempt in progress
        # Called with the seconds within which the forwarder makes progress again:
        # before each attempt, and before each wait for new polls or a retry.
        self.on_progress: Callable[[float], None] | None = None
        self.last_sent_ms: int | None = None  # when the collector last stored a batch
        self.last_error: str | None = None  # why the last failed attempt failed
        self.last_error_ms: int | None = None

    @property
    def failures(self) -> int:
        """Failed attempts in the current outage; 0 while batches get through."""
        return self._failures

    async def __aenter__(self) -> Forwarder:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.collector.timeout),
            headers={"Authorization": f"Bearer {self.collector.token}"},
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, stop: asyncio.Event) -> None:
        """Send batches until `stop` is set, waiting `interval` while the buffer is empty."""
        logger.info("forwarding batches of up to %d readings to %s",
                    self.collector.batch_size, self.url)
        while not stop.is_set():
            outcomes = []
            for lane in (Lane.LIVE, Lane.BACKLOG):
                outcome = await self._send_with_retry(stop, lane)
                if outcome is None:
                    break
                outcomes.append(outcome)
            if outcomes == [Outcome.EMPTY, Outcome.EMPTY]:
                self._announce(self.collector.interval)
                await _wait(stop, self.collector.interval)
        logger.info("forwarder stopped")

    async def send_cycle(self) -> bool:
        """Send the live lane's next batch, then the backlog's, once each.

        Return False when both lanes were empty.

        :raises CollectorUnavailable: as `send_once`.
        """
        live = await self.send_once(Lane.LIVE)
        backlog = await self.send_once(Lane.BACKLOG)
        return not (live is Outcome.EMPTY and backlog is Outcome.EMPTY)

    async def send_once(self, lane: Lane = Lane.BACKLOG) -> Outcome:
        """Send the next batch of `lane` once.

        :raises CollectorUnavailable: when the batch could not be delivered now; it stays
            in the buffer and keeps its id.
        """
        self._announce(self.collector.timeout)
        self._batch_id = None
        batch, body = await asyncio.to_thread(self._next_body, lane)
        if batch is None:
            return Outcome.EMPTY
        self._batch_id = batch.batch_id

        status, reply = await self._post(body)
        message = _error_message(reply)
        if status == 200:
            self._check_confirmation(batch.batch_id, reply)
            deleted = await asyncio.to_thread(self.buffer.confirm, batch.batch_id)
            self.last_sent_ms = time.time_ns() // 1_000_000
            logger.debug("sent %s batch %s: %d readings, %d gaps", lane,
                         batch.batch_id, deleted, len(batch.gaps),
                         extra={"batch": batch.batch_id})
            return Outcome.SENT
        if status >= 500 or status in _RETRIED_4XX or not 400 <= status < 500:
            text = f"collector {self.url} replied HTTP {status} to batch {batch.batch_id}"
            if status in _RETRIED_4XX:
                text += f": {_RETRIED_4XX[status]}"
            if message:
                text += f" ({message})"
            raise CollectorUnavailable(text)

        reason = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        halves = await asyncio.to_thread(self.buffer.split, batch.batch_id)
        if halves is not None:
            logger.warning("collector rejected batch %s (%d polls) with %s; split it "
                           "into %s and %s to send the polls it accepts",
                           batch.batch_id, len(batch.states), reason, *halves,
                           extra={"batch": batch.batch_id})
            return Outcome.SPLIT

        await asyncio.to_thread(self.buffer.quarantine, batch.batch_id, reason)
        logger.error("collector rejected batch %s (%d readings) with %s; moved it to "
                     "quarantine, see `solarfleet-agent buffer`",
                     batch.batch_id, len(batch.readings), reason,
                     extra={"batch": batch.batch_id})
        return Outcome.QUARANTINED

    # --- one request ------------------------------------------------------------------

    def _next_body(self, lane: Lane) -> tuple[Batch | None, bytes]:
        batch = self.buffer.next_batch(self.collector.batch_size, lane)
        if batch is None:
            return None, b""
        return batch, encode_batch(batch, self.gateway_id)

    async def _post(self, body: bytes) -> tuple[int, str]:
        """POST the body; return the reply's status and text."""
        if self._session is None:
            raise RuntimeError("Forwarder used outside `async with`")
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        try:
            async with self._session.post(self.url, data=body, headers=headers,
                                          allow_redirects=False) as response:
                text = await response.text(errors="replace")
                return response.status, text
        except TimeoutError as err:
            raise CollectorUnavailable(
                f"collector {self.url} did not reply within {self.collector.timeout:g} s"
            ) from err
        except aiohttp.ClientError as err:
            raise CollectorUnavailable(
                f"cannot reach collector {self.url}: {err or type(err).__name__}"
            ) from err

    def _check_confirmation(self, batch_id: str, reply: str) -> None:
        # A 200 from something other than the collector (a captive portal, a web server
        # at a wrong URL) must not delete readings, so the reply has to name the batch.
        try:
            confirmed = json.loads(reply).get("batch_id")
        except (ValueError, AttributeError):
            confirmed = None
        if confirmed != batch_id:
            raise CollectorUnavailable(
                f"{self.url} replied 200 to batch {batch_id} without confirming it; "
                "check collector.url"
            )

    # --- retrying ---------------------------------------------------------------------

    async def _send_with_retry(self, stop: asyncio.Event,
                               lane: Lane) -> Outcome | None:
        """Send the lane's next batch, retrying with backoff; None if `stop` was set."""

        async def sleep(seconds: float) -> None:
            self._announce(seconds)
            if await _wait(stop, seconds):
                raise _Stopped

        retrying = self.backoff.retrying(
            CollectorUnavailable, before_sleep=self._note_failure
        ).copy(sleep=sleep)
        try:
            async for attempt in retrying:
                with attempt:
                    outcome = await self.send_once(lane)
        except _Stopped:
            return None

        self._note_recovery()
        return outcome

    def _note_failure(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.last_error = str(error)
        self.last_error_ms = time.time_ns() // 1_000_000
        fields = {"batch": self._batch_id}
        if self._failures == 0:
            logger.warning("%s; retrying with backoff, readings stay in the buffer",
                           error, extra=fields)
        else:
            logger.debug("attempt %d failed: %s", state.attempt_number, error,
                         extra=fields)
        self._failures += 1

    def _announce(self, seconds: float) -> None:
        if self.on_progress is not None:
            self.on_progress(seconds)

    def _note_recovery(self) -> None:
        if self._failures:
            logger.info("collector %s reachable again after %d failed attempts",
                        self.url, self._failures)
        self._failures = 0


def encode_batch(batch: Batch, gateway_id: str) -> bytes:
    """Build the gzip-compressed JSON body of a batch, in wire format 1 with gaps."""
    document = {
        "format": WIRE_FORMAT,
        "batch_id": batch.batch_id,
        "gateway_id": gateway_id,
        "devices": [asdict(device) for device in batch.devices],
        "channels": [{"device_id": device_id, "name": channel.name, "unit": channel.unit}
                     for device_id, channel in batch.channels],
        "readings": [[device_id, channel, time_ms, _finite(value)]
                     for device_id, channel, time_ms, value in batch.readings],
        "states": [list(row) for row in batch.states],
        "gaps": [{"device_id": gap.device_id, "first_time": gap.first_ms,
                  "last_time": gap.last_ms, "readings": gap.readings,
                  "polls": gap.polls, "reason": gap.reason} for gap in batch.gaps],
    }
    text = json.dumps(document, separators=(",", ":"), allow_nan=False)
    return gzip.compress(text.encode(), compresslevel=6)


def _finite(value: float | None) -> float | None:
    # JSON has no NaN or infinity, and a value that is not a number is sent as null.
    if value is None or not math.isfinite(value):
        return None
    return value


def _error_message(text: str) -> str:
    """Return the `error` field of a JSON reply, or its text, as one short line."""
    message: Any = text
    try:
        document = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(document, dict) and "error" in document:
            message = document["error"]
    return " ".join(str(message).split())[:_REASON_CHARS]


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`; return whether it is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
    return stop.is_set()
