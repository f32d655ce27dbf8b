"""Batch wire format: parsing, and one-line reasons for rejected batches."""

from __future__ import annotations

import json
from typing import Any

import pytest

from collector import batch
from collector.batch import Channel, Device, Reading, State
from collector.errors import BatchRejected

NOW = 1_764_864_000_000


def body(**changes: Any) -> bytes:
    data = {
        "format": 1,
        "batch_id": "b-1",
        "gateway_id": "gw-a",
        "devices": [{"device_id": "sn-1", "name": "inverter", "serial": "sn-1"}],
        "channels": [{"device_id": "sn-1", "name": "701.W", "unit": "W"}],
        "readings": [["sn-1", "701.W", NOW, 9800], ["sn-1", "701.W", NOW + 1, None]],
        "states": [["sn-1", NOW, "online"]],
    } | changes
    return json.dumps(data).encode()


def test_parse_valid_batch() -> None:
    parsed = batch.parse(body(), now_ms=NOW)

    assert parsed == batch.Batch(
        batch_id="b-1",
        gateway_id="gw-a",
        devices=(Device("sn-1", name="inverter", serial="sn-1"),),
        channels=(Channel("sn-1", "701.W", "W"),),
        readings=(
            Reading("sn-1", "701.W", NOW, 9800.0),
            Reading("sn-1", "701.W", NOW + 1, None),
        ),
        states=(State("sn-1", NOW, "online"),),
    )


def test_channel_parameter() -> None:
    assert Channel("d", "160.module[2].DCW").parameter == "DCW"
    assert Channel("d", "701#2.W").parameter == "W"
    assert Channel("d", "profile.cos_phi").parameter == "cos_phi"


REJECTED = [
    (b"\xff", "body is not valid UTF-8 (byte 0): send JSON encoded as UTF-8"),
    (body(format=True), "format True is not supported: send format 1"),
    (body(batch_id=""), "batch_id must be a string of 1-200 characters, got ''"),
    (body(gateway_id=7), "gateway_id must be a string of 1-200 characters, got 7"),
    (body(devices={}), "devices must be an array, got dict"),
    (
        body(devices=[{"device_id": "sn-1"}, {"device_id": "sn-1"}]),
        "devices[1].device_id 'sn-1' is listed twice",
    ),
    (
        body(devices=[{"device_id": "sn-1", "model": 5}]),
        "devices[0].model must be a string of at most 200 characters or null, got 5",
    ),
    (
        body(channels=[{"device_id": "sn-9", "name": "701.W"}]),
        "channels[0].device_id 'sn-9' is not listed in devices",
    ),
    (
        body(channels=[{"device_id": "sn-1", "name": "701.W", "unit": "x" * 40}]),
        "channels[0].unit must be a string of at most 32 characters or null, "
        "got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...",
    ),
    (
        body(readings=[["sn-1", "701.W", NOW]]),
        "readings[0] must be an array of 4 elements",
    ),
    (
        body(readings=[["sn-1", "701.W", float(NOW), 1]]),
        "readings[0]: time must be an integer of Unix milliseconds",
    ),
    (
        body(readings=[["sn-1", "701.W", NOW, True]]),
        "readings[0]: value must be a number or null, got True",
    ),
    (
        body(readings=[["sn-1", "701.W", NOW, 10**400]]),
        "readings[0]: value 1000000000000000000000000000000000000... is not finite: "
        "send null instead",
    ),
    (
        body(readings=[["sn-1", "701.W", NOW, 1e308 * 10]]),
        "body is not valid JSON: Infinity is not a JSON number",
    ),
    (
        body(states=[["sn-1", NOW, "asleep"]]),
        "states[0]: state 'asleep' is unknown: use one of malformed, not-sunspec, "
        "offline, "
        "online, refused, sleeping",
    ),
    (
        body(readings=[["sn-1", "701.W", NOW, 1]] * (batch.MAX_READINGS + 1)),
        "readings has 200001 elements, more than the limit of 200000: "
        "send smaller batches",
    ),
]


@pytest.mark.parametrize(("data", "message"), REJECTED)
def test_batch_rejected(data: bytes, message: str) -> None:
    with pytest.raises(BatchRejected) as caught:
        batch.parse(data, now_ms=NOW)

    assert str(caught.value) == message
    assert caught.value.status == 400


def test_infinite_float_rejected() -> None:
    text = body().replace(b"9800", b"1e999")

    with pytest.raises(
        BatchRejected,
        match=r"^readings\[0\]: value inf is not finite: "
        r"send null instead$",
    ):
        batch.parse(text, now_ms=NOW)


TEXT_REJECTED = [
    (
        body(batch_id="b\x00-1"),
        "batch_id 'b\\x00-1' contains the control character or lone surrogate "
        "U+0000 at index 1: send printable text",
    ),
    (
        body(gateway_id="\ud800"),
        "gateway_id '\\ud800' contains the control character or lone surrogate "
        "U+D800 at index 0: send printable text",
    ),
    (
        body(
            devices=[{"device_id": "sn-1", "manufacturer": "Fronius\x00"}],
            readings=[],
            states=[],
        ),
        "devices[0].manufacturer 'Fronius\\x00' contains the control character or "
        "lone surrogate U+0000 at index 7: send printable text",
    ),
    (
        body(devices=[{"device_id": "sn-1", "name": "inv\x1b[2J"}]),
        "devices[0].name 'inv\\x1b[2J' contains the control character or lone "
        "surrogate U+001B at index 3: send printable text",
    ),
    (
        body(devices=[{"device_id": "sn\x85"}]),
        "devices[0].device_id 'sn\\x85' contains the control character or lone "
        "surrogate U+0085 at index 2: send printable text",
    ),
    (
        body(channels=[{"device_id": "sn-1", "name": "701.W", "unit": "\udfff"}]),
        "channels[0].unit '\\udfff' contains the control character or lone "
        "surrogate U+DFFF at index 0: send printable text",
    ),
]


@pytest.mark.parametrize(("data", "message"), TEXT_REJECTED)
def test_text_control_rejected(data: bytes, message: str) -> None:
    with pytest.raises(BatchRejected) as caught:
        batch.parse(data, now_ms=NOW)

    assert str(caught.value) == message


@pytest.mark.parametrize("state", [["online"], {"state": "online"}, 1, None])
def test_state_type_rejected(state: Any) -> None:
    with pytest.raises(BatchRejected) as caught:
        batch.parse(body(states=[["sn-1", NOW, state]]), now_ms=NOW)

    assert str(caught.value).startswith(f"states[0]: state {state!r} is unknown")


@pytest.mark.parametrize("version", [1.0, "1", True])
def test_format_not_integer_rejected(version: Any) -> None:
    with pytest.raises(BatchRejected) as caught:
        batch.parse(body(format=version), now_ms=NOW)

    assert str(caught.value) == f"format {version!r} is not supported: send format 1"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_utf16_utf32_rejected(encoding: str) -> None:
    data = body().decode().encode(encoding)

    with pytest.raises(BatchRejected) as caught:
        batch.parse(data, now_ms=NOW)

    assert str(caught.value).startswith("body is not valid")
    assert caught.value.status == 400


def test_repeat_other_value_rejected() -> None:
    readings = [["sn-1", "701.W", NOW, 1.0], ["sn-1", "701.W", NOW, 2.0]]

    with pytest.raises(BatchRejected) as caught:
        batch.parse(body(readings=readings), now_ms=NOW)

    assert str(caught.value) == (
        "readings[0] and readings[1]: channel '701.W' of 'sn-1' at "
        f"{NOW} ms has two values, 1.0 and 2.0: send one value per channel and time"
    )


def test_repeat_same_value_kept() -> None:
    readings = [["sn-1", "701.W", NOW, 1.0], ["sn-1", "701.W", NOW, 1]]

    parsed = batch.parse(body(readings=readings), now_ms=NOW)

    assert parsed.readings == (
        Reading("sn-1", "701.W", NOW, 1.0),
        Reading("sn-1", "701.W", NOW, 1.0),
    )
