"""Simulator fixtures for tests: serve device images on 127.0.0.1 or a serial line.

Import the fixtures into a test module to use them::

    from sim_fixtures import load_case, null_modem, serve_image  # noqa: F401

    async def test_discovery_c06(serve_image):
        simulator = await serve_image("C06")
        ...  # 127.0.0.1:simulator.port serves units 1 and 240
"""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent.images import SiteImage, load_image
from edge_agent.simulator import Simulator

FIXTURES = Path(__file__).parent / "fixtures"
CASES = FIXTURES / "cases"
IMAGES = FIXTURES / "images"
DEVICE_1547 = IMAGES / "device_1547.json"


def load_case(case_id: str) -> SiteImage:
    """Load a field case by id, e.g. "C06", from tests/fixtures/cases."""
    return load_image(CASES / f"{case_id}.json")


ServeImage = Callable[..., Awaitable[Simulator]]


@pytest.fixture
async def serve_image() -> AsyncIterator[ServeImage]:
    """Factory that starts a Simulator on a free 127.0.0.1 port; all stop at teardown.

    Call it with a case id ("C06"), a path to an image file, or a SiteImage; keyword
    arguments go to Simulator (framer, clock, serial_port, ...). The returned
    simulator's `port` is the bound port.
    """
    simulators: list[Simulator] = []

    async def serve(image: str | Path | SiteImage, **options: Any) -> Simulator:
        if isinstance(image, str) and not image.endswith(".json"):
            image = load_case(image)
        elif not isinstance(image, SiteImage):
            image = load_image(image)
        simulator = Simulator(image, host="127.0.0.1", port=0, **options)
        await simulator.start()
        simulators.append(simulator)
        return simulator

    yield serve
    for simulator in simulators:
        await simulator.stop()


def _forward(source: int, target: int) -> None:
    try:
        data = os.read(source, 4096)
    except OSError:
        return
    os.write(target, data)


@pytest.fixture
async def null_modem() -> AsyncIterator[tuple[str, str]]:
    """Two pseudo-terminals wired like a null-modem cable: (device end, agent end).

    Bytes written to one terminal arrive on the other, so a serial simulator on the
    first path and a serial client on the second talk Modbus RTU through the kernel's
    tty layer.
    """
    loop = asyncio.get_running_loop()
    (master_a, slave_a), (master_b, slave_b) = os.openpty(), os.openpty()
    for slave in (slave_a, slave_b):
        tty.setraw(slave)  # no echo and no line editing before pyserial opens it
    loop.add_reader(master_a, _forward, master_a, master_b)
    loop.add_reader(master_b, _forward, master_b, master_a)

    yield os.ttyname(slave_a), os.ttyname(slave_b)

    for master in (master_a, master_b):
        loop.remove_reader(master)
    # The slave ends stay open until here so that a closing client never makes the
    # master ends report EIO.
    for fd in (master_a, master_b, slave_a, slave_b):
        os.close(fd)
