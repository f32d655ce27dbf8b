"""The dashboard in headless Chromium against a real collector and real PostgreSQL.

Needs Debian's `chromium` on PATH, which `make test` installs when it can. Each Chromium
run gets a new profile directory and only connects to the collector on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from collector_http import Fleet, add_fleet, make_batch, post, start_client
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
    "--virtual-time-budget=5000",
)
CHROMIUM_TIMEOUT = 60.0
# The chart line's colour, `--accent` in style.css.
ACCENT = (0xE8, 0xA3, 0x17)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not on PATH: run `make test` as root, or "
    "`apt-get install chromium`",
)


@pytest.fixture
def fleet(collector_databases: CollectorDatabases) -> Fleet:
    return add_fleet(collector_databases)


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[TestClient]:
    client = await start_client(fleet.dbs.config())
    yield client
    await client.close()


async def ingest_fleet(client: TestClient, fleet: Fleet) -> int:
    """Post an hour of readings for both installations; return the newest time."""
    now = time.time_ns() // 1_000_000 - 60_000
    times = [now - minutes * 60_000 for minutes in range(60, -1, -5)]
    readings_a = []
    for index, reading_time in enumerate(times):
        readings_a.append(["sn-1", "701.W", reading_time, 9000.0 + index * 100])
        energy = 5_000_000.0 + index * 800
        readings_a.append(["sn-1", "701.TotWhInj", reading_time, energy])
    readings_a += [["sn-2", "701.W", now, 1234.0]]
    states_a = [["sn-1", now, "online"], ["sn-2", now, "offline"]]
    readings_b = [["sn-9", "701.W", now, 4321.0]]
    states_b = [["sn-9", now, "online"]]
    batch_a = make_batch("gw-a", readings_a, states=states_a)
    for channel in batch_a["channels"]:
        if channel["name"] == "701.TotWhInj":
            channel["unit"] = "Wh"
    status_a, _ = await post(client, fleet.token_a, batch_a)
    status_b, _ = await post(
        client, fleet.token_b, make_batch("gw-b", readings_b, states=states_b)
    )
    assert (status_a, status_b) == (200, 200)
    return now


async def run_chromium(url: str, profile: Path, *output: str) -> str:
    """Open `url` in headless Chromium with a new profile; return its stdout."""
    assert CHROMIUM is not None
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *output,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(), CHROMIUM_TIMEOUT
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


def dashboard_url(client: TestClient, fleet: Fleet, route: str) -> str:
    return str(client.make_url("/")) + f"#{route}&key={fleet.operator_key}"


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB or RGBA PNG into its width, height and rows of pixels."""
    assert data[:8] == PNG_SIGNATURE
    position, idat, header = 8, bytearray(), b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0)
    channels = {2: 3, 6: 4}[colour]
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        filtered = raw[start + 1 : start + 1 + stride]
        line = _unfilter(raw[start], filtered, previous, channels)
        rows.append(line)
        previous = line
    return width, height, rows


def _unfilter(kind: int, line: bytes, previous: bytes, step: int) -> bytes:
    out = bytearray(line)
    if kind == 0:
        return bytes(out)
    if kind == 2:
        return bytes((a + b) & 0xFF for a, b in zip(line, previous, strict=True))
    for i in range(len(out)):
        left = out[i - step] if i >= step else 0
        up = previous[i]
        corner = previous[i - step] if i >= step else 0
        if kind == 1:
            predictor = left
        elif kind == 3:
            predictor = (left + up) // 2
        else:
            predictor = _paeth(left, up, corner)
        out[i] = (out[i] + predictor) & 0xFF
    return bytes(out)


def _paeth(left: int, up: int, corner: int) -> int:
    estimate = left + up - corner
    distance_left = abs(estimate - left)
    distance_up = abs(estimate - up)
    distance_corner = abs(estimate - corner)
    if distance_left <= distance_up and distance_left <= distance_corner:
        return left
    return up if distance_up <= distance_corner else corner


def colours(rows: list[bytes], channels: int) -> set[tuple[int, ...]]:
    """Return the distinct RGB colours of decoded PNG rows."""
    found: set[tuple[int, ...]] = set()
    for row in rows:
        for x in range(0, len(row), channels):
            found.add(tuple(row[x : x + 3]))
    return found


@needs_chromium
async def test_dashboard_fleet_dom(client: TestClient, fleet: Fleet, tmp_path: Path):
    await ingest_fleet(client, fleet)

    dom = await run_chromium(
        dashboard_url(client, fleet, "/"), tmp_path / "profile", "--dump-dom"
    )

    assert 'id="fleet-table"' in dom
    assert "Roof A" in dom
    assert "Barn B" in dom
    assert f'data-installation="{fleet.installation_a}"' in dom
    assert "1 online" in dom
    assert "1 offline" in dom
    assert "Open alerts" in dom
    assert "Loading failed" not in dom
    assert "not accepted" not in dom


@needs_chromium
async def test_dashboard_installation_dom(
    client: TestClient, fleet: Fleet, tmp_path: Path
):
    await ingest_fleet(client, fleet)
    route = f"/installations/{fleet.installation_a}"

    dom = await run_chromium(
        dashboard_url(client, fleet, route), tmp_path / "profile", "--dump-dom"
    )

    assert "<h1>Roof A</h1>" in dom
    assert 'data-device="sn-1"' in dom
    assert 'data-device="sn-2"' in dom
    assert "10.20 kW" in dom
    assert "1.23 kW" in dom
    assert "10200 W" in dom
    assert "5.01 MWh" in dom
    assert "5009600 Wh" in dom
    assert 'id="power-chart"' in dom
    assert 'id="energy-chart"' in dom
    assert "Loading failed" not in dom


@needs_chromium
async def test_dashboard_wrong_key(client: TestClient, fleet: Fleet, tmp_path: Path):
    url = str(client.make_url("/")) + "#/&key=not-a-key"

    dom = await run_chromium(url, tmp_path / "profile", "--dump-dom")

    assert "The API key was not accepted" in dom
    assert "Roof A" not in dom


@needs_chromium
async def test_dashboard_screenshot(client: TestClient, fleet: Fleet, tmp_path: Path):
    now = await ingest_fleet(client, fleet)
    screenshot = tmp_path / "installation.png"
    # The installation's time zone is UTC, the catalog's default.
    day = time.strftime("%Y-%m-%d", time.gmtime(now / 1000))
    route = f"/installations/{fleet.installation_a}/{day}"

    await run_chromium(
        dashboard_url(client, fleet, route),
        tmp_path / "profile",
        f"--screenshot={screenshot}",
    )
    data = screenshot.read_bytes()
    width, height, rows = png_pixels(data)
    channels = len(rows[0]) // width
    found = colours(rows, channels)

    assert (width, height) == (1280, 900)
    assert len(found) > 100
    assert ACCENT in found
