"""`check-config`, `run` with a bad config, and `buffer`, through click's CliRunner."""

from pathlib import Path

from click.testing import CliRunner

from edge_agent.buffer import Buffer
from edge_agent.cli import main
from edge_agent.readings import DeviceInfo, DeviceState, Poll

VALID = """\
[gateway]
id = "gw-test"

[collector]
url = "http://127.0.0.1:8080"
token = "secret"

[buffer]
path = "buffer.sqlite"

[[devices]]
name = "inverters"
host = "127.0.0.1"
unit_ids = [1, 2]

[[devices]]
name = "meters"
transport = "rtu"
serial_port = "/dev/ttyUSB0"
unit_ids = [240]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_check_config_ok(tmp_path):
    result = CliRunner().invoke(main, ["check-config", str(write(tmp_path, VALID))])
    assert result.exit_code == 0
    assert result.stdout == "ok: 2 device groups, 3 units\n"
    assert result.stderr == ""


def test_check_config_problems(tmp_path):
    text = VALID.replace("unit_ids = [240]", "unit_ids = [240]\nbaudrate = 0") \
                .replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 70000')
    path = write(tmp_path, text)

    result = CliRunner().invoke(main, ["check-config", str(path)])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"{path}: devices[1].port must be an integer 1-65535, got 70000\n"
        f"{path}: devices[2].baudrate must be an integer 1-4000000, got 0\n"
    )


def test_check_config_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 1
    assert result.stderr == f"{path}: file not found; check the path\n"


def test_run_bad_config_one_line(tmp_path):
    text = VALID.replace('id = "gw-test"', 'id = ""').replace("[240]", "[0]")
    path = write(tmp_path, text)

    result = CliRunner().invoke(main, ["run", "--config", str(path)])

    assert result.exit_code == 2
    assert result.stderr == (
        f'error: {path}: gateway.id must be a non-empty string, got "" (and 1 more; '
        f"run `solarfleet-agent check-config {path}`)\n"
    )


def test_buffer_without_file(tmp_path):
    path = write(tmp_path, VALID)
    result = CliRunner().invoke(main, ["buffer", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: no buffer file at {tmp_path / 'buffer.sqlite'} yet; it is created by "
        "`solarfleet-agent run`\n"
    )


def test_buffer_shows_depth(tmp_path):
    path = write(tmp_path, VALID)
    device = DeviceInfo(device_id="sn-1", address="127.0.0.1:502/1")
    with Buffer(tmp_path / "buffer.sqlite") as buffer:
        buffer.add_poll(Poll(device, 1000, DeviceState.ONLINE, {"701.W": 1.0}))
        rejected = buffer.next_batch(10).batch_id
        buffer.quarantine(rejected, "HTTP 400: bad time")
        buffer.add_poll(Poll(device, 2000, DeviceState.ONLINE, {"701.W": 2.0}))

    result = CliRunner().invoke(main, ["buffer", "--config", str(path)])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"buffer: {tmp_path / 'buffer.sqlite'}"
    assert lines[1] == "waiting: 1 readings in 1 polls"
    # Closing the buffer checkpointed the WAL into the file, and no write followed.
    assert lines[2] == f"size: {(tmp_path / 'buffer.sqlite').stat().st_size} bytes"
    assert lines[3].startswith("oldest: ")
    assert lines[4] == "quarantined: 1 batches, 1 readings"
    assert lines[5].startswith(f"  {rejected} ")
    assert lines[5].endswith(" 1 readings: HTTP 400: bad time")
    assert lines[6] == "dropped: 0 readings in 0 polls"
    assert len(lines) == 7
