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
