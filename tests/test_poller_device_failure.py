"""Polling a unit whose device fails one model's reads with Modbus exception 4."""

from __future__ import annotations

import logging
from dataclasses import replace

from edge_agent.endpoint import EndpointSettings
from edge_agent.images import ExceptionRange, SiteImage
from edge_agent.poller import UnitPoller
from edge_agent.readings import DeviceState
from edge_agent.transport import ModbusEndpoint
from sim_fixtures import load_case, serve_image  # noqa: F401

# Model 113 of case C15 starts at 40069 with L = 60, so its body is 40071-40130.
MODEL_113_BODY = ExceptionRange(first=40071, last=40130, code=4)


def failing_113(image: SiteImage) -> SiteImage:
    [device] = image.devices
    return replace(image, devices=(replace(device, exceptions=(MODEL_113_BODY,)),))


async def test_device_failure_keeps_unit_online(serve_image, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="edge_agent.poller")
    healthy = load_case("C15")
    simulator = await serve_image(failing_113(healthy))
    endpoint = ModbusEndpoint(EndpointSettings(host="127.0.0.1", port=simulator.port,
                                               timeout=0.5))
    poller = UnitPoller(endpoint, 1, address_label=simulator.address)
    try:
        first = await poller.poll()
        second = await poller.poll()
        await simulator.stop()
        simulator.image = healthy
        await simulator.start()
        recovered = await poller.poll()
    finally:
        await endpoint.close()

    for poll in (first, second):
        assert poll.state == DeviceState.ONLINE
        assert poll.values["113.W"] is None
        assert poll.values["113.A"] is None
        assert poll.values["120.WRtg"] == 5000
        assert poll.values["160.module[1].DCW"] is not None
    assert recovered.state == DeviceState.ONLINE
    assert recovered.values["113.W"] == 297.0
    assert recovered.values["113.DCW"] == 304.46
    assert {c.name for c in recovered.channels} == {c.name for c in first.channels}
    messages = [(r.levelname, r.getMessage()) for r in caplog.records
                if "model 113" in r.getMessage()]
    assert messages == [
        ("WARNING", f"{simulator.address}/1: device failure (Modbus exception 4) "
                    "reading model 113 at 40069; its values are reported as no value "
                    "until the read succeeds"),
        ("INFO", f"{simulator.address}/1: model 113 at 40069 read again after a "
                 "device failure"),
    ]
