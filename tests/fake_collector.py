"""A collector stand-in on 127.0.0.1 that records batches and replies as scripted."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from collector.batch import parse
from collector.errors import BatchRejected

TOKEN = "secret-token"


@dataclass
class Received:
    """One request as the collector saw it."""

    authorization: str | None
    content_type: str | None
    content_encoding: str | None
    document: dict[str, Any]


@dataclass
class FakeCollector:
    """Replies with the scripted statuses in order, then 200; records every request.

    `on_request` runs after a request is recorded and before the reply is sent, so a
    test can set its stop event there and the agent still gets this reply.
    """

    replies: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    on_request: Callable[[FakeCollector], None] | None = None
    # Replies to a request's body in place of 200, or returns None to let it pass;
    # `parse_with_collector` judges like the real collector.
    judge: Callable[[bytes], tuple[int, dict[str, Any]] | None] | None = None
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/batches", self._handle)
        # The raw body is kept compressed, so the test sees what the agent sent.
        self._runner = web.AppRunner(app, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        document = json.loads(gzip.decompress(body))
        self.received.append(Received(
            authorization=request.headers.get("Authorization"),
            content_type=request.headers.get("Content-Type"),
            content_encoding=request.headers.get("Content-Encoding"),
            document=document,
        ))
        if self.on_request is not None:
            self.on_request(self)
        verdict = self.judge(gzip.decompress(body)) if self.judge else None
        if self.replies:
            status, reply = self.replies.pop(0)
        elif verdict is not None:
            status, reply = verdict
        else:
            status = 200
            reply = {"batch_id": document["batch_id"],
                     "stored": len(document["readings"]), "duplicates": 0}
        return web.json_response(reply, status=status)


def parse_with_collector(body: bytes) -> tuple[int, dict[str, Any]] | None:
    """Reply 400 with the collector's own message where its parser rejects the body."""
    try:
        parse(body)
    except BatchRejected as err:
        return 400, {"error": str(err)}
    return None


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_after(count: int, stop: asyncio.Event) -> Callable[[FakeCollector], None]:
    """Build an `on_request` hook that sets `stop` at the `count`th request."""

    def hook(collector: FakeCollector) -> None:
        if len(collector.received) >= count:
            stop.set()

    return hook
