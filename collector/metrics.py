"""Prometheus metrics of the collector at `GET /metrics`, in the text exposition format.

Counters live in this process and start at zero with it. The open alerts gauge is
counted from the shards' `alerts` tables at every scrape. The format is written by hand
because the collector exposes a handful of series and needs none of prometheus_client's
registries, multiprocess mode or push gateway.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
import psycopg
from aiohttp import web

from collector.errors import ShardUnavailable
from collector.ingest import IngestResult
from collector.sharding import ShardPools

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCHES_PATH = "/api/v1/batches"
# Upper bounds in seconds of the shard write latency histogram: from a small batch on a
# local server to the 5 s default shard timeout and beyond.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The `reason` label of a rejected batch, by the reply's status.
REJECT_REASONS = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    413: "too_large",
    503: "unavailable",
}
OTHER_REASON = "other"
READING_OUTCOMES = ("stored", "duplicate", "rejected")

# An alert is open until the evaluator sets its resolved_at.
_OPEN_ALERTS = "SELECT count(*) FROM alerts WHERE resolved_at IS NULL"


@dataclass
class Histogram:
    """Cumulative bucket counts, sum and count of observed values."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        """Add one value to every bucket whose upper bound it does not exceed."""
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[index] += 1
        self.total += value
        self.count += 1


@dataclass
class IngestMetrics:
    """Counters of the batch route and shard write latencies, by shard."""

    batches: dict[str, int] = field(default_factory=dict)
    readings: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(READING_OUTCOMES, 0)
    )
    rejected: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (*REJECT_REASONS.values(), OTHER_REASON), 0
        )
    )
    write_seconds: dict[str, Histogram] = field(default_factory=dict)

    def stored(self, shard: str, result: IngestResult, seconds: float) -> None:
        """Count a batch that `shard` committed in `seconds`."""
        self.batches[shard] = self.batches.get(shard, 0) + 1
        self.readings["stored"] += result.stored
        self.readings["duplicate"] += result.duplicates
        self.readings["rejected"] += result.rejected
        self.write_seconds.setdefault(shard, Histogram()).observe(seconds)

    def rejected_batch(self, status: int) -> None:
        """Count a batch rejected with the error `status`."""
        reason = REJECT_REASONS.get(status, OTHER_REASON)
        self.rejected[reason] += 1


METRICS = web.AppKey("metrics", IngestMetrics)


def add_routes(app: web.Application) -> None:
    """Serve `GET /metrics` and count the batch route's replies."""
    app[METRICS] = IngestMetrics()
    app.on_response_prepare.append(_count_rejection)
    app.router.add_get("/metrics", get_metrics)


def observe_batch(
    app: web.Application, shard: str, result: IngestResult, seconds: float
) -> None:
    """Count a batch stored in `shard` and its write latency, if metrics are on."""
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.stored(shard, result, seconds)


async def _count_rejection(request: web.Request, response: web.StreamResponse) -> None:
    # A response signal receives the final status, after the error middleware turned an
    # exception into a JSON reply.
    if request.method != "POST" or request.path != BATCHES_PATH:
        return
    if response.status >= 400:
        request.app[METRICS].rejected_batch(response.status)


async def get_metrics(request: web.Request) -> web.Response:
    """Render every metric in the Prometheus text exposition format."""
    from collector.app import SERVICES  # app.py imports this module

    services = request.app[SERVICES]
    metrics = request.app[METRICS]
    shards = services.shards.names
    alerts, reachable = await _open_alerts(services.shards, shards)
    lines = [
        *render_ingest(metrics, shards),
        *_family(
            "solarfleet_open_alerts",
            "gauge",
            "Open alerts in the shards that answered.",
            [({}, alerts)],
        ),
        *_family(
            "solarfleet_shard_up",
            "gauge",
            "1 if the shard answered the open alerts query of this scrape, else 0.",
            [({"shard": name}, int(name in reachable)) for name in shards],
        ),
    ]
    return web.Response(
        body=("\n".join(lines) + "\n").encode(),
        headers={"Content-Type": CONTENT_TYPE},
    )


def render_ingest(metrics: IngestMetrics, shards: Sequence[str]) -> list[str]:
    """Render the ingest counters and the per-shard write latency histograms."""
    histograms = [
        (name, metrics.write_seconds.get(name, Histogram())) for name in shards
    ]
    return [
        *_family(
            "solarfleet_ingest_batches_total",
            "counter",
            "Batches committed to a shard.",
            [({"shard": name}, metrics.batches.get(name, 0)) for name in shards],
        ),
        *_family(
            "solarfleet_ingest_readings_total",
            "counter",
            "Readings of committed batches: stored, already stored, or rejected for "
            "an implausible time.",
            [({"outcome": key}, value) for key, value in metrics.readings.items()],
        ),
        *_family(
            "solarfleet_ingest_rejected_batches_total",
            "counter",
            "Batches answered with an error, by reason.",
            [({"reason": key}, value) for key, value in metrics.rejected.items()],
        ),
        "# HELP solarfleet_shard_write_seconds Time to store a batch in its shard, "
        "from asking for a connection to the commit.",
        "# TYPE solarfleet_shard_write_seconds histogram",
        *(line for name, hist in histograms for line in _histogram(name, hist)),
    ]


def _histogram(shard: str, histogram: Histogram) -> list[str]:
    name = "solarfleet_shard_write_seconds"
    lines = [
        _sample(f"{name}_bucket", {"shard": shard, "le": _number(bound)}, count)
        for bound, count in zip(histogram.bounds, histogram.buckets, strict=True)
    ]
    infinity = {"shard": shard, "le": "+Inf"}
    lines.append(_sample(f"{name}_bucket", infinity, histogram.count))
    lines.append(_sample(f"{name}_sum", {"shard": shard}, histogram.total))
    lines.append(_sample(f"{name}_count", {"shard": shard}, histogram.count))
    return lines


def _family(
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[dict[str, str], float]],
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines.extend(_sample(name, labels, value) for labels, value in samples)
    return lines


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    pairs = ",".join(f'{key}="{_escape(text)}"' for key, text in labels.items())
    return f"{name}{{{pairs}}} {_number(value)}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


async def _open_alerts(
    shard_pools: ShardPools, shards: Sequence[str]
) -> tuple[int, set[str]]:
    """Count open alerts over every shard; return the total and the shards counted."""
    counts = await asyncio.gather(
        *(_shard_open_alerts(shard_pools, name) for name in shards)
    )
    reachable = {name for name, count in zip(shards, counts) if count is not None}
    return sum(count or 0 for count in counts), reachable


async def _shard_open_alerts(shard_pools: ShardPools, shard: str) -> int | None:
    """Count the open alerts of one shard: 0 without an alerts table, None if down."""
    try:
        async with shard_pools.connection(shard) as conn:
            cur = await conn.execute("SELECT to_regclass('public.alerts') IS NOT NULL")
            row = await cur.fetchone()
            if not row or not row[0]:
                return 0
            cur = await conn.execute(_OPEN_ALERTS)
            row = await cur.fetchone()
    except (ShardUnavailable, psycopg.Error) as err:
        logger.debug("open alerts of shard %s not counted: %s", shard, err)
        return None
    return int(row[0]) if row else 0
