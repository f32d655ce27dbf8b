"""Energy from lifetime counters: field cases through the agent's decoding, rules."""

from __future__ import annotations

import json

import pytest

from collector.energy import (
    CONFIRM_READINGS,
    DEFAULT_MAX_POWER_W,
    CounterReading,
    Jump,
    Restart,
    counter_energy,
    window_energy,
)
from edge_agent.endpoint import EndpointSettings
from edge_agent.poller import UnitPoller
from edge_agent.transport import ModbusEndpoint
from sim_fixtures import CASES, serve_image  # noqa: F401

T0 = 1_764_864_000_000
POLL_MS = 10_000  # the agent's default poll interval


async def case_series(serve_image, case_id: str):  # noqa: F811
    """Poll a case's steps through the real poller; return 103.WH and 103.W series.

    Step i is taken as the poll at T0 + i * POLL_MS.
    """
    case = json.loads((CASES / f"{case_id}.json").read_text())
    simulator = await serve_image(case_id)
    endpoint = ModbusEndpoint(
        EndpointSettings(host="127.0.0.1", port=simulator.port, timeout=0.5)
    )
    poller = UnitPoller(endpoint, 1, address_label=simulator.address)
    counter, power = [], []
    try:
        for index in range(len(case["steps"])):
            await simulator.apply_step(index)
            (poll,) = await poller.poll_devices()
            time_ms = T0 + index * POLL_MS
            counter.append(CounterReading(time_ms, poll.values.get("103.WH")))
            power.append(poll.values.get("103.W"))
    finally:
        await endpoint.close()
    return case, counter, power


@pytest.mark.parametrize("case_id", ["C22", "C23", "C25"])
async def test_energy_field_case(serve_image, case_id):  # noqa: F811
    case, counter, power = await case_series(serve_image, case_id)
    max_power = max(abs(p) for p in power if p is not None)

    result = counter_energy(counter, max_power)

    (expected,) = case["expect"]["after_steps"]
    assert result.energy == expected["energy_delta_wh"]
    assert result.jumps == ()
    assert result.pending == 0


async def test_energy_c25_restart_listed(serve_image):  # noqa: F811
    _, counter, power = await case_series(serve_image, "C25")

    result = counter_energy(counter, max(p for p in power if p is not None))

    assert result.restarts == (Restart(T0 + 3 * POLL_MS, "wrap", 1193046.0, 4.0),)


def series(*values: float | None, start: int = T0) -> list[CounterReading]:
    return [CounterReading(start + i * POLL_MS, v) for i, v in enumerate(values)]


def test_energy_rising_counter() -> None:
    assert counter_energy(series(100, 103, 107), 5000).energy == 7


def test_energy_nulls_skipped() -> None:
    assert counter_energy(series(None, 100, None, None, 104), 5000).energy == 4


def test_energy_zero_glitch_ignored() -> None:
    result = counter_energy(series(100, 0, 0, 105), 5000)

    assert result.energy == 5
    assert result.restarts == ()


def test_energy_lower_glitch_ignored() -> None:
    assert counter_energy(series(100, 90, 102), 5000).energy == 2


def test_energy_reset_confirmed() -> None:
    result = counter_energy(series(5000, 1, 2, 4, 6), 5000)

    assert CONFIRM_READINGS == 3
    assert result.energy == 6
    assert result.restarts == (Restart(T0 + POLL_MS, "reset", 5000.0, 1.0),)


def test_energy_reset_unconfirmed_pending() -> None:
    result = counter_energy(series(5000, 1, 2), 5000)

    assert result.energy == 0
    assert result.restarts == ()
    assert result.pending == 2


def test_energy_falling_held_run_restarts() -> None:
    # 7 then 3 is not a counter counting up, so only 3, 4, 5 confirm the reset.
    result = counter_energy(series(5000, 7, 3, 4, 5), 5000)

    assert result.restarts == (Restart(T0 + 2 * POLL_MS, "reset", 5000.0, 3.0),)
    assert result.energy == 5


def test_energy_wrap_at_acc32() -> None:
    result = counter_energy(series(2**32 - 6, 5, 8, 9), 5000)

    assert result.restarts == (Restart(T0 + POLL_MS, "wrap", 2**32 - 6.0, 5.0),)
    assert result.energy == 6 + 5 + 3 + 1


def test_energy_jump_flagged() -> None:
    # 5000 W for 10 s is at most 13.9 Wh, so with the margin 27.8 Wh.
    result = counter_energy(series(100, 110, 1_000_110, 1_000_120), 5000)

    assert result.energy == 20
    assert result.jumps == (
        Jump(T0 + 2 * POLL_MS, 110.0, 1_000_110.0, 5000 * 2 * POLL_MS / 3_600_000),
    )


def test_energy_spike_reverted() -> None:
    result = counter_energy(series(100, 99_999_999, 105, 110), 5000)

    assert result.energy == 10
    assert len(result.jumps) == 1
    assert result.restarts == ()


def test_energy_jump_allowance_grows_while_flat() -> None:
    # A coarse counter stands still for an hour, then steps by 1 kWh at 600 W.
    readings = series(1000, start=T0) + [
        CounterReading(T0 + 3_600_000, 1000),
        CounterReading(T0 + 3_610_000, 2000),
    ]

    result = counter_energy(readings, 600)

    assert result.energy == 1000
    assert result.jumps == ()


def test_energy_zeros_then_back_not_rebased() -> None:
    # Zeros confirmed as a reset, then the old level again: the return is a jump from
    # 0, flagged, so the lifetime total is not booked a second time.
    result = counter_energy(series(75_438_296, 0, 0, 0, 75_438_310), 2000)

    assert result.energy == 0
    assert [j.after for j in result.jumps] == [75_438_310.0]


def test_energy_window_counts_rises_inside() -> None:
    readings = series(100, 103, 107, 112)
    window = (T0 + POLL_MS, T0 + 3 * POLL_MS)

    assert counter_energy(readings, 5000, window).energy == 7


def test_energy_default_cap() -> None:
    assert DEFAULT_MAX_POWER_W == 10_000_000.0
    assert counter_energy(series(0.5, 20_000), DEFAULT_MAX_POWER_W).energy == 19_999.5


def arrays(*values: float | None) -> tuple[list[int], list[float | None]]:
    return [T0 + i * POLL_MS for i in range(len(values))], list(values)


def test_window_energy_steady_lookback() -> None:
    times, values = arrays(100, 103, 107, 110)
    window = (T0 + 2 * POLL_MS, T0 + 4 * POLL_MS)
    assert window_energy(times, values, 5000, window) == 7


def test_window_energy_steady_no_lookback() -> None:
    times, values = arrays(100, 103, 107, 110)
    assert window_energy(times, values, 5000, (T0, T0 + 4 * POLL_MS)) == 10


def test_window_energy_jump_left_out() -> None:
    times, values = arrays(100, 103, 1000, 1004)
    assert window_energy(times, values, 5000, (T0, T0 + 4 * POLL_MS)) == 7


def test_window_energy_glitch_and_null() -> None:
    times, values = arrays(100, None, 103, 0, 107)
    assert window_energy(times, values, 5000, (T0, T0 + 5 * POLL_MS)) == 7


def test_window_energy_zero_first() -> None:
    times, values = arrays(0, 100, 103)
    assert window_energy(times, values, 5000, (T0, T0 + 3 * POLL_MS)) == 3


def test_window_energy_rise_after_standstill() -> None:
    # 30 Wh in 10 s exceeds 5 kW, but not since the counter reached 100 30 s before.
    times, values = arrays(100, 100, 100, 130)
    assert window_energy(times, values, 5000, (T0, T0 + 4 * POLL_MS)) == 30
