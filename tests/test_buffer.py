"""SQLite buffer: polls are atomic, batches keep their ids, confirm deletes one batch."""

import sqlite3

import pytest

from edge_agent.buffer import SCHEMA_VERSION, Buffer
from edge_agent.errors import BufferFileError
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll

INVERTER = DeviceInfo(
    device_id="sn-1", address="127.0.0.1:5020/1", name="inverter",
    manufacturer="SunSpecTest", model="Test-1547-1", serial="sn-1", version="1.2.3",
)
METER = DeviceInfo(device_id="127.0.0.1:5020/2", address="127.0.0.1:5020/2")


def inverter_poll(time_ms: int, watts: float = 9800.0) -> Poll:
    return Poll(
        device=INVERTER, time_ms=time_ms, state=DeviceState.ONLINE,
        values={"701.W": watts, "701.PhVphB": None},
        channels=(Channel("701.W", "W"), Channel("701.PhVphB", "V")),
    )


@pytest.fixture
def buffer_path(tmp_path):
    return tmp_path / "buffer.sqlite"


@pytest.fixture
def buffer(buffer_path):
    with Buffer(buffer_path) as opened:
        yield opened


def test_batch_has_wire_rows(buffer):
    buffer.add_poll(inverter_poll(1000))
    buffer.add_poll(Poll(METER, 1000, DeviceState.OFFLINE))

    batch = buffer.next_batch(100)

    assert batch.devices == (METER, INVERTER)
    assert batch.channels == (
        ("sn-1", Channel("701.PhVphB", "V")),
        ("sn-1", Channel("701.W", "W")),
    )
    assert batch.readings == (
        ("sn-1", "701.PhVphB", 1000, None),
        ("sn-1", "701.W", 1000, 9800.0),
    )
    assert batch.states == (
        ("sn-1", 1000, "online"),
        ("127.0.0.1:5020/2", 1000, "offline"),
    )


def test_empty_buffer_has_no_batch(buffer):
    assert buffer.next_batch(100) is None


def test_batch_id_stable_until_confirmed(buffer):
    buffer.add_poll(inverter_poll(1000))
    first = buffer.next_batch(100)
    buffer.add_poll(inverter_poll(2000))

    again = buffer.next_batch(100)

    assert again == first
    assert len(again.readings) == 2


def test_batch_id_stable_across_reopen(buffer_path):
    with Buffer(buffer_path) as buffer:
        buffer.add_poll(inverter_poll(1000))
        first = buffer.next_batch(100)

    with Buffer(buffer_path) as buffer:
        assert buffer.next_batch(100) == first


def test_confirm_deletes_only_batch(buffer):
    buffer.add_poll(inverter_poll(1000))
    first = buffer.next_batch(100)
    buffer.add_poll(inverter_poll(2000, watts=5.0))

    assert buffer.confirm(first.batch_id) == 2

    second = buffer.next_batch(100)
    assert second.batch_id != first.batch_id
    assert second.readings == (
        ("sn-1", "701.PhVphB", 2000, None),
        ("sn-1", "701.W", 2000, 5.0),
    )
    assert buffer.stats().readings == 2


def test_confirm_unknown_id_deletes_nothing(buffer):
    buffer.add_poll(inverter_poll(1000))
    buffer.next_batch(100)
    assert buffer.confirm("no-such-batch") == 0
    assert buffer.stats().readings == 2


def test_batch_takes_whole_polls(buffer):
    for time_ms in (1000, 2000, 3000):
        buffer.add_poll(inverter_poll(time_ms))

    batch = buffer.next_batch(5)

    assert [row[2] for row in batch.readings] == [1000, 1000, 2000, 2000]
    assert [row[1] for row in batch.states] == [1000, 2000]


def test_large_poll_goes_alone(buffer):
    buffer.add_poll(inverter_poll(1000))
    buffer.add_poll(inverter_poll(2000))
    batch = buffer.next_batch(1)
    assert [row[1] for row in batch.states] == [1000]
    assert len(batch.readings) == 2


def test_poll_without_values_counts_one(buffer):
    for time_ms in (1000, 2000, 3000):
        buffer.add_poll(Poll(METER, time_ms, DeviceState.OFFLINE))
    batch = buffer.next_batch(2)
    assert batch.readings == ()
    assert [row[1] for row in batch.states] == [1000, 2000]


def test_poll_is_atomic(buffer, buffer_path):
    # A value that SQLite cannot bind fails the reading insert after the poll row and
    # the device row were written in the same transaction.
    bad = Poll(INVERTER, 1000, DeviceState.ONLINE, values={"701.W": object()})
    with pytest.raises(sqlite3.ProgrammingError):
        buffer.add_poll(bad)

    with sqlite3.connect(buffer_path) as db:
        assert db.execute("SELECT count(*) FROM polls").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM channels").fetchone() == (0,)
    buffer.add_poll(inverter_poll(2000))
    assert buffer.next_batch(100).readings[1] == ("sn-1", "701.W", 2000, 9800.0)


def test_reopen_keeps_polls(buffer_path):
    with Buffer(buffer_path) as buffer:
        buffer.add_poll(inverter_poll(1000))
    with Buffer(buffer_path) as buffer:
        batch = buffer.next_batch(100)
        buffer.add_poll(inverter_poll(2000))
        assert buffer.confirm(batch.batch_id) == 2
        assert buffer.next_batch(100).states == (("sn-1", 2000, "online"),)


def test_unit_change_updates_channel(buffer):
    buffer.add_poll(inverter_poll(1000))
    buffer.add_poll(Poll(INVERTER, 2000, DeviceState.ONLINE, values={"701.W": 1.0},
                         channels=(Channel("701.W", "kW"),)))
    batch = buffer.next_batch(100)
    assert ("sn-1", Channel("701.W", "kW")) in batch.channels


def test_reading_without_channel_record(buffer):
    buffer.add_poll(Poll(INVERTER, 1000, DeviceState.ONLINE, values={"1.DA": 1.0}))
    assert buffer.next_batch(100).channels == (("sn-1", Channel("1.DA", None)),)


def test_device_info_updated(buffer):
    buffer.add_poll(inverter_poll(1000))
    updated = DeviceInfo(device_id="sn-1", address="127.0.0.1:5020/1",
                         name="inverter", version="2.0.0")
    buffer.add_poll(Poll(updated, 2000, DeviceState.SLEEPING))
    assert buffer.next_batch(100).devices == (updated,)


def test_quarantine_sets_batch_aside(buffer):
    buffer.add_poll(inverter_poll(1000))
    rejected = buffer.next_batch(100)
    buffer.add_poll(inverter_poll(2000))

    buffer.quarantine(rejected.batch_id, "HTTP 400: readings[0] has\n no time")

    following = buffer.next_batch(100)
    assert following.batch_id != rejected.batch_id
    assert following.states == (("sn-1", 2000, "online"),)
    [entry] = buffer.quarantined()
    assert entry.batch_id == rejected.batch_id
    assert entry.polls == 1
    assert entry.readings == 2
    assert entry.reason == "HTTP 400: readings[0] has no time"


def test_split_halves_open_batch(buffer):
    for time_ms in (1000, 2000, 3000):
        buffer.add_poll(inverter_poll(time_ms))
    parent = buffer.next_batch(100).batch_id

    older, newer = buffer.split(parent)

    first = buffer.next_batch(100)
    assert first.batch_id == older
    assert first.states == (("sn-1", 1000, "online"),)
    assert buffer.next_batch(100).batch_id == older
    buffer.confirm(older)
    second = buffer.next_batch(100)
    assert second.batch_id == newer
    assert second.states == (("sn-1", 2000, "online"), ("sn-1", 3000, "online"))
    assert buffer.confirm(parent) == 0


def test_split_single_poll_is_none(buffer):
    buffer.add_poll(inverter_poll(1000))
    batch_id = buffer.next_batch(100).batch_id

    assert buffer.split(batch_id) is None
    assert buffer.split("no-such-batch") is None
    assert buffer.next_batch(100).batch_id == batch_id


def test_stats_counts(buffer):
    buffer.add_poll(inverter_poll(1000))
    rejected = buffer.next_batch(100)
    buffer.quarantine(rejected.batch_id, "HTTP 400")
    buffer.add_poll(inverter_poll(4000))
    buffer.add_poll(Poll(METER, 5000, DeviceState.OFFLINE))

    stats = buffer.stats()

    assert stats.polls == 2
    assert stats.readings == 2
    assert stats.oldest_ms == 4000
    assert stats.oldest_age(now_ms=10_000) == 6.0
    assert stats.quarantined_batches == 1
    assert stats.quarantined_readings == 2
    assert stats.bytes >= buffer_file_size(buffer)


def buffer_file_size(buffer: Buffer) -> int:
    return buffer.path.stat().st_size


def test_empty_stats(buffer):
    stats = buffer.stats()
    assert stats.polls == 0
    assert stats.readings == 0
    assert stats.oldest_age(now_ms=10_000) is None
    assert stats.quarantined_batches == 0


def test_wal_and_full_sync(buffer_path):
    with Buffer(buffer_path) as buffer:
        db = buffer._db
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    with Buffer(buffer_path, synchronous="normal") as buffer:
        assert buffer._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_schema_version_recorded(buffer_path):
    Buffer(buffer_path).close()
    with sqlite3.connect(buffer_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_newer_schema_rejected(buffer_path):
    with sqlite3.connect(buffer_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(BufferFileError) as caught:
        Buffer(buffer_path)
    assert str(caught.value) == (
        f"buffer file {buffer_path} has schema version {SCHEMA_VERSION + 1}, but this "
        f"agent knows versions up to {SCHEMA_VERSION}; upgrade the agent"
    )


def test_not_a_database(buffer_path):
    buffer_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(BufferFileError) as caught:
        Buffer(buffer_path)
    assert str(caught.value) == (
        f"cannot use buffer file {buffer_path} (file is not a database); check that "
        "the path names the agent's SQLite buffer and that the file is writable"
    )


def test_missing_folder(tmp_path):
    path = tmp_path / "absent" / "buffer.sqlite"
    with pytest.raises(BufferFileError) as caught:
        Buffer(path)
    assert str(caught.value) == (
        f"cannot open buffer file {path} (unable to open database file); check that "
        "its folder exists and is writable"
    )


def overwrite_pages(path, first_page: int = 2) -> None:
    """Overwrite every page of the file from `first_page` on with 0xFF bytes."""
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.seek(4096 * first_page)
        file.write(b"\xff" * (size - 4096 * first_page))


def filled_buffer(path) -> Buffer:
    buffer = Buffer(path)
    for time_ms in range(1000, 1200):
        buffer.add_poll(inverter_poll(time_ms))
    buffer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return buffer


def test_corrupt_file_rejected_at_open(buffer_path):
    filled_buffer(buffer_path).close()
    overwrite_pages(buffer_path)

    with pytest.raises(BufferFileError) as caught:
        Buffer(buffer_path)
    message = str(caught.value)
    assert message.startswith(f"buffer file {buffer_path} is corrupt (")
    assert message.endswith(
        f"); stop the agent, move the file aside (mv {buffer_path} "
        f"{buffer_path}.corrupt) and start it again with a new buffer")
    assert "\n" not in message


def test_write_failure_counted_logged_once(buffer_path, caplog):
    buffer = filled_buffer(buffer_path)
    overwrite_pages(buffer_path)
    # A write through another connection makes the buffer drop its page cache.
    with sqlite3.connect(buffer_path, isolation_level=None) as other:
        other.execute("PRAGMA user_version = 2")

    with caplog.at_level("INFO", logger="edge_agent.buffer"):
        stored = [buffer.add_poll(inverter_poll(time_ms)) for time_ms in (5000, 6000)]

    assert stored == [False, False]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "database disk image is malformed" in errors[0].getMessage()
    assert buffer._lost_polls == 2
    assert buffer._lost_readings == 4
    with pytest.raises(BufferFileError):
        buffer.stats()
    buffer.close()
