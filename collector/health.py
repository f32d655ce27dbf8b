"""`GET /healthz`: whether the catalog and each shard respond to a query, and how fast.

Each check runs `SELECT 1` on a pooled connection, all databases in parallel. Getting
the connection may take the config's `[server] shard_timeout`, and the whole check twice
that. The reply is 200 when every database answered and 503 (`"status": "degraded"`)
otherwise, so a load balancer or monitor can act on the status alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg
from aiohttp import web

from collector.errors import ShardUnavailable
from collector.sharding import ShardPools

logger = logging.getLogger(__name__)

Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


def add_routes(app: web.Application) -> None:
    """Serve `GET /healthz` (no authentication)."""
    app.router.add_get("/healthz", get_health)


async def get_health(request: web.Request) -> web.Response:
    """Check the catalog and every shard; 200 if all are reachable, else 503."""
    from collector.app import SERVICES  # app.py imports this module

    services = request.app[SERVICES]
    timeout = services.config.server.shard_timeout
    names = services.shards.names
    checks = [check_database("catalog", services.catalog.connection, timeout)]
    for name in names:
        connect = _shard_connection(services.shards, name)
        checks.append(check_database(f"shard {name}", connect, timeout))
    results = await asyncio.gather(*checks)
    catalog, *shards = results
    healthy = all(result["reachable"] for result in results)
    body = {
        "status": "ok" if healthy else "degraded",
        "catalog": catalog,
        "shards": dict(zip(names, shards, strict=True)),
    }
    return web.json_response(body, status=200 if healthy else 503)


def _shard_connection(shards: ShardPools, name: str) -> Connect:
    return lambda: shards.connection(name)


async def check_database(
    label: str, connect: Connect, timeout: float
) -> dict[str, Any]:
    """Run `SELECT 1` on a connection from `connect` and time it.

    Returns `{"reachable": true, "latency_ms": 1.2}`, or `{"reachable": false,
    "latency_ms": null, "error": "..."}` when the query failed or took longer than
    twice `timeout` seconds.
    """
    started = time.perf_counter()
    try:
        # The pool waits `timeout` for a connection; this bounds a hanging query too.
        async with asyncio.timeout(2 * timeout):
            async with connect() as conn:
                await conn.execute("SELECT 1")
    except TimeoutError:
        error = f"no answer within {2 * timeout:g} s"
    except (ShardUnavailable, psycopg.Error) as err:
        error = str(err).splitlines()[0]
    else:
        latency_ms = (time.perf_counter() - started) * 1000
        return {"reachable": True, "latency_ms": round(latency_ms, 1)}

    logger.debug("health check of %s failed: %s", label, error)
    return {"reachable": False, "latency_ms": None, "error": error}
