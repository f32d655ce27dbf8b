"""Log a failing database once when it starts failing and once when it recovers."""

from __future__ import annotations

import logging


class Outage:
    """The up or down state of one database, for logging state changes only."""

    def __init__(self, logger: logging.Logger, name: str) -> None:
        self._logger = logger
        self._name = name
        self._failures = 0

    @property
    def down(self) -> bool:
        """True from the first failure until the next success."""
        return self._failures > 0

    def failed(self, err: BaseException) -> None:
        """Count a failure, and log a warning if it starts an outage."""
        if self._failures == 0:
            self._logger.warning("%s unavailable: %s", self._name, err)
        self._failures += 1

    def recovered(self) -> None:
        """End an outage, logging how many requests failed during it."""
        if self._failures:
            self._logger.info(
                "%s available again after %d failed requests",
                self._name,
                self._failures,
            )
            self._failures = 0


class PoolWarnings(logging.Filter):
    """Filter of the `psycopg.pool` logger that passes one warning per pool outage.

    psycopg_pool 3.3 warns on every failed connection attempt, many times a minute
    while a database is down. For the pools registered by name, the first warning
    passes and later ones are dropped until `recovered` is called for that pool.
    Warnings that name no registered pool, and records below WARNING, always pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pools: set[str] = set()
        self._quiet: set[str] = set()  # pools whose outage warning has passed

    def register(self, pool: str) -> None:
        """Start filtering the warnings of `pool`, as a pool with no outage."""
        self._pools.add(pool)
        self._quiet.discard(pool)

    def recovered(self, pool: str) -> None:
        """Let the next warning of `pool` pass: it connected again."""
        self._quiet.discard(pool)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        pool = _pool_name(record)
        if pool not in self._pools:
            return True
        if pool in self._quiet:
            return False
        self._quiet.add(pool)
        return True


def _pool_name(record: logging.LogRecord) -> str | None:
    """Return the pool name that psycopg_pool passes as a warning's first argument."""
    args = record.args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return None


POOL_WARNINGS = PoolWarnings()


def filter_pool_warnings() -> PoolWarnings:
    """Install `POOL_WARNINGS` on the `psycopg.pool` logger once, and return it."""
    pool_logger = logging.getLogger("psycopg.pool")
    if POOL_WARNINGS not in pool_logger.filters:
        pool_logger.addFilter(POOL_WARNINGS)
    return POOL_WARNINGS
