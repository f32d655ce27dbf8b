"""The collector's limits on the strings and sizes of a batch, checked before sending.

A string past these limits gets every batch that carries it rejected with HTTP 400,
so config and profile checks apply them up front. The numbers are imported from the
collector's wire format module, so that the agent and the collector never differ.
"""

from __future__ import annotations

import re

from collector.batch import (
    MAX_CHANNELS,
    MAX_ID_LENGTH,
    MAX_READINGS,
    MAX_STATES,
    MAX_TEXT_LENGTH,
    MAX_UNIT_LENGTH,
)

__all__ = ["MAX_BATCH_READINGS", "MAX_ID_LENGTH", "MAX_TEXT_LENGTH", "MAX_UNIT_LENGTH",
           "control_character", "text_problem"]

# A batch of N readings contains at most N states and N channels, because a poll without
# readings counts as one reading. So this cap keeps a batch within all three limits.
MAX_BATCH_READINGS = min(MAX_READINGS, MAX_STATES, MAX_CHANNELS)

# C0 controls, DEL and C1 controls: a NUL or a line break in an id or a header is a
# copy-and-paste accident, and would corrupt log lines and the HTTP request.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def control_character(text: str) -> str | None:
    """Return the first control character of `text` as a U+ code, or None."""
    match = _CONTROL.search(text)
    return None if match is None else f"U+{ord(match.group()):04X}"


def text_problem(text: str, limit: int) -> str | None:
    """Return why `text` cannot be sent as a string of at most `limit` characters,
    with the fix, or None when it can."""
    if len(text) > limit:
        return (f"has {len(text)} characters, more than the collector's limit of "
                f"{limit}; shorten it")
    code = control_character(text)
    if code is not None:
        return f"contains the control character {code}; remove it"
    return None
