"""The alerts route of the read API, and the alert evaluator as a background task.

`GET /api/v1/alerts?state=open|resolved|all&installation_id=&limit=` lists alerts,
newest opened first. An operator key sees every installation, an owner key only its
owner's. Shards are queried in parallel, and a shard that is down is listed under
`missing` with its installations instead of failing the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from psycopg import AsyncConnection

from collector import alerts
from collector.app import SERVICES, Forbidden, reader
from collector.catalog import Installation, KeyIdentity
from collector.errors import NotFound
from collector.fleet_api import on_shards

DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
EVALUATOR = web.AppKey("alert_evaluator", alerts.AlertEvaluator)


def add_routes(app: web.Application) -> None:
    """Add the alerts route, and run the evaluator while the app runs.

    Call it after the services' startup context is added, which the evaluator uses.
    """
    app.router.add_get("/api/v1/alerts", get_alerts)
    app.cleanup_ctx.append(run_evaluator)


async def run_evaluator(app: web.Application) -> AsyncIterator[None]:
    """Run the alert evaluator every `[alerts] interval` seconds until shutdown."""
    services = app[SERVICES]
    evaluator = alerts.AlertEvaluator(services.shards, services.config.alerts)
    app[EVALUATOR] = evaluator
    task = asyncio.create_task(evaluator.run(), name="alert-evaluator")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def get_alerts(request: web.Request) -> web.Response:
    """List the alerts the request's key may read, in the requested state."""
    key = await reader(request)
    state = request.query.get("state", "open")
    if state not in alerts.STATES:
        raise web.HTTPBadRequest(
            reason=f"state={state!r} is invalid: use open, resolved or all"
        )
    limit = _limit(request)
    installations = await _installations(request, key)

    async def query(
        conn: AsyncConnection[Any], members: list[Installation]
    ) -> list[alerts.Alert]:
        ids = [installation.id for installation in members]
        return await alerts.list_alerts(conn, ids, state, limit)

    services = request.app[SERVICES]
    results, missing = await on_shards(services, installations, query)
    found = [alert for listed in results.values() for alert in listed]
    found.sort(key=lambda alert: (-alert.opened_ms, alert.id))
    return web.json_response(
        {
            "alerts": [alert.to_json() for alert in found[:limit]],
            "missing": [gap.to_json() for gap in missing],
        }
    )


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", str(DEFAULT_LIMIT))
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise web.HTTPBadRequest(
            reason=f"limit={text!r} is invalid: use an integer from 1 to {MAX_LIMIT}"
        )
    return int(text)


async def _installations(
    request: web.Request, key: KeyIdentity
) -> list[Installation]:
    """Return the installations to list: the one asked for, or all the key reads.

    :raises Forbidden: an owner key asks for an installation not its owner's, or for
        an unknown one, so that it cannot tell which ids exist.
    :raises NotFound: an operator key asks for an unknown installation.
    """
    auth = request.app[SERVICES].auth
    text = request.query.get("installation_id")
    if text is None:
        return await auth.installations(key.owner_id)
    valid = text.isascii() and text.isdigit() and len(text) <= 18
    installation = await auth.installation(int(text)) if valid else None
    if installation is not None and key.may_read(installation):
        return [installation]
    if key.owner_id is not None:
        raise Forbidden(f"key {key.name!r} may not read installation {text!r}")
    raise NotFound(f"installation {text!r} not found")
