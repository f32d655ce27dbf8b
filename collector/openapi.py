"""The OpenAPI 3.1 document of the collector's HTTP API, served at
`/api/v1/openapi.json`. A test checks that every registered route is in it."""

from __future__ import annotations

from typing import Any

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_INTEGER_OR_NULL = {"type": ["integer", "null"]}
_ERROR = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties} | extra


def _reply(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query(name: str, description: str, schema: dict[str, Any], required: bool = True):
    return {"name": name, "in": "query", "required": required,
            "description": description, "schema": schema}


_ID = {"name": "installation_id", "in": "path", "required": True,
       "schema": {"type": "integer", "minimum": 1}}
_FROM_MS = _query("from", "Window start, Unix ms (inclusive).", {"type": "integer"})
_TO_MS = _query("to", "Window end, Unix ms (exclusive).", {"type": "integer"})
_READ_ERRORS = {"400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR,
                "503": _ERROR}

_MISSING = {
    "type": "array",
    "description": "Shards that did not answer; their installations are left out.",
    "items": _object({
        "shard": {"type": "string"},
        "installation_ids": {"type": "array", "items": {"type": "integer"}},
        "reason": {"type": "string"},
    }),
}
_DEVICE_COUNTS = _object({
    group: {"type": "integer"} for group in ("online", "sleeping", "offline", "faulted")
})
_SUMMARY = _object({
    "id": {"type": "integer"},
    "name": {"type": "string"},
    "owner_id": {"type": "integer"},
    "timezone": {"type": "string", "description": "IANA time zone"},
    "shard": {"type": "string"},
    "last_seen_ms": _INTEGER_OR_NULL,
    "devices": _DEVICE_COUNTS,
    "power_w": _NUMBER_OR_NULL,
    "energy_today_wh": _NUMBER_OR_NULL,
    "open_alerts": {"type": "integer"},
})
_MEASURES = _object({
    "ac_power_w": _NUMBER_OR_NULL,
    "lifetime_energy_wh": _NUMBER_OR_NULL,
    "dc_power_w": {"type": "array", "items": _NUMBER_OR_NULL},
    "grid_import_wh": _NUMBER_OR_NULL,
    "grid_export_wh": _NUMBER_OR_NULL,
})
_CHANNEL = _object({
    "id": {"type": "integer"},
    "name": {"type": "string"},
    "unit": {"type": ["string", "null"]},
    "value": _NUMBER_OR_NULL,
    "time_ms": _INTEGER_OR_NULL,
})
_DEVICE = _object({
    "device_id": {"type": "string"},
    "name": {"type": "string"},
    "manufacturer": {"type": ["string", "null"]},
    "model": {"type": ["string", "null"]},
    "serial": {"type": ["string", "null"]},
    "state": {"type": ["string", "null"]},
    "state_ms": _INTEGER_OR_NULL,
    "measures": _MEASURES,
    "channels": {"type": "array", "items": _CHANNEL},
})
_ALERT = _object({
    "id": {"type": "string"},
    "installation_id": {"type": "integer"},
    "device_id": {"type": ["string", "null"]},
    "kind": {"type": "string"},
    "severity": {"type": "string"},
    "message": {"type": "string"},
    "state": {"type": "string", "enum": ["open", "resolved"]},
    "opened_ms": {"type": "integer"},
    "resolved_ms": _INTEGER_OR_NULL,
    "details": {"type": "object"},
})


def _get(summary: str, reply: dict[str, Any], parameters: list[Any] = (),
         auth: bool = True, errors: dict[str, Any] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": list(parameters),
        "responses": {"200": reply} | (_READ_ERRORS if errors is None else errors),
    }
    if not auth:
        operation["security"] = []
    return {"get": operation}


def _paths() -> dict[str, Any]:
    inst = "/api/v1/installations/{installation_id}"
    return {
        "/api/v1/batches": {"post": {
            "summary": "Store one batch of readings from a gateway (gateway token).",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object"}}}},
            "responses": {
                "200": _reply("Committed", _object({
                    "batch_id": {"type": "string"}, "stored": {"type": "integer"},
                    "duplicates": {"type": "integer"},
                    "rejected": {"type": "integer"}})),
                "400": _ERROR, "401": _ERROR, "403": _ERROR, "413": _ERROR,
                "415": _ERROR,
                "503": _ERROR,
            },
        }},
        "/api/v1/installations": _get(
            "List the installations the key may read, with their status.",
            _reply("Installations", _object({
                "installations": {"type": "array", "items": _SUMMARY},
                "missing": _MISSING})),
            errors={"401": _ERROR, "503": _ERROR},
        ),
        inst: _get(
            "One installation with its status, devices, channels and measures.",
            _reply("Installation; the device counts by state are in "
                   "`device_counts`", _object(
                       _SUMMARY["properties"] | {"device_counts": _DEVICE_COUNTS,
                                                 "devices": {"type": "array",
                                                             "items": _DEVICE}})),
            [_ID],
        ),
        inst + "/series": _get(
            "One channel's points [t_ms, avg, min, max]; raw points are [t, v, v, v]. "
            "Longest window: raw 1 day, 5m 31 days, 1h 366 days, 1d 3660 days.",
            _reply("Series", _object({
                "installation_id": {"type": "integer"},
                "channel": _object({"id": {"type": "integer"},
                                    "name": {"type": "string"},
                                    "unit": {"type": ["string", "null"]},
                                    "device_id": {"type": "string"}}),
                "resolution": {"type": "string"},
                "from": {"type": "integer"}, "to": {"type": "integer"},
                "points": {"type": "array", "items": {
                    "type": "array", "items": _NUMBER_OR_NULL}}})),
            [_ID, _query("channel", "Channel id.", {"type": "integer"}), _FROM_MS,
             _TO_MS, _query("resolution", "Point resolution.",
                            {"type": "string", "enum": ["raw", "5m", "1h", "1d"],
                             "default": "raw"}, required=False)],
        ),
        inst + "/power": _get(
            "AC power of the inverters in 5-minute buckets of a date in the "
            "installation's time zone.",
            _reply("Power", _object({
                "installation_id": {"type": "integer"},
                "date": {"type": "string", "format": "date"},
                "timezone": {"type": "string"},
                "points": {"type": "array", "items": {
                    "type": "array", "items": _NUMBER_OR_NULL}}})),
            [_ID, _query("date", "Local date YYYY-MM-DD.",
                         {"type": "string", "format": "date"})],
        ),
        inst + "/energy/daily": _get(
            "Inverter energy of each local date in a range of at most 366 days.",
            _reply("Daily energy", _object({
                "installation_id": {"type": "integer"},
                "timezone": {"type": "string"},
                "days": {"type": "array", "items": _object({
                    "date": {"type": "string", "format": "date"},
                    "energy_wh": _NUMBER_OR_NULL})}})),
            [_ID, _query("from", "First local date.", {"type": "string",
                                                       "format": "date"}),
             _query("to", "Last local date, inclusive.", {"type": "string",
                                                         "format": "date"})],
        ),
        inst + "/latest": _get(
            "Latest value of every channel and state of every device.",
            _reply("Latest", {"type": "object"}), [_ID],
        ),
        inst + "/energy": _get(
            "Energy of every lifetime counter within a window of at most 366 days, "
            "with restarts and jumps.",
            _reply("Counters", {"type": "object"}), [_ID, _FROM_MS, _TO_MS],
        ),
        inst + "/gaps": _get(
            "Time ranges without data within a window, and why.",
            _reply("Gaps", {"type": "object"}), [_ID, _FROM_MS, _TO_MS],
        ),
        "/api/v1/fleet": _get(
            "Totals over the installations the key may read.",
            _reply("Fleet", _object({
                "installations": {"type": "integer"},
                "power_w": _NUMBER_OR_NULL,
                "energy_today_wh": _NUMBER_OR_NULL,
                "devices": _DEVICE_COUNTS,
                "open_alerts": {"type": "integer"},
                "missing": _MISSING})),
            errors={"401": _ERROR, "503": _ERROR},
        ),
        "/api/v1/alerts": _get(
            "Alerts of the installations the key may read.",
            _reply("Alerts", _object({"alerts": {"type": "array", "items": _ALERT},
                                      "missing": _MISSING})),
            [_query("state", "Which alerts.", {"type": "string",
                                               "enum": ["open", "resolved", "all"]},
                    required=False),
             _query("installation_id", "Only this installation.",
                    {"type": "integer"}, required=False)],
        ),
        "/api/v1/openapi.json": _get(
            "This document.", _reply("OpenAPI 3.1", {"type": "object"}), auth=False,
            errors={},
        ),
        "/healthz": _get(
            "Reachability of the catalog and the shards; 503 when one is down.",
            _reply("Health", {"type": "object"}), auth=False, errors={"503": _ERROR},
        ),
        "/metrics": {"get": {
            "summary": "Prometheus metrics.", "security": [],
            "responses": {"200": {"description": "Metrics",
                                  "content": {"text/plain": {"schema": {
                                      "type": "string"}}}}},
        }},
        "/": _static("The dashboard's page.", "text/html"),
        "/app.js": _static("The dashboard's script.", "text/javascript"),
        "/style.css": _static("The dashboard's style sheet.", "text/css"),
    }


def _static(summary: str, media_type: str) -> dict[str, Any]:
    return {"get": {
        "summary": summary, "security": [],
        "responses": {"200": {"description": summary, "content": {
            media_type: {"schema": {"type": "string"}}}}},
    }}


def document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the collector's routes."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "solarfleet collector",
            "version": "1",
            "description": "Times are Unix milliseconds. Read routes take a read API "
            "key as `Authorization: Bearer <key>`: an operator key reads the fleet, "
            "an owner key its owner's installations (others are 403).",
        },
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _object({"error": {"type": "string"}},
                                         required=["error"])},
        },
        "paths": _paths(),
    }
