"""The collector's HTTP API (aiohttp): batch ingest, read routes, health.

Every error reply is `{"error": "<one line>"}`. Its status shows the sender what to do:
400 fix the batch, 401 or 403 fix the token or gateway id, 413 send smaller batches,
415 send gzip or identity, 503 retry later.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from collector import batch as wire
from collector import dashboard, energy, fleet, gaps, health, ingest, metrics
from collector import migrate
from collector.catalog import Authenticator, Installation, KeyIdentity
from collector.config import CollectorConfig
from collector.errors import BatchRejected, DatabaseError, NotFound, ShardUnavailable
from collector.sharding import ShardPools

logger = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024
# Bounds of the read routes' `from` and `to`: a window of at most 366 days, ending
# before 2100-01-01 UTC.
MAX_WINDOW_MS = 366 * 86_400_000
MAX_QUERY_TIME_MS = 4_102_444_800_000
_ENCODINGS = ("", "identity", "gzip")


@dataclass(frozen=True, slots=True)
class Services:
    """Pools and caches of the request handlers, opened at startup."""

    config: CollectorConfig
    databases: migrate.Databases
    catalog: AsyncConnectionPool
    auth: Authenticator
    shards: ShardPools


SERVICES = web.AppKey("services", Services)


class Unauthorized(Exception):
    """Missing, unknown or revoked token or key (401)."""


class Forbidden(Exception):
    """A valid token used for something it does not cover (403)."""


_STATUS: dict[type[Exception], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    ShardUnavailable: 503,
    DatabaseError: 503,
}


def create_app(config: CollectorConfig) -> web.Application:
    """Build the collector application.

    At startup it opens the databases the config names (starting the embedded
    PostgreSQL when none is configured), applies pending migrations and opens a pool
    per shard. A shard that is down at startup gets 503s until it is reachable.
    """
    # The server leaves bodies encoded, because aiohttp's own decoding rejects br or
    # zstd with a plain-text 400 before any handler runs. read_body decodes gzip.
    app = web.Application(
        middlewares=[_json_errors], handler_args={"auto_decompress": False}
    )
    app.cleanup_ctx.append(_services(config))
    app.router.add_post("/api/v1/batches", post_batch)
    app.router.add_get("/api/v1/installations/{installation_id}/latest", get_latest)
    app.router.add_get("/api/v1/installations/{installation_id}/energy", get_energy)
    app.router.add_get("/api/v1/installations/{installation_id}/gaps", get_gaps)
    health.add_routes(app)
    metrics.add_routes(app)
    dashboard.add_routes(app)
    # Imported here because the fleet API's handlers use this module's helpers.
    from collector import alerts_api, fleet_api

    fleet_api.add_routes(app)
    alerts_api.add_routes(app)
    return app


def _services(
    config: CollectorConfig,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        dbs = await asyncio.to_thread(
            migrate.prepare, config.database, skip_unreachable_shards=True
        )
        timeout = config.server.shard_timeout
        catalog = AsyncConnectionPool(
            dbs.catalog_dsn,
            min_size=1,
            max_size=5,
            open=False,
            name="catalog",
            timeout=timeout,
            reconnect_timeout=timeout,
            check=AsyncConnectionPool.check_connection,
        )
        shards = ShardPools(
            dbs.shards,
            timeout,
            dbs.pending_shards,
            functools.partial(migrate.migrate_shard, dbs.catalog_dsn),
        )
        await catalog.open(wait=False)
        await shards.open()
        auth = Authenticator(catalog, config.server.auth_cache_seconds)
        app[SERVICES] = Services(config, dbs, catalog, auth, shards)
        logger.info("collector ready with shards %s", ", ".join(shards.names))
        try:
            yield
        finally:
            await shards.close()
            await catalog.close()
            await asyncio.to_thread(dbs.close)

    return context


@web.middleware
async def _json_errors(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    try:
        return await handler(request)
    except BatchRejected as err:
        return _error(err.status, str(err))
    except tuple(_STATUS) as err:
        status = next(code for kind, code in _STATUS.items() if isinstance(err, kind))
        return _error(status, str(err))
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _error(err.status, err.reason)
    except ConnectionResetError as err:  # aiohttp's ClientConnectionResetError too
        logger.debug(
            "%s %s: client disconnected: %s", request.method, request.path, err
        )
        raise
    except Exception:
        request_id = secrets.token_hex(6)
        logger.exception(
            "%s %s failed (request id %s)", request.method, request.path, request_id
        )
        return _error(
            500, f"internal error; see the collector log (request id {request_id})"
        )


def _error(status: int, message: str) -> web.Response:
    line = message.splitlines()[0] if message else "error"
    return web.json_response({"error": line}, status=status)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthorized("missing bearer token: send Authorization: Bearer <token>")
    return credential.strip()


async def post_batch(request: web.Request) -> web.Response:
    """Store one batch from a gateway; reply only after its shard committed it."""
    services = request.app[SERVICES]
    identity = await services.auth.gateway(_bearer(request))
    if identity is None:
        raise Unauthorized("unknown or revoked gateway token")
    body = await read_body(request, services.config.server.max_batch_bytes)
    tolerance_ms = round(services.config.server.future_tolerance * 1000)
    batch = wire.parse(body, _now_ms(), tolerance_ms)
    if batch.gateway_id != identity.gateway_id:
        raise Forbidden(
            f"gateway_id {batch.gateway_id!r} does not match the token's gateway"
        )
    _log_rejections(batch, services.config.server.future_tolerance)
    started = time.perf_counter()
    async with services.shards.connection(identity.shard) as conn:
        result = await ingest.store_batch(conn, identity.installation_id, batch)
    seconds = time.perf_counter() - started
    metrics.observe_batch(request.app, identity.shard, result, seconds)
    return web.json_response(
        {
            "batch_id": result.batch_id,
            "stored": result.stored,
            "duplicates": result.duplicates,
            "rejected": result.rejected,
        }
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _log_rejections(batch: wire.Batch, future_tolerance: float) -> None:
    rejected = batch.rejected
    if rejected == wire.Rejections():
        return
    logger.warning(
        "gateway %s batch %s: left out %d readings stamped more than %g s ahead of "
        "the collector's clock, %d readings stamped before 2000-01-01, %d states "
        "and %d gaps with such times: check the gateway's clock",
        batch.gateway_id,
        batch.batch_id,
        rejected.future,
        future_tolerance,
        rejected.early,
        rejected.states,
        rejected.gaps,
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read the request body, gzip-decoded, stopping once it exceeds `limit` bytes.

    A gzip body is decoded while it streams in, never beyond `limit` + 1 bytes, so a
    small compressed body that expands enormously is cut off at the limit.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _ENCODINGS:
        raise BatchRejected(
            f"unsupported Content-Encoding {encoding!r}: send gzip or identity",
            status=415,
        )
    decoder = None
    if encoding == "gzip":
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip, not zlib
    body = bytearray()
    try:
        async for chunk in request.content.iter_chunked(_READ_CHUNK):
            if decoder is not None:
                chunk = decoder.decompress(chunk, limit + 1 - len(body))
            body += chunk
            if len(body) > limit:
                raise BatchRejected(
                    f"body exceeds the limit of {limit} bytes after decompression: "
                    "send smaller batches",
                    status=413,
                )
    except (web.RequestPayloadError, zlib.error) as err:
        raise BatchRejected(
            f"body cannot be decoded as {encoding or 'identity'}"
        ) from err
    # A truncated stream, or data after the end of the gzip member, is not a body.
    if decoder is not None and (not decoder.eof or decoder.unused_data):
        raise BatchRejected("body cannot be decoded as gzip")
    return bytes(body)


async def get_latest(request: web.Request) -> web.Response:
    """Return the latest value of every channel and the state of every device."""
    services = request.app[SERVICES]
    installation_id, shard = await _operator_installation(request)
    async with services.shards.connection(shard) as conn:
        latest = await fleet.latest(conn, installation_id)
    return web.json_response(latest)


async def get_energy(request: web.Request) -> web.Response:
    """Return the energy of every counter channel within `from` and `to`."""
    services = request.app[SERVICES]
    installation_id, shard = await _operator_installation(request)
    window = _window(request)
    async with services.shards.connection(shard) as conn:
        counters = await energy.installation_energy(conn, installation_id, window)
    return web.json_response(
        {
            "installation_id": installation_id,
            "from": window[0],
            "to": window[1],
            "counters": [counter.to_json() for counter in counters],
        }
    )


async def get_gaps(request: web.Request) -> web.Response:
    """Return the time ranges within `from` and `to` without data, and why."""
    services = request.app[SERVICES]
    installation_id, shard = await _operator_installation(request)
    window = _window(request)
    offline_ms = round(services.config.server.gateway_offline_after * 1000)
    async with services.shards.connection(shard) as conn:
        found = await gaps.find_gaps(
            conn, installation_id, window, offline_ms, _now_ms()
        )
    return web.json_response(
        {
            "installation_id": installation_id,
            "from": window[0],
            "to": window[1],
            "gaps": [gap.to_json() for gap in found],
        }
    )


async def _operator_installation(request: web.Request) -> tuple[int, str]:
    """Check the API key and return the installation id and its shard."""
    installation = await readable_installation(request)
    return installation.id, installation.shard


async def reader(request: web.Request) -> KeyIdentity:
    """Return the identity of the request's read API key.

    :raises Unauthorized: the key is missing, unknown or revoked.
    """
    key = await request.app[SERVICES].auth.key(_bearer(request))
    if key is None:
        raise Unauthorized("unknown or revoked API key: create one with `keys add`")
    return key


async def readable_installation(request: web.Request) -> Installation:
    """Return the installation of the request's path if its API key may read it.

    An owner key gets 403 both for another owner's installation and for an unknown
    id, so that it cannot tell which ids exist.

    :raises Unauthorized: the key is missing, unknown or revoked.
    :raises Forbidden: an owner key asks for an installation not its owner's.
    :raises NotFound: an operator key asks for an unknown installation.
    """
    key = await reader(request)
    installation_id = _installation_id(request, key)
    installation = await request.app[SERVICES].auth.installation(installation_id)
    if installation is not None and key.may_read(installation):
        return installation
    if key.owner_id is not None:
        raise Forbidden(
            f"key {key.name!r} may not read installation {installation_id}"
        )
    raise NotFound(f"installation {installation_id} not found")


def _window(request: web.Request) -> tuple[int, int]:
    """Read the `from` and `to` query parameters, Unix milliseconds, from < to."""
    start = _query_time(request, "from")
    end = _query_time(request, "to")
    if end <= start:
        raise web.HTTPBadRequest(reason=f"to {end} must be later than from {start}")
    if end - start > MAX_WINDOW_MS:
        raise web.HTTPBadRequest(
            reason=f"window of {end - start} ms is longer than the limit of "
            f"{MAX_WINDOW_MS} ms (366 days): ask for a shorter range"
        )
    return start, end


def _query_time(request: web.Request, name: str) -> int:
    text = request.query.get(name, "")
    valid = text.isascii() and text.isdigit() and len(text) <= 16
    if not valid or not wire.MIN_TIME_MS <= int(text) <= MAX_QUERY_TIME_MS:
        raise web.HTTPBadRequest(
            reason=f"query parameter {name}={text!r} is invalid: send Unix "
            f"milliseconds from {wire.MIN_TIME_MS} to {MAX_QUERY_TIME_MS}"
        )
    return int(text)


def _installation_id(request: web.Request, key: KeyIdentity) -> int:
    text = request.match_info["installation_id"]
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    if key.owner_id is not None:
        raise Forbidden(f"key {key.name!r} may not read installation {text!r}")
    raise NotFound(f"installation {text!r} not found: ids are positive integers")

