"""The one backoff policy of the agent, shared by Modbus reconnects and the forwarder.

Waits grow exponentially from `initial` seconds, capped at `maximum`, with full jitter so
that a fleet of gateways reconnecting after a regional outage spreads out. Neither user gives
up: a gateway keeps retrying for as long as it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenacity


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter, in seconds."""

    initial: float = 1.0
    maximum: float = 60.0

    def wait_strategy(self) -> tenacity.wait.wait_base:
        """Build the tenacity wait strategy for this policy."""
        return tenacity.wait_random_exponential(multiplier=self.initial, max=self.maximum)

    def delay(self, attempt: int) -> float:
        """Return the wait in seconds before retry `attempt` (1 for the first retry)."""
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return self.wait_strategy()(state)

    def retrying(self, retry_on: type[BaseException] | tuple[type[BaseException], ...],
                 before_sleep=None) -> tenacity.AsyncRetrying:
        """Build an async retry loop that never stops retrying `retry_on` errors."""
        return tenacity.AsyncRetrying(
            wait=self.wait_strategy(),
            retry=tenacity.retry_if_exception_type(retry_on),
            before_sleep=before_sleep,
            reraise=True,
        )
