"""`read` through click's CliRunner against the simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

from click.testing import CliRunner, Result

from edge_agent.cli import main
from sim_fixtures import serve_image  # noqa: F401


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


async def test_read_profile_meter(serve_image):  # noqa: F811
    simulator = await serve_image("C19")
    target = f"127.0.0.1:{simulator.port}"

    result = await invoke("read", target, "--unit", "1", "--profile", "eastron-sdm630")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout == (
        f"{target}/1: Eastron SDM630, serial —, online\n"
        "  profile.V_L1        231.68489 V\n"
        "  profile.V_L2        232.41 V\n"
        "  profile.V_L3        230.97 V\n"
        "  profile.I_L1        4.36 A\n"
        "  profile.I_L2        2.01 A\n"
        "  profile.I_L3        0.98 A\n"
        "  profile.P_L1        982.5 W\n"
        "  profile.P_L2        451.2 W\n"
        "  profile.P_L3        205.3 W\n"
        "  profile.P_total     1639.0 W\n"
        "  profile.PF_total    0.0\n"
        "  profile.Hz          50.01 Hz\n"
        "  profile.kWh_import  12873.42 kWh\n"
        "  profile.kWh_export  3021.77 kWh\n"
    )


async def test_read_json_with_nulls(serve_image):  # noqa: F811
    simulator = await serve_image("C18")

    result = await invoke("read", f"127.0.0.1:{simulator.port}", "--unit", "1",
                          "--profile", "solaredge-power-control", "--json")

    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    by_channel = {row["channel"]: row for row in rows}
    device = "7E0C1801"
    assert by_channel["profile.CosPhi"] == {"channel": "profile.CosPhi", "value": 1.0,
                                            "unit": None, "device": device}
    assert by_channel["profile.PowerLimit"] == {
        "channel": "profile.PowerLimit", "value": 100.0, "unit": "%", "device": device}
    assert by_channel["profile.RRCR"]["value"] == 0.0
    assert by_channel["103.W"] == {"channel": "103.W", "value": 3358.0, "unit": "W",
                                   "device": device}
    # The cabinet temperature reads 0x8000, the int16 encoding of no value.
    assert by_channel["103.TmpCab"] == {"channel": "103.TmpCab", "value": None,
                                        "unit": "C", "device": device}
    assert [row["channel"] for row in rows][-3:] == [
        "profile.RRCR", "profile.PowerLimit", "profile.CosPhi"]


async def test_read_text_null_as_dash(serve_image):  # noqa: F811
    simulator = await serve_image("C11b")

    result = await invoke("read", f"127.0.0.1:{simulator.port}", "--unit", "126")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == (f"127.0.0.1:{simulator.port}/126: SMA SB 5.0-1AV-41, serial "
                        "3099001102, online")
    rows = [line.split() for line in lines[1:]]
    assert ["101.AphB", "—"] in rows
    assert ["101.PhVphC", "—"] in rows
    assert ["101.AphA", "20.41", "A"] in rows


async def test_read_absent_unit(serve_image):  # noqa: F811
    simulator = await serve_image("C06")
    target = f"127.0.0.1:{simulator.port}"

    result = await invoke("read", target, "--unit", "7")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: {target} unit 7: the gateway returned exception 11, so no device is "
        "connected on this unit id; check the unit id\n")


async def test_read_not_sunspec(serve_image):  # noqa: F811
    simulator = await serve_image("C19")
    target = f"127.0.0.1:{simulator.port}"

    result = await invoke("read", target, "--unit", "1")

    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {target} unit 1: no SunS marker at 40000, 0, 50000; the device does "
        "not speak SunSpec, so it needs a device profile\n")


async def test_read_profile_rejected(serve_image):  # noqa: F811
    simulator = await serve_image("C03")
    target = f"127.0.0.1:{simulator.port}"

    result = await invoke("read", target, "--unit", "1", "--profile", "eastron-sdm630")

    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {target}/1: every read of profile eastron-sdm630 was rejected; check "
        "the unit id and that the profile fits the device\n")


async def test_read_unknown_profile():
    result = await invoke("read", "127.0.0.1:1502", "--unit", "1", "--profile", "sdm")
    assert result.exit_code == 2
    assert result.stderr == (
        'error: no register map profile "sdm"; use one of: eastron-sdm630, '
        "solaredge-power-control\n")
