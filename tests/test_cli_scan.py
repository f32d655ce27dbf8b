"""`scan` through click's CliRunner against the simulator on 127.0.0.1 and a pty pair.

The command runs in a worker thread (it starts its own event loop) while the test's
loop serves the simulated site.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket

from click.testing import CliRunner, Result

from edge_agent.cli import main
from edge_agent.config import load_config
from edge_agent.images import SiteImage, load_image, merge_images
from sim_fixtures import CASES, IMAGES, load_case, null_modem, serve_image  # noqa: F401


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, list(args))


def site_image() -> SiteImage:
    """Five devices on three unit ids, and a unit without SunSpec.

    Unit 1 is an inverter with two meters inside its map, 126 an SMA inverter beside
    unit 3 (the vendor's own map), and 240 a meter behind a Fronius gateway.
    """
    gateway = load_case("C06")
    meter = dataclasses.replace(
        gateway, devices=tuple(d for d in gateway.devices if d.unit == 240))
    return merge_images([load_image(IMAGES / "inverter_with_meters.json"), meter,
                         load_case("C01a")])


# Gateway id and token for a new config, so that load_config accepts it.
HEAD_OPTIONS = ("--gateway-id", "gw-test", "--token", "t0k")


def free_port() -> int:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


SITE_OUTPUT = """\
unit 1: SunSpec map at 40000
  device at 40002: SunSpecTest Inverter-3P, serial inv-1001, version 2.1.0, models 1, 103
  device at 40122: SunSpecTest Meter-Grid, serial mtr-2001, version 1.0, models 1, 203
  device at 40297: SunSpecTest Meter-Load, serial mtr-2002, version 1.0, models 1, 203
unit 126: SunSpec map at 40000
  device at 40002: SMA STP 8.0-3AV-40, serial 3099000101, version 3.10.21.R, \
models 1, 103, 120
unit 240: SunSpec map at 40000
  device at 40002: Fronius Smart Meter 63A, serial ZZ0C0602, version 2.9, models 1, 203
  note: common model at 40002 is 65 registers long (no pad register)
units 2, 4-10, 247: no device: the gateway responded with exception 11
unit 3: not SunSpec: responds, but has no SunS marker at 40000, 0, 50000; read it with a \
device profile
found 5 devices on 3 of 13 unit ids at 127.0.0.1:{port}
"""


async def test_scan_site_writes_config(serve_image, tmp_path):  # noqa: F811
    simulator = await serve_image(site_image())
    config_path = tmp_path / "agent.toml"

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--timeout", "0.5",
                          "--write-config", str(config_path),
                          "--gateway-id", "gw-site-a",
                          "--collector-url", "https://collector.example.com",
                          "--token", "t0k-site-a")

    assert result.exit_code == 0, result.output
    assert result.stdout == SITE_OUTPUT.format(port=simulator.port)
    assert result.stderr == (
        f"wrote {config_path} with units 1, 126, 240; check it with "
        f"`solarfleet-agent check-config {config_path}`\n")
    checked = await invoke("check-config", str(config_path))
    assert checked.exit_code == 0, checked.stderr
    assert checked.stdout == "ok: 1 device groups, 3 units\n"
    config = load_config(config_path)
    group = config.devices[0]
    assert group.unit_ids == (1, 126, 240)
    assert group.settings.host == "127.0.0.1"
    assert group.settings.port == simulator.port
    assert group.profiles == {}
    assert config.gateway_id == "gw-site-a"
    assert config.collector.url == "https://collector.example.com"
    assert config.collector.token == "t0k-site-a"
    text = config_path.read_text()
    assert "# Unit 3 responds without SunSpec" in text
    assert "replace-with-" not in text


async def test_scan_placeholders_rejected(serve_image, tmp_path):  # noqa: F811
    simulator = await serve_image("C03")
    config_path = tmp_path / "agent.toml"

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1",
                          "--write-config", str(config_path))

    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"wrote {config_path} with units 1; replace the gateway id, collector URL "
        f"and token, then run `solarfleet-agent check-config {config_path}`\n")
    checked = await invoke("check-config", str(config_path))
    assert checked.exit_code == 1
    assert checked.stdout == ""
    assert checked.stderr.splitlines() == [
        f'{config_path}: gateway.id is still the placeholder '
        '"replace-with-the-gateway-id"; set it to the id registered with '
        "`solarfleet-collector gateways add`",
        f"{config_path}: collector.token is still the placeholder "
        '"replace-with-the-gateway-token"; set it to the token printed by '
        "`solarfleet-collector gateways add`",
    ]


async def test_scan_partial_head(serve_image, tmp_path):  # noqa: F811
    simulator = await serve_image("C03")
    config_path = tmp_path / "agent.toml"

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1",
                          "--write-config", str(config_path), "--token", "t0k")

    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"wrote {config_path} with units 1; replace the gateway id and collector "
        f"URL, then run `solarfleet-agent check-config {config_path}`\n")
    text = config_path.read_text()
    assert 'id = "replace-with-the-gateway-id"' in text
    assert 'url = "http://127.0.0.1:8080"' in text
    assert 'token = "t0k"' in text


async def test_scan_head_options_need_new_file(tmp_path):
    config_path = tmp_path / "agent.toml"
    config_path.write_text("")

    result = await invoke("scan", "127.0.0.1:1502", "--write-config",
                          str(config_path), "--gateway-id", "gw", "--token", "t0k")

    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {config_path} already exists, and scan only appends a [[devices]] "
        "table to it; leave out --gateway-id and --token and edit the file, or "
        "choose a new file\n")
    assert config_path.read_text() == ""


async def test_scan_head_options_need_write_config():
    result = await invoke("scan", "127.0.0.1:1502", "--collector-url", "http://h")

    assert result.exit_code == 1
    assert result.stderr == ("error: without --write-config there is no config file "
                             "for --collector-url; add --write-config FILE\n")


async def test_scan_appends_to_config(serve_image, tmp_path):  # noqa: F811
    first = await serve_image("C03")
    second = await serve_image("C01b")
    config_path = tmp_path / "agent.toml"
    await invoke("scan", f"127.0.0.1:{first.port}", "--units", "1",
                 "--write-config", str(config_path), *HEAD_OPTIONS)

    result = await invoke("scan", f"127.0.0.1:{second.port}", "--units", "247",
                          "--write-config", str(config_path))

    assert result.exit_code == 0, result.output
    assert result.stderr == (f"appended a [[devices]] table for units 247 to "
                             f"{config_path}\n")
    config = load_config(config_path)
    assert [group.unit_ids for group in config.devices] == [(1,), (247,)]


async def test_scan_never_duplicates_endpoint(serve_image, tmp_path):  # noqa: F811
    simulator = await serve_image("C03")
    config_path = tmp_path / "agent.toml"
    await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1",
                 "--write-config", str(config_path))
    before = config_path.read_text()

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1",
                          "--write-config", str(config_path))

    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {config_path} already has a [[devices]] table for "
        f"127.0.0.1:{simulator.port}; edit its unit_ids by hand or choose a new "
        "file\n")
    assert config_path.read_text() == before


async def test_scan_json(serve_image):  # noqa: F811
    simulator = await serve_image("C04b")

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "126,3",
                          "--json")

    assert result.exit_code == 0, result.output
    found, absent = json.loads(result.stdout)
    assert found == {
        "unit": 126, "state": "online", "base": 40000,
        "devices": [{
            "at": 40002, "manufacturer": "SMA", "model": "STP 10.0-3SE-40",
            "serial": "3099000402", "version": "2.03.12.R",
            "models": [1, 11, 12, 103, 120, 121, 122, 123, 64870, 160],
        }],
        "notes": [
            "model 64870 at 40369 has no public definition, so its values are not "
            "read",
            "chain has no end marker: register 40441 responds with exception 2",
        ],
        "failure": None,
    }
    assert absent == {"unit": 3, "state": "offline", "base": None, "devices": [],
                      "notes": [],
                      "failure": "no device: the gateway responded with exception 11"}


async def test_scan_quirk_notes(serve_image):  # noqa: F811
    simulator = await serve_image("C10")

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1")

    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if "note:" in line]
    assert notes == [
        "  note: reads of 125 registers are rejected, reads of 49 work; set "
        "max_registers = 49 or lower",
        "  note: matches quirk fimer-max-50-registers: max_registers = 50",
    ]


async def test_scan_chain_without_end(serve_image):  # noqa: F811
    simulator = await serve_image("C04a")

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "71")

    assert result.exit_code == 0, result.output
    assert "  note: chain has no end marker: register 40479 reads 0x0000\n" in \
        result.stdout


async def test_scan_progress_on_stderr(serve_image):  # noqa: F811
    simulator = await serve_image("C03")

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1-20")

    assert result.exit_code == 0, result.output
    assert result.stderr == "".join(f"scanning unit {unit} ({unit}/20)\n"
                                    for unit in range(1, 21))
    assert result.stdout.endswith("found 1 device on 1 of 20 unit ids at "
                                  f"127.0.0.1:{simulator.port}\n")


async def test_scan_unreachable():
    port = free_port()

    result = await invoke("scan", f"127.0.0.1:{port}", "--timeout", "0.5")

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: 127.0.0.1:{port}: connection refused; check the port, and that no "
        "other client holds the device's only connection\n")


async def test_scan_nothing_found(serve_image):  # noqa: F811
    simulator = await serve_image("C19")

    result = await invoke("scan", f"127.0.0.1:{simulator.port}", "--units", "1")

    assert result.exit_code == 1
    assert result.stdout == (
        "unit 1: not SunSpec: responds, but has no SunS marker at 40000, 0, 50000; read "
        "it with a device profile\n"
        f"found 0 devices on 0 of 1 unit ids at 127.0.0.1:{simulator.port}\n")
    assert result.stderr == (f"error: no SunSpec device found on "
                             f"127.0.0.1:{simulator.port}\n")


async def test_scan_bad_units():
    result = await invoke("scan", "127.0.0.1:1502", "--units", "1-10,248")
    assert result.exit_code == 1
    assert result.stderr == ("error: unit id 248 is outside 1-247; use numbers from 1 "
                             "to 247\n")


async def test_scan_reversed_range():
    result = await invoke("scan", "127.0.0.1:1502", "--units", "5-1")
    assert result.exit_code == 1
    assert result.stderr == "error: unit id range 5-1 is reversed; write it as 1-5\n"


async def test_scan_non_ascii_digit():
    result = await invoke("scan", "127.0.0.1:1502", "--units", "\u00b2")
    assert result.exit_code == 1
    assert result.stderr == ("error: unit id '\u00b2' is not a number or a range like "
                             "1-10; write them as in 1-10,126,240,247\n")


async def test_scan_timeout_nan():
    result = await invoke("scan", "127.0.0.1:1502", "--timeout", "nan")
    assert result.exit_code == 2
    assert result.stderr.endswith(
        "Error: Invalid value for '--timeout': nan is not a number of seconds.\n")


async def test_scan_bad_target():
    result = await invoke("scan", "modbus://host:502")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: target 'modbus://host:502' is not host[:port], "
        "rtu-over-tcp://host:port or a serial device path like /dev/ttyUSB0; check "
        "the target\n")


async def test_scan_rtu_over_tcp(serve_image):  # noqa: F811
    simulator = await serve_image("C06", framer="rtu-over-tcp")

    result = await invoke("scan", f"rtu-over-tcp://127.0.0.1:{simulator.port}",
                          "--units", "1,240")

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        f"found 2 devices on 2 of 2 unit ids at 127.0.0.1:{simulator.port}\n")


async def test_scan_serial_line(serve_image, null_modem, tmp_path):  # noqa: F811
    device_end, agent_end = null_modem
    await serve_image("C06", framer="rtu", serial_port=device_end, baudrate=19200)
    config_path = tmp_path / "agent.toml"

    result = await invoke("scan", agent_end, "--baudrate", "19200", "--units",
                          "1,240", "--write-config", str(config_path), *HEAD_OPTIONS)

    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"found 2 devices on 2 of 2 unit ids at "
                                  f"{agent_end}\n")
    group = load_config(config_path).devices[0]
    assert group.settings.transport == "rtu"
    assert group.settings.serial_port == agent_end
    assert group.settings.baudrate == 19200
    assert group.unit_ids == (1, 240)
