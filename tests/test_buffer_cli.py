"""`solarfleet-agent buffer`: drops with their ranges, through click's CliRunner."""

from datetime import UTC, datetime

from click.testing import CliRunner

from edge_agent.buffer import Buffer, BufferLimits, Overflow
from edge_agent.cli import main
from edge_agent.readings import DeviceInfo, DeviceState, Poll

CONFIG = """\
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
unit_ids = [1]
"""
START_MS = 1_764_864_000_000  # 2025-12-04T16:00:00Z
DEVICE = DeviceInfo(device_id="sn-1", address="127.0.0.1:502/1")


def wide_poll(time_ms: int) -> Poll:
    return Poll(DEVICE, time_ms, DeviceState.ONLINE,
                {f"160.module[{i}].DCW": float(i) for i in range(100)})


def fill_until_drop(buffer: Buffer, n: int) -> int:
    """Add polls from number `n` on until one is dropped; return its number."""
    while buffer.add_poll(wide_poll(START_MS + 10_000 * n)):
        n += 1
    return n


def test_buffer_shows_drops(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    limits = BufferLimits(max_bytes=64 * 1024, overflow=Overflow.DROP_NEWEST)
    with Buffer(tmp_path / "buffer.sqlite", gateway_id="gw-test",
                limits=limits) as buffer:
        first = fill_until_drop(buffer, 0)
        buffer.confirm(buffer.next_batch(100_000).batch_id)
        second = fill_until_drop(buffer, first + 1)

    result = CliRunner().invoke(main, ["buffer", "--config", str(config)])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[5] == "dropped: 200 readings in 2 polls"
    first_time = utc(START_MS + 10_000 * first)
    assert lines[6].startswith(f"  sn-1 {first_time}..{first_time} 100 readings in "
                               "1 polls: buffer-full, reported 20")
    second_time = utc(START_MS + 10_000 * second)
    assert lines[7] == (f"  sn-1 {second_time}..{second_time} 100 readings in 1 polls: "
                        "buffer-full, not sent yet")
    assert len(lines) == 8


def utc(time_ms: int) -> str:
    return f"{datetime.fromtimestamp(time_ms / 1000, UTC):%Y-%m-%dT%H:%M:%SZ}"


def test_buffer_reports_corrupt_file(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    path = tmp_path / "buffer.sqlite"
    with Buffer(path, gateway_id="gw-test") as buffer:
        for n in range(20):
            buffer.add_poll(wide_poll(START_MS + 10_000 * n))
    with path.open("r+b") as file:
        file.seek(2 * 4096)
        file.write(b"\xff" * (path.stat().st_size - 2 * 4096))

    result = CliRunner().invoke(main, ["buffer", "--config", str(config)])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: buffer file {path} is corrupt (")
    assert result.stderr.endswith(
        f"); stop the agent, move the file aside (mv {path} {path}.corrupt) and "
        "start it again with a new buffer\n")
