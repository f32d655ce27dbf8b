"""The unit poller's device states and values, and the per-endpoint poll loop."""

from __future__ import annotations

import asyncio
import logging

from edge_agent.endpoint import EndpointSettings
from edge_agent.poller import DeviceIds, UnitPoller, run_endpoint
from edge_agent.readings import Channel, DeviceState, Poll
from fake_endpoint import FakeEndpoint, load_case

LABEL = "127.0.0.1:1502"


def poller_for(case_id: str, unit: int, **kwargs) -> tuple[FakeEndpoint, UnitPoller]:
    endpoint = FakeEndpoint.from_case(load_case(case_id), **kwargs)
    poller = UnitPoller(endpoint, unit, address_label=LABEL, name="inverter",
                        wall_clock=lambda: 1764864000.0)
    return endpoint, poller


class TestUnitPoller:
    async def test_online_poll(self):
        _, poller = poller_for("C03", 1)
        poll = await poller.poll()
        assert poll.state == DeviceState.ONLINE
        assert poll.time_ms == 1764864000000
        assert poll.device.device_id == "7E0C0301"
        assert poll.device.address == "127.0.0.1:1502/1"
        assert poll.device.manufacturer == "SolarEdge"
        assert poll.device.name == "inverter"
        assert poll.values["103.W"] == 3358.0
        assert Channel("103.W", "W") in poll.channels
        assert "103.W_SF" not in poll.values
        assert "103.ID" not in poll.values
        assert not any(name.startswith("1.") for name in poll.values)

    async def test_one_read_per_poll(self):
        endpoint, poller = poller_for("C03", 1)
        await poller.poll()
        endpoint.requests.clear()
        await poller.poll()
        assert endpoint.requests == [(1, 40002, 119)]

    async def test_shared_serial_falls_back(self, caplog):
        device_ids = DeviceIds()
        pollers = []
        for label in (LABEL, "127.0.0.2:1502"):
            endpoint = FakeEndpoint.from_case(load_case("C03"))
            pollers.append(UnitPoller(endpoint, 1, address_label=label,
                                      device_ids=device_ids))

        with caplog.at_level(logging.WARNING, logger="edge_agent.poller"):
            first = [await pollers[0].poll() for _ in range(2)]
            second = [await pollers[1].poll() for _ in range(2)]
            pollers[1].device_map = None  # discovered again, e.g. after a map change
            second.append(await pollers[1].poll())

        assert [poll.device.device_id for poll in first] == ["7E0C0301"] * 2
        assert [poll.device.device_id for poll in second] == ["127.0.0.2:1502/1"] * 3
        assert second[0].device.serial == "7E0C0301"
        assert [r.getMessage() for r in caplog.records] == [
            "127.0.0.2:1502/1: serial 7E0C0301 is already used by 127.0.0.1:1502/1; "
            "using 127.0.0.2:1502/1 as this device's id"]

    async def test_sleeping_state(self):
        _, poller = poller_for("C21", 1)
        poll = await poller.poll()
        assert poll.state == DeviceState.SLEEPING
        assert poll.values["103.W"] == 0.0

    async def test_offline_keeps_identity(self):
        endpoint, poller = poller_for("C03", 1)
        await poller.poll()
        endpoint.units[1].silent = True
        poll = await poller.poll()
        assert poll.state == DeviceState.OFFLINE
        assert poll.device.device_id == "7E0C0301"
        assert poll.values == {}

    async def test_refused_state(self):
        endpoint, poller = poller_for("C08", 1)
        endpoint.refused = True
        poll = await poller.poll()
        assert poll.state == DeviceState.REFUSED
        assert poll.device.device_id == "127.0.0.1:1502/1"
        endpoint.refused = False
        assert (await poller.poll()).state == DeviceState.ONLINE

    async def test_not_sunspec_state(self):
        _, poller = poller_for("C01a", 3)
        assert (await poller.poll()).state == DeviceState.NOT_SUNSPEC

    async def test_absent_unit_offline(self):
        _, poller = poller_for("C06", 2)
        assert (await poller.poll()).state == DeviceState.OFFLINE

    async def test_malformed_state(self):
        endpoint, poller = poller_for("C03", 1)
        endpoint.units[1].holding[40003] = 10
        assert (await poller.poll()).state == DeviceState.MALFORMED

    async def test_serial_not_identity(self):
        _, poller = poller_for("C20", 1)
        poll = await poller.poll()
        assert poll.device.device_id == "127.0.0.1:1502/1"
        assert poll.device.serial is None

    async def test_scale_factor_change(self):
        case = load_case("C13")
        endpoint, poller = poller_for("C13", 1)
        first = await poller.poll()
        endpoint.units[1].patch(case["steps"][1])
        second = await poller.poll()
        assert first.values["160.module[1].DCW"] == 650.0
        assert second.values["160.module[1].DCW"] == 660.0

    async def test_length_change_rediscovers(self):
        endpoint, poller = poller_for("C27", 1)
        await poller.poll()
        holding = endpoint.units[1].holding
        # Firmware drops module 4: model 160 shrinks from 88 to 68 registers.
        for address in range(40263 + 70, 40263 + 90):
            del holding[address]
        holding[40264] = 68
        holding[40263 + 70] = 0xFFFF
        holding[40263 + 71] = 0
        del holding[40263 + 90], holding[40263 + 91]
        poll = await poller.poll()
        assert poll.state == DeviceState.ONLINE
        assert "160.module[4].DCW" not in poll.values
        assert poll.values["160.module[3].DCW"] == 2609.8

    async def test_power_factor_normalised(self):
        _, poller = poller_for("C16c", 1)
        poll = await poller.poll()
        assert poll.values["103.PF"] == -98.46
        assert poll.values["103.PF.normalised"] == -0.9846
        assert Channel("103.PF.normalised", None) in poll.channels

    async def test_zero_frame_flagged_once(self, caplog):
        case = load_case("C22")
        endpoint, poller = poller_for("C22", 1)
        caplog.set_level(logging.WARNING, logger="edge_agent.poller")
        await poller.poll()
        endpoint.units[1].patch(case["steps"][1])
        flagged = await poller.poll()
        again = await poller.poll()
        endpoint.units[1].patch(case["steps"][2])
        good = await poller.poll()
        assert flagged.values["103.W"] is None
        assert flagged.values["103.St"] is None
        assert again.values["103.W"] is None
        assert good.values["103.W"] == 2790.0
        warnings = [r for r in caplog.records if "implausible frame" in r.message]
        assert len(warnings) == 1

    async def test_failure_logged_once(self, caplog):
        endpoint, poller = poller_for("C03", 1)
        caplog.set_level(logging.INFO, logger="edge_agent.poller")
        await poller.poll()
        endpoint.units[1].silent = True
        for _ in range(3):
            await poller.poll()
        endpoint.units[1].silent = False
        await poller.poll()
        await poller.poll()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        recoveries = [r for r in caplog.records if "responding again" in r.message]
        assert len(warnings) == 1
        assert "reported as offline" in warnings[0].message
        assert len(recoveries) == 1

    async def test_meter_inside_inverter_map(self):
        endpoint, poller = poller_for("C06", 1)
        meter = endpoint.units[240].holding
        holding = endpoint.units[1].holding
        # Put the meter's common model and model 203 where the inverter's chain ends.
        end = 40121
        for offset, address in enumerate(range(40002, 40002 + 67 + 107)):
            holding[end + offset] = meter[address]
        holding[end + 67 + 107] = 0xFFFF
        holding[end + 67 + 108] = 0
        polls = await poller.poll_devices()
        assert [p.device.device_id for p in polls] == ["ZZ0C0601", "ZZ0C0602"]
        assert polls[1].values["203.W"] == -2870.0
        assert "203.W" not in polls[0].values


class TestRunEndpoint:
    async def test_polls_every_unit(self):
        case = load_case("C06")
        received: list[Poll] = []
        stop = asyncio.Event()

        async def sink(poll: Poll) -> None:
            received.append(poll)
            if len(received) == 6:
                stop.set()

        await asyncio.wait_for(
            run_endpoint(
                EndpointSettings(host="127.0.0.1", port=1502), [1, 2, 240], 0.0,
                sink, stop, endpoint_factory=lambda s: FakeEndpoint.from_case(case),
            ),
            timeout=5,
        )
        states = [(p.device.address, p.state) for p in received]
        assert states[:3] == [
            ("127.0.0.1:1502/1", DeviceState.ONLINE),
            ("127.0.0.1:1502/2", DeviceState.OFFLINE),
            ("127.0.0.1:1502/240", DeviceState.ONLINE),
        ]
        assert received[2].values["203.W"] == -2870.0

    async def test_stop_returns_promptly(self):
        case = load_case("C03")
        stop = asyncio.Event()
        endpoints: list[FakeEndpoint] = []

        def make(settings: EndpointSettings) -> FakeEndpoint:
            endpoints.append(FakeEndpoint.from_case(case))
            return endpoints[0]

        async def sink(poll: Poll) -> None:
            stop.set()

        await asyncio.wait_for(
            run_endpoint(EndpointSettings(host="127.0.0.1"), [1], 3600.0, sink, stop,
                         endpoint_factory=make),
            timeout=2,
        )
        assert endpoints[0].polls_ended == 1

    async def test_sink_error_does_not_stop(self, caplog):
        case = load_case("C03")
        stop = asyncio.Event()
        calls = 0

        async def sink(poll: Poll) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                stop.set()
            raise OSError("disk full")

        await asyncio.wait_for(
            run_endpoint(EndpointSettings(host="127.0.0.1"), [1], 0.0, sink, stop,
                         endpoint_factory=lambda s: FakeEndpoint.from_case(case)),
            timeout=5,
        )
        assert calls == 3
        assert "storing a poll failed" in caplog.text
