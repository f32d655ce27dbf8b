"""SQLite buffer: byte cap and disk floor, gaps, lanes, gateway stamps, upgrade."""

import sqlite3
from pathlib import Path

import pytest

from edge_agent import buffer as buffer_module
from edge_agent.buffer import Buffer, BufferLimits, Gap, Lane, Overflow
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll

INVERTER = DeviceInfo(device_id="sn-1", address="127.0.0.1:5020/1", name="inverter")
METER = DeviceInfo(device_id="sn-2", address="127.0.0.1:5020/2", name="meter")
CHANNELS = tuple(Channel(f"160.module[{i}].DCW", "W") for i in range(1, 101))
CAP = 256 * 1024
POLLS = 400  # about 800 KiB of polls of 100 readings, three times the cap


def wide_poll(time_ms: int, device: DeviceInfo = INVERTER) -> Poll:
    values = {channel.name: float(time_ms % 1000 + i)
              for i, channel in enumerate(CHANNELS)}
    return Poll(device, time_ms, DeviceState.ONLINE, values, CHANNELS)


def poll_times(path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT time_ms FROM polls ORDER BY id")]


def used_bytes(path) -> int:
    with sqlite3.connect(path) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    return (pages - free) * size


@pytest.fixture
def path(tmp_path):
    return tmp_path / "buffer.sqlite"


def test_cap_drops_oldest(path):
    times = [1000 * n for n in range(POLLS)]
    with Buffer(path, gateway_id="gw", limits=BufferLimits(max_bytes=CAP)) as buffer:
        stored = [buffer.add_poll(wide_poll(t)) for t in times]
        stats = buffer.stats()
        [entry] = buffer.gaps()

    kept = poll_times(path)
    dropped = POLLS - len(kept)
    assert stored == [True] * POLLS
    assert 0 < dropped < POLLS
    assert kept == times[dropped:]
    assert used_bytes(path) <= CAP
    assert stats.dropped_polls == dropped
    assert stats.dropped_readings == 100 * dropped
    assert entry.gap == Gap("sn-1", 0, times[dropped - 1], 100 * dropped, dropped,
                            "buffer-full")
    assert entry.batch_id is None
    assert entry.reported_ms is None


def test_cap_drops_newest(path):
    limits = BufferLimits(max_bytes=CAP, overflow=Overflow.DROP_NEWEST)
    times = [1000 * n for n in range(POLLS)]
    with Buffer(path, gateway_id="gw", limits=limits) as buffer:
        stored = [buffer.add_poll(wide_poll(t)) for t in times]
        [entry] = buffer.gaps()

    kept = poll_times(path)
    assert kept == times[:len(kept)]
    assert stored == [True] * len(kept) + [False] * (POLLS - len(kept))
    dropped = POLLS - len(kept)
    assert dropped > 0
    assert entry.gap == Gap("sn-1", times[len(kept)], times[-1], 100 * dropped,
                            dropped, "buffer-full")


def test_drop_counts_survive_reopen(path):
    with Buffer(path, gateway_id="gw", limits=BufferLimits(max_bytes=CAP)) as buffer:
        for n in range(POLLS):
            buffer.add_poll(wide_poll(1000 * n))
        before = buffer.stats()
    with Buffer(path, gateway_id="gw") as buffer:
        after = buffer.stats()
    assert after.dropped_polls == before.dropped_polls
    assert after.dropped_readings == before.dropped_readings
    assert after.dropped_polls > 0


def test_open_batch_never_dropped(path):
    limits = BufferLimits(max_bytes=CAP)
    with Buffer(path, gateway_id="gw", limits=limits) as buffer:
        buffer.add_poll(wide_poll(0))
        buffer.add_poll(wide_poll(1000))
        in_flight = buffer.next_batch(200)
        for n in range(2, POLLS):
            buffer.add_poll(wide_poll(1000 * n))
        again = buffer.next_batch(200)

    assert again == in_flight
    assert poll_times(path)[:2] == [0, 1000]
    assert 2000 not in poll_times(path)


def test_full_with_only_open_batch(path):
    # Every older poll is in the open batch, so the new poll itself is dropped.
    with Buffer(path, gateway_id="gw", limits=BufferLimits(max_bytes=CAP)) as buffer:
        n = 0
        while buffer.stats().dropped_polls == 0:
            buffer.add_poll(wide_poll(1000 * n))
            n += 1
        batch = buffer.next_batch(100 * n)
        dropped_before = buffer.stats().dropped_polls
        results = [buffer.add_poll(wide_poll(1000 * m)) for m in range(n, n + 20)]
        gaps = buffer.gaps()

    fitted = results.count(True)
    assert results == [True] * fitted + [False] * (20 - fitted)
    assert fitted < 20
    assert poll_times(path)[-1] == 1000 * (n + fitted - 1)
    # The gap of the earlier drops went into the batch, so the new drops start a gap.
    in_batch, pending = gaps
    assert in_batch.batch_id == batch.batch_id
    assert in_batch.gap.polls == dropped_before
    assert pending.batch_id is None
    assert pending.gap == Gap("sn-1", 1000 * (n + fitted), 1000 * (n + 19),
                              100 * (20 - fitted), 20 - fitted, "buffer-full")


def test_disk_floor_stops_growth(path):
    with Buffer(path, gateway_id="gw") as buffer:
        buffer.add_poll(wide_poll(0))
    size = path.stat().st_size
    folders: list[Path] = []

    def free_bytes(folder: Path) -> int:
        folders.append(folder)
        return 10_000_000

    # A floor above the free space: the file may only fill the pages it has.
    limits = BufferLimits(min_free_bytes=10_000_001, overflow=Overflow.DROP_NEWEST)
    with Buffer(path, gateway_id="gw", limits=limits,
                free_bytes=free_bytes) as buffer:
        stored = [buffer.add_poll(wide_poll(1000 * n)) for n in range(1, 11)]
        stats = buffer.stats()
        gaps = buffer.gaps()

    assert path.stat().st_size == size
    fitted = stored.count(True)
    assert stored == [True] * fitted + [False] * (10 - fitted)
    assert fitted < 10
    assert stats.dropped_polls == 10 - fitted
    assert [entry.gap for entry in gaps] == [
        Gap("sn-1", 1000 * (fitted + 1), 10_000, 100 * (10 - fitted), 10 - fitted,
            "disk-full"),
    ]
    assert set(folders) == {path.parent}


def test_gap_travels_with_batch(path):
    limits = BufferLimits(max_bytes=CAP)
    with Buffer(path, gateway_id="gw", limits=limits) as buffer:
        buffer.add_poll(Poll(METER, 500, DeviceState.OFFLINE))
        for n in range(1, POLLS):
            buffer.add_poll(wide_poll(1000 * n))
        pending = buffer.gaps()
        batch = buffer.next_batch(100)
        buffer.confirm(batch.batch_id)
        reported = buffer.gaps()

    # The meter's offline poll was the oldest, so it was dropped first.
    meter, inverter = (entry.gap for entry in pending)
    assert meter == Gap("sn-2", 500, 500, 0, 1, "buffer-full")
    assert inverter.first_ms == 1000
    assert batch.gaps == (inverter, meter)
    assert [device.device_id for device in batch.devices] == ["sn-1", "sn-2"]
    assert [entry.batch_id for entry in reported] == [batch.batch_id] * 2
    assert None not in [entry.reported_ms for entry in reported]


def test_gap_devices_listed(path):
    limits = BufferLimits(max_bytes=CAP)
    with Buffer(path, gateway_id="gw", limits=limits) as buffer:
        for n in range(POLLS):
            buffer.add_poll(wide_poll(1000 * n))
        first = buffer.next_batch(100)
        assert [gap.device_id for gap in first.gaps] == ["sn-1"]
        assert [device.device_id for device in first.devices] == ["sn-1"]


def test_gap_only_batch(path):
    limits = BufferLimits(max_bytes=CAP, overflow=Overflow.DROP_NEWEST)
    with Buffer(path, gateway_id="gw", limits=limits) as buffer:
        n = 0
        while buffer.add_poll(wide_poll(1000 * n)):
            n += 1
        batch = buffer.next_batch(100_000)
        buffer.confirm(batch.batch_id)
        buffer.add_poll(wide_poll(1000 * (n + 1)))  # fits again, after the confirm
        assert buffer.next_batch(100_000).gaps == ()
        gapless = buffer.gaps()

    assert batch.readings != ()
    assert [entry.gap.polls for entry in gapless] == [1]


def test_gaps_alone_make_batch(path):
    limits = BufferLimits(max_bytes=CAP, overflow=Overflow.DROP_NEWEST)
    with Buffer(path, gateway_id="gw", limits=limits) as buffer:
        n = 0
        while buffer.add_poll(wide_poll(1000 * n)):
            n += 1
        everything = buffer.next_batch(100_000)
        buffer.add_poll(wide_poll(1000 * (n + 1)))  # dropped: the open batch is full
        buffer.confirm(everything.batch_id)
        alone = buffer.next_batch(100_000)

    assert alone.readings == ()
    assert alone.states == ()
    assert alone.gaps == (Gap("sn-1", 1000 * (n + 1), 1000 * (n + 1), 100, 1,
                              "buffer-full"),)
    assert [device.device_id for device in alone.devices] == ["sn-1"]


def test_live_lane_takes_newest(path):
    with Buffer(path, gateway_id="gw") as buffer:
        for n in range(10):
            buffer.add_poll(wide_poll(1000 * n))
        live = buffer.next_batch(300, Lane.LIVE)
        backlog = buffer.next_batch(300, Lane.BACKLOG)
        buffer.add_poll(wide_poll(10_000))
        buffer.confirm(live.batch_id)
        next_live = buffer.next_batch(300, Lane.LIVE)

    assert [state[1] for state in live.states] == [7000, 8000, 9000]
    assert [state[1] for state in backlog.states] == [0, 1000, 2000]
    # Only polls written after the last live batch: 3000-6000 stay with the backlog.
    assert [state[1] for state in next_live.states] == [10_000]


def test_live_lane_after_confirm(path):
    # Confirming the live batch deletes the polls with the largest row ids, and the
    # next poll must still count as newer than them.
    with Buffer(path, gateway_id="gw") as buffer:
        for n in range(5):
            buffer.add_poll(wide_poll(1000 * n))
        buffer.confirm(buffer.next_batch(100, Lane.LIVE).batch_id)
        buffer.add_poll(wide_poll(5000))
        live = buffer.next_batch(100, Lane.LIVE)

    assert live is not None
    assert [state[1] for state in live.states] == [5000]


def test_lanes_never_share_polls(path):
    with Buffer(path, gateway_id="gw") as buffer:
        seen: list[int] = []
        for n in range(50):
            buffer.add_poll(wide_poll(1000 * n))
            if n % 3 == 0:
                for lane in (Lane.LIVE, Lane.BACKLOG):
                    batch = buffer.next_batch(200, lane)
                    if batch is not None:
                        seen += [state[1] for state in batch.states]
                        buffer.confirm(batch.batch_id)
        while (batch := buffer.next_batch(200)) is not None:
            seen += [state[1] for state in batch.states]
            buffer.confirm(batch.batch_id)

    assert sorted(seen) == [1000 * n for n in range(50)]


def test_open_live_batch_kept(path):
    with Buffer(path, gateway_id="gw") as buffer:
        buffer.add_poll(wide_poll(0))
        first = buffer.next_batch(100, Lane.LIVE)
        buffer.add_poll(wide_poll(1000))
    with Buffer(path, gateway_id="gw") as buffer:
        assert buffer.next_batch(100, Lane.LIVE) == first
        assert buffer.next_batch(100, Lane.BACKLOG).states == (("sn-1", 1000, "online"),)


def test_foreign_polls_quarantined(path):
    with Buffer(path, gateway_id="gw-old") as buffer:
        buffer.add_poll(wide_poll(0))
        buffer.add_poll(wide_poll(1000))
        open_batch = buffer.next_batch(100).batch_id
    with Buffer(path, gateway_id="gw-new") as buffer:
        buffer.add_poll(wide_poll(2000))
        batch = buffer.next_batch(1000)
        quarantined = buffer.quarantined()

    assert batch.states == (("sn-1", 2000, "online"),)
    reason = ("written by gateway 'gw-old', but this agent is gateway 'gw-new'; "
              "readings are never sent under another gateway's id")
    assert [(q.readings, q.reason) for q in quarantined] == [(100, reason),
                                                            (100, reason)]
    assert quarantined[0].batch_id == open_batch or quarantined[1].batch_id == open_batch


def test_foreign_gap_quarantined(path):
    with Buffer(path, gateway_id="gw-old",
                limits=BufferLimits(max_bytes=CAP)) as buffer:
        for n in range(POLLS):
            buffer.add_poll(wide_poll(1000 * n))
    with Buffer(path, gateway_id="gw-new") as buffer:
        assert buffer.next_batch(100_000) is None
        [entry] = buffer.gaps()
        [quarantined] = buffer.quarantined()
    assert entry.batch_id == quarantined.batch_id


def test_schema_1_upgraded(path):
    with sqlite3.connect(path, isolation_level=None) as db:
        db.executescript(buffer_module._MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO devices (device_id, address, name) "
                   "VALUES ('sn-1', 'a', 'inverter')")
        db.execute("INSERT INTO polls (device_id, time_ms, state, readings) "
                   "VALUES ('sn-1', 1000, 'offline', 0)")
    with Buffer(path, gateway_id="gw") as buffer:
        assert buffer.next_batch(100) is None
        [quarantined] = buffer.quarantined()
    assert quarantined.polls == 1
    assert quarantined.reason.startswith("written without a gateway id, ")
