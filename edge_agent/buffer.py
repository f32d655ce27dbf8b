"""The store-and-forward buffer: every poll in a local SQLite file until it is confirmed.

A poll is committed in one transaction, so a power cut keeps all of it or none of it. The
file runs in WAL mode with ``synchronous=FULL`` by default: a commit has reached the disk
when `add_poll` returns. ``synchronous="normal"`` writes less often, which spares SD cards,
but a power cut or an operating system crash may then lose the last commits. The file
itself stays consistent in both modes, and a killed agent process loses nothing in
either, because a commit in WAL mode is in the operating system's cache when it returns.

Each poll is stamped with the gateway id of the agent that wrote it. Polls and batches
stamped with another id (the file was moved to another gateway, or `gateway.id` changed)
are set aside in the quarantine table the first time a batch is requested, and are never
sent under this gateway's id.

Batches are cut from whole polls at one of two ends (`Lane`): the backlog lane takes the
oldest polls, the live lane the polls written since its last batch. A poll belongs to at
most one batch, so no reading is sent under two batch ids. A batch keeps its id until
the collector confirmed it, so a batch sent again after a timeout or a restart carries
the same id and the collector stores it once. At most one batch per lane is open at a
time, except while `split` has cut it in two: then the two halves are sent in turn,
older polls first. A batch the collector rejected moves to the quarantine table, keeps
its readings and is not sent again.

The buffer is bounded by `BufferLimits`: a cap on the bytes its pages hold and a floor of
free space on its file system. When a poll does not fit, the overflow policy drops the
oldest unsent polls (never those of an open batch) or the new poll. Every dropped poll is
counted in the file and recorded in a `Gap` per device, which travels with the next batch.

The methods block on SQLite; call them from a worker thread (`asyncio.to_thread`) in the
event loop. One lock serialises them, and `close` waits for a commit in progress.
"""

from __future__ import annotations

import enum
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import BufferFileError
from edge_agent.readings import Channel, DeviceInfo, Poll

logger = logging.getLogger(__name__)

# Rows of a batch, in the order of the wire format's arrays.
ReadingRow = tuple[str, str, int, float | None]  # device id, channel, time in ms, value
StateRow = tuple[str, int, str]  # device id, time in ms, state

# Reported gaps kept after the collector confirmed them, for `solarfleet-agent buffer`.
# The totals in the counters table cover every drop, including pruned gaps.
KEPT_REPORTED_GAPS = 100

# Each entry upgrades the schema by one version; the file records its version in
# `PRAGMA user_version`.
_MIGRATIONS = (
    """
    CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        name TEXT NOT NULL,
        manufacturer TEXT,
        model TEXT,
        serial TEXT,
        version TEXT
    );
    CREATE TABLE channels (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        name TEXT NOT NULL,
        unit TEXT,
        UNIQUE (device_id, name)
    );
    CREATE TABLE batches (
        batch_id TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE quarantine (
        batch_id TEXT PRIMARY KEY REFERENCES batches (batch_id),
        quarantined_ms INTEGER NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE polls (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        readings INTEGER NOT NULL,
        batch_id TEXT REFERENCES batches (batch_id)
    );
    CREATE INDEX polls_by_batch ON polls (batch_id, id);
    CREATE TABLE readings (
        poll_id INTEGER NOT NULL REFERENCES polls (id),
        channel_id INTEGER NOT NULL REFERENCES channels (id),
        value REAL,
        PRIMARY KEY (poll_id, channel_id)
    ) WITHOUT ROWID;
    """,
    # Version 2: gateway stamps, lanes, dropped polls. Polls and batches of version 1
    # carry no stamp (NULL), so an agent with a gateway id sets them aside. Poll ids
    # become AUTOINCREMENT, because the live lane remembers the last id it took, and
    # a plain rowid is reused once the polls with the largest ids are deleted.
    """
    CREATE TABLE polls_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        readings INTEGER NOT NULL,
        batch_id TEXT REFERENCES batches (batch_id),
        gateway_id TEXT
    );
    INSERT INTO polls_v2 (id, device_id, time_ms, state, readings, batch_id)
        SELECT id, device_id, time_ms, state, readings, batch_id FROM polls;
    DROP TABLE polls;
    ALTER TABLE polls_v2 RENAME TO polls;
    CREATE INDEX polls_by_batch ON polls (batch_id, id);
    ALTER TABLE batches ADD COLUMN gateway_id TEXT;
    ALTER TABLE batches ADD COLUMN lane TEXT NOT NULL DEFAULT 'backlog';
    CREATE TABLE gaps (
        id INTEGER PRIMARY KEY,
        gateway_id TEXT,
        device_id TEXT NOT NULL,
        first_ms INTEGER NOT NULL,
        last_ms INTEGER NOT NULL,
        readings INTEGER NOT NULL,
        polls INTEGER NOT NULL,
        reason TEXT NOT NULL,
        batch_id TEXT REFERENCES batches (batch_id),
        reported_ms INTEGER
    );
    CREATE INDEX gaps_by_batch ON gaps (batch_id);
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
# SQLite errors that come from the agent's own statements or values, not from the file.
_CODE_ERRORS = (sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.DataError,
                sqlite3.NotSupportedError)


class Lane(enum.StrEnum):
    """The end of the buffer that a batch is cut from."""

    BACKLOG = "backlog"  # the oldest polls
    LIVE = "live"  # the newest polls, written since the live lane's last batch


class Overflow(enum.StrEnum):
    """What the buffer drops when a new poll does not fit."""

    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"


class GapReason(enum.StrEnum):
    """Why polls were dropped."""

    BUFFER_FULL = "buffer-full"  # the pages in use would exceed `max_bytes`
    DISK_FULL = "disk-full"  # the file system would have less than `min_free_bytes`


@dataclass(frozen=True, slots=True)
class BufferLimits:
    """Bounds of the buffer, and what to drop when a poll would cross them."""

    max_bytes: int | None = None  # bytes in the file's pages in use; None: no cap
    min_free_bytes: int = 0  # free bytes left on the file system; 0: no floor
    overflow: Overflow = Overflow.DROP_OLDEST


@dataclass(frozen=True, slots=True)
class Gap:
    """Polls of one device that the buffer dropped, with their time range."""

    device_id: str
    first_ms: int  # time of the oldest dropped poll
    last_ms: int  # time of the newest dropped poll
    readings: int
    polls: int
    reason: str


@dataclass(frozen=True, slots=True)
class GapEntry:
    """A gap as the buffer keeps it: waiting to be sent, in a batch, or reported."""

    gap: Gap
    batch_id: str | None
    reported_ms: int | None  # when the collector confirmed the batch that carried it


@dataclass(frozen=True, slots=True)
class Batch:
    """Polls cut from the buffer to be sent together under one batch id."""

    batch_id: str
    devices: tuple[DeviceInfo, ...]  # every device that a reading, state or gap names
    channels: tuple[tuple[str, Channel], ...]  # (device id, channel) for every reading
    readings: tuple[ReadingRow, ...]
    states: tuple[StateRow, ...]
    gaps: tuple[Gap, ...] = ()


@dataclass(frozen=True, slots=True)
class QuarantinedBatch:
    """A batch set aside: its readings stay in the buffer, unsent."""

    batch_id: str
    quarantined_ms: int
    polls: int
    readings: int
    reason: str


@dataclass(frozen=True, slots=True)
class BufferStats:
    """Depth and size of the buffer. Quarantined polls are counted apart."""

    polls: int  # waiting to be sent, including the open batches
    readings: int
    bytes: int  # database and WAL file
    oldest_ms: int | None  # poll time of the oldest waiting poll
    quarantined_batches: int
    quarantined_readings: int
    dropped_polls: int = 0  # since the file was created
    dropped_readings: int = 0

    def oldest_age(self, now_ms: int) -> float | None:
        """Return the age of the oldest waiting poll in seconds, or None when empty."""
        if self.oldest_ms is None:
            return None
        return (now_ms - self.oldest_ms) / 1000


def disk_free_bytes(folder: Path) -> int:
    """Return the bytes free to this process on the file system of `folder`."""
    return shutil.disk_usage(folder).free


class Buffer:
    """An open buffer file. Use it as a context manager, or call `close`.

    `gateway_id` stamps every poll written and selects the polls that batches are cut
    from. None, for tools and tests that need no identity, stamps and selects
    unstamped polls. `free_bytes` returns the free bytes on the file system of the
    folder it is given, and is checked against `limits.min_free_bytes`.
    """

    def __init__(self, path: str | Path, synchronous: str = "full", *,
                 gateway_id: str | None = None,
                 limits: BufferLimits = BufferLimits(),
                 free_bytes: Callable[[Path], int] = disk_free_bytes) -> None:
        self.path = Path(path)
        self.gateway_id = gateway_id
        self.limits = limits
        self._free_bytes = free_bytes
        self._lock = threading.Lock()
        # (device id, channel name) -> (channel row id, unit), for committed rows only
        self._channels: dict[tuple[str, str], tuple[int, str | None]] = {}
        self._foreign_checked = False
        self._live_after_id = 0  # the live lane cuts polls with a larger row id
        self._overflow: str | None = None  # reason of the overflow in progress, if any
        # Polls and readings lost to failed writes since the file was opened. The
        # file cannot count them itself, because its writes are what failed.
        self._lost_polls = 0
        self._lost_readings = 0
        self._write_error: str | None = None  # the failure in progress, if any
        self._db = _connect(self.path, synchronous)
        self._page_size = self._pragma("page_size")

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file, after waiting for a commit in progress."""
        with self._lock:
            self._db.close()
        logger.debug("closed buffer %s", self.path)

    # --- writing polls ----------------------------------------------------------------

    def add_poll(self, poll: Poll) -> bool:
        """Commit one poll: its state, its readings and its device's identity.

        Return False when the poll itself was dropped because it did not fit within
        the limits. Every dropped poll is counted and recorded as a gap; with
        `drop-oldest`, older unsent polls are dropped first to make room.

        A poll that SQLite fails to write (a corrupt page, an I/O error) is counted
        as dropped in memory, and the failure is logged once until a write succeeds.
        """
        with self._lock:
            try:
                with self._transaction():
                    self._store_device(poll.device)
                    channel_ids = self._channel_ids(poll)
                    stored, shortage = self._insert_within_limits(poll, channel_ids)
            except _CODE_ERRORS:
                raise
            except sqlite3.DatabaseError as err:
                self._note_write_failure(poll, err)
                return False
            self._note_overflow(shortage)
            self._note_write_success()
        return stored

    def _note_write_failure(self, poll: Poll, err: sqlite3.DatabaseError) -> None:
        self._lost_polls += 1
        self._lost_readings += len(poll.values)
        if self._write_error is None:
            logger.error("buffer %s: cannot write polls (%s); counting them as dropped "
                         "until a write succeeds. If the file is corrupt, stop the "
                         "agent and move the file aside", self.path, err)
        self._write_error = str(err)

    def _note_write_success(self) -> None:
        if self._write_error is not None:
            logger.info("buffer %s: writes succeed again after %d lost polls",
                        self.path, self._lost_polls)
        self._write_error = None

    def _insert_poll(self, poll: Poll, channel_ids: dict[str, int]) -> None:
        cursor = self._db.execute(
            "INSERT INTO polls (device_id, time_ms, state, readings, gateway_id) "
            "VALUES (?,?,?,?,?)",
            (poll.device.device_id, poll.time_ms, str(poll.state), len(poll.values),
             self.gateway_id),
        )
        self._db.executemany(
            "INSERT INTO readings (poll_id, channel_id, value) VALUES (?,?,?)",
            [(cursor.lastrowid, channel_ids[name], value)
             for name, value in poll.values.items()],
        )

    def _store_device(self, device: DeviceInfo) -> None:
        # The update is skipped when nothing changed, so an unchanged device is not
        # written again on every poll.
        self._db.execute(
            """
            INSERT INTO devices VALUES (?,?,?,?,?,?,?)
            ON CONFLICT (device_id) DO UPDATE SET
                address = excluded.address, name = excluded.name,
                manufacturer = excluded.manufacturer, model = excluded.model,
                serial = excluded.serial, version = excluded.version
            WHERE (devices.address, devices.name, devices.manufacturer, devices.model,
                   devices.serial, devices.version)
                IS NOT (excluded.address, excluded.name, excluded.manufacturer,
                        excluded.model, excluded.serial, excluded.version)
            """,
            (device.device_id, device.address, device.name, device.manufacturer,
             device.model, device.serial, device.version),
        )

    def _channel_ids(self, poll: Poll) -> dict[str, int]:
        """Store new channels and changed units of the poll; return ids by name."""
        device_id = poll.device.device_id
        units = {name: None for name in poll.values}
        units.update((channel.name, channel.unit) for channel in poll.channels)
        changed = []
        for name, unit in units.items():
            cached = self._channels.get((device_id, name))
            if cached is None or (unit is not None and cached[1] != unit):
                changed.append((device_id, name, unit))
        # A reading without a Channel record keeps the unit stored before, if any.
        self._db.executemany(
            """
            INSERT INTO channels (device_id, name, unit) VALUES (?,?,?)
            ON CONFLICT (device_id, name) DO UPDATE SET unit = excluded.unit
            WHERE excluded.unit IS NOT NULL AND unit IS NOT excluded.unit
            """,
            changed,
        )
        if changed:
            rows = self._db.execute(
                "SELECT name, id, unit FROM channels WHERE device_id = ?", (device_id,)
            )
            self._channels.update(((device_id, name), (id_, unit))
                                  for name, id_, unit in rows)
        return {name: self._channels[(device_id, name)][0] for name in poll.values}

    # --- limits and drops -------------------------------------------------------------

    def _insert_within_limits(self, poll: Poll, channel_ids: dict[str, int]
                              ) -> tuple[bool, str | None]:
        """Insert the poll, dropping polls until it fits.

        Return whether the new poll was stored, and the `GapReason` of any drop.
        """
        shortage = None
        while True:
            pages_before = self._pragma("page_count")
            self._db.execute("SAVEPOINT new_poll")
            self._insert_poll(poll, channel_ids)
            reason = self._shortage(pages_before)
            if reason is None:
                self._db.execute("RELEASE new_poll")
                return True, shortage

            # Undo the insert, so that the pages freed by dropping older polls are
            # reused when it is tried again.
            self._db.execute("ROLLBACK TO new_poll")
            self._db.execute("RELEASE new_poll")
            shortage = reason
            if (self.limits.overflow is Overflow.DROP_NEWEST
                    or not self._drop_oldest(max(len(poll.values), 1), reason)):
                self._record_drop(self.gateway_id, poll.device.device_id, poll.time_ms,
                                  poll.time_ms, len(poll.values), 1, reason)
                return False, shortage

    def _shortage(self, pages_before: int) -> str | None:
        """Return why the transaction's pages do not fit the limits, or None."""
        page_count = self._pragma("page_count")
        used = (page_count - self._pragma("freelist_count")) * self._page_size
        if self.limits.max_bytes is not None and used > self.limits.max_bytes:
            return GapReason.BUFFER_FULL
        grown = (page_count - pages_before) * self._page_size
        if self.limits.min_free_bytes and grown > 0:
            # NOTE: the WAL file also grows by each commit until the next checkpoint,
            # by up to about 4 MB with SQLite's default autocheckpoint of 1000 pages.
            free = self._free_bytes(self.path.parent)
            if free - grown < self.limits.min_free_bytes:
                return GapReason.DISK_FULL
        return None

    def _drop_oldest(self, readings: int, reason: str) -> bool:
        """Delete the oldest unsent polls that hold `readings` readings; False if none.

        Polls of an open batch may be on their way to the collector, so they stay.
        """
        rows = self._db.execute(
            "SELECT id, gateway_id, device_id, time_ms, readings FROM polls "
            "WHERE batch_id IS NULL ORDER BY id LIMIT ?",
            (readings,),
        ).fetchall()
        chosen, total = [], 0
        for row in rows:
            chosen.append(row)
            total += max(row[4], 1)
            if total >= readings:
                break
        if not chosen:
            return False

        ids = [(row[0],) for row in chosen]
        self._db.executemany("DELETE FROM readings WHERE poll_id = ?", ids)
        self._db.executemany("DELETE FROM polls WHERE id = ?", ids)
        for _, gateway_id, device_id, time_ms, count in chosen:
            self._record_drop(gateway_id, device_id, time_ms, time_ms, count, 1, reason)
        return True

    def _record_drop(self, gateway_id: str | None, device_id: str, first_ms: int,
                     last_ms: int, readings: int, polls: int, reason: str) -> None:
        """Add dropped polls to the device's unsent gap, and to the file's totals."""
        updated = self._db.execute(
            """
            UPDATE gaps SET first_ms = min(first_ms, :first), last_ms = max(last_ms, :last),
                readings = readings + :readings, polls = polls + :polls
            WHERE batch_id IS NULL AND reported_ms IS NULL AND gateway_id IS :gateway
              AND device_id = :device AND reason = :reason
            """,
            {"first": first_ms, "last": last_ms, "readings": readings, "polls": polls,
             "gateway": gateway_id, "device": device_id, "reason": str(reason)},
        ).rowcount
        if not updated:
            self._db.execute(
                "INSERT INTO gaps (gateway_id, device_id, first_ms, last_ms, readings, "
                "polls, reason) VALUES (?,?,?,?,?,?,?)",
                (gateway_id, device_id, first_ms, last_ms, readings, polls, str(reason)),
            )
        self._db.executemany(
            "INSERT INTO counters VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            [("dropped_readings", readings), ("dropped_polls", polls)],
        )

    def _note_overflow(self, shortage: str | None) -> None:
        # Logged once when dropping starts and once when a poll fits again.
        if shortage is not None and self._overflow is None:
            logger.warning("buffer %s is full (%s, limits %s); dropping polls by %s "
                           "and reporting them as gaps", self.path, shortage,
                           self._limits_text(), self.limits.overflow)
        elif shortage is None and self._overflow is not None:
            logger.info("buffer %s has room again; stopped dropping polls", self.path)
        self._overflow = shortage

    def _limits_text(self) -> str:
        cap = self.limits.max_bytes
        return (f"max_bytes {'none' if cap is None else cap}, "
                f"min_free_bytes {self.limits.min_free_bytes}")

    # --- batches ----------------------------------------------------------------------

    def next_batch(self, max_readings: int, lane: Lane = Lane.BACKLOG) -> Batch | None:
        """Return the lane's open batch, or cut a new one; None if there is nothing.

        A new batch takes whole polls up to `max_readings` readings: the backlog lane
        the oldest polls, the live lane the newest polls written since its last batch.
        A poll without readings counts as one, and a poll larger than the limit goes
        alone. A new batch also carries every gap not yet sent, and a batch of gaps
        alone is cut when no poll waits.
        """
        if not self._foreign_checked:
            with self._lock, self._transaction():
                self._set_aside_foreign()
            self._foreign_checked = True

        with self._lock, self._transaction():
            batch_id = self._open_batch_id(lane) or self._cut_batch(max_readings, lane)
            if batch_id is None:
                return None
            return self._read_batch(batch_id)

    def _open_batch_id(self, lane: Lane) -> str | None:
        row = self._db.execute(
            """
            SELECT batch_id FROM batches
            WHERE lane = ? AND batch_id NOT IN (SELECT batch_id FROM quarantine)
            ORDER BY created_ms, rowid LIMIT 1
            """,
            (str(lane),),
        ).fetchone()
        return row[0] if row else None

    def _cut_batch(self, max_readings: int, lane: Lane) -> str | None:
        first_id, last_id = self._pick_polls(max(max_readings, 1), lane)
        gaps = self._db.execute(
            "SELECT count(*) FROM gaps WHERE batch_id IS NULL AND reported_ms IS NULL "
            "AND gateway_id IS ?",
            (self.gateway_id,),
        ).fetchone()[0]
        if first_id is None and not gaps:
            return None

        batch_id = str(uuid.uuid4())
        self._db.execute(
            "INSERT INTO batches (batch_id, created_ms, gateway_id, lane) VALUES (?,?,?,?)",
            (batch_id, _now_ms(), self.gateway_id, str(lane)),
        )
        if first_id is not None:
            self._db.execute(
                "UPDATE polls SET batch_id = ? WHERE batch_id IS NULL "
                "AND id BETWEEN ? AND ? AND gateway_id IS ?",
                (batch_id, first_id, last_id, self.gateway_id),
            )
        self._db.execute(
            "UPDATE gaps SET batch_id = ? WHERE batch_id IS NULL AND reported_ms IS NULL "
            "AND gateway_id IS ?",
            (batch_id, self.gateway_id),
        )
        logger.debug("cut %s batch %s from polls %s-%s with %d gaps", lane, batch_id,
                     first_id, last_id, gaps)
        return batch_id

    def _pick_polls(self, max_readings: int, lane: Lane
                    ) -> tuple[int | None, int | None]:
        """Return the first and last row id of the polls for a new batch of `lane`."""
        if lane is Lane.LIVE:
            query = ("SELECT id, max(readings, 1) FROM polls WHERE batch_id IS NULL "
                     "AND gateway_id IS ? AND id > ? ORDER BY id DESC LIMIT ?")
            params: tuple[object, ...] = (self.gateway_id, self._live_after_id,
                                          max_readings)
        else:
            query = ("SELECT id, max(readings, 1) FROM polls WHERE batch_id IS NULL "
                     "AND gateway_id IS ? ORDER BY id LIMIT ?")
            params = (self.gateway_id, max_readings)
        rows = self._db.execute(query, params).fetchall()
        if not rows:
            return None, None

        taken, total = [rows[0][0]], rows[0][1]
        for poll_id, weight in rows[1:]:
            total += weight
            if total > max_readings:
                break
            taken.append(poll_id)
        if lane is Lane.LIVE:
            # Polls older than this batch that the live lane left are the backlog's.
            self._live_after_id = max(taken)
        return min(taken), max(taken)

    def _read_batch(self, batch_id: str) -> Batch:
        readings = self._db.execute(
            """
            SELECT polls.device_id, channels.name, polls.time_ms, readings.value
            FROM polls
            JOIN readings ON readings.poll_id = polls.id
            JOIN channels ON channels.id = readings.channel_id
            WHERE polls.batch_id = ? ORDER BY polls.id, channels.name
            """,
            (batch_id,),
        ).fetchall()
        states = self._db.execute(
            "SELECT device_id, time_ms, state FROM polls WHERE batch_id = ? ORDER BY id",
            (batch_id,),
        ).fetchall()
        devices = self._db.execute(
            """
            SELECT device_id, address, name, manufacturer, model, serial, version
            FROM devices WHERE device_id IN (
                SELECT device_id FROM polls WHERE batch_id = :batch
                UNION SELECT device_id FROM gaps WHERE batch_id = :batch)
            ORDER BY device_id
            """,
            {"batch": batch_id},
        ).fetchall()
        channels = self._db.execute(
            """
            SELECT device_id, name, unit FROM channels WHERE id IN (
                SELECT readings.channel_id FROM polls
                JOIN readings ON readings.poll_id = polls.id
                WHERE polls.batch_id = ?)
            ORDER BY device_id, name
            """,
            (batch_id,),
        ).fetchall()
        gaps = self._db.execute(
            "SELECT device_id, first_ms, last_ms, readings, polls, reason FROM gaps "
            "WHERE batch_id = ? ORDER BY device_id, first_ms",
            (batch_id,),
        ).fetchall()
        return Batch(
            batch_id=batch_id,
            devices=tuple(DeviceInfo(*row) for row in devices),
            channels=tuple((device_id, Channel(name, unit))
                           for device_id, name, unit in channels),
            readings=tuple(readings),
            states=tuple(states),
            gaps=tuple(Gap(*row) for row in gaps),
        )

    def confirm(self, batch_id: str) -> int:
        """Delete the batch and its polls after the collector stored it.

        Its gaps are marked reported. Return the number of readings deleted; 0 for an
        unknown or already confirmed id.
        """
        with self._lock, self._transaction():
            deleted = self._db.execute(
                "DELETE FROM readings WHERE poll_id IN "
                "(SELECT id FROM polls WHERE batch_id = ?)",
                (batch_id,),
            ).rowcount
            self._db.execute("DELETE FROM polls WHERE batch_id = ?", (batch_id,))
            self._db.execute("DELETE FROM quarantine WHERE batch_id = ?", (batch_id,))
            self._db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            self._db.execute("UPDATE gaps SET reported_ms = ? WHERE batch_id = ?",
                             (_now_ms(), batch_id))
            self._db.execute(
                "DELETE FROM gaps WHERE reported_ms IS NOT NULL AND id NOT IN ("
                "SELECT id FROM gaps WHERE reported_ms IS NOT NULL "
                "ORDER BY id DESC LIMIT ?)",
                (KEPT_REPORTED_GAPS,),
            )
        return deleted

    def split(self, batch_id: str) -> tuple[str, str] | None:
        """Replace an open batch by two new batches of the older and newer half of its
        polls; the first half also takes its gaps.

        Only a batch that the collector rejected as a whole (HTTP 400 or 413) may be
        split: it stored nothing of it, so no reading is stored under two batch ids.
        Return the two new ids, older half first; None when the batch is not open or
        has fewer than two polls.
        """
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT created_ms, gateway_id, lane FROM batches WHERE batch_id = ? "
                "AND batch_id NOT IN (SELECT batch_id FROM quarantine)",
                (batch_id,),
            ).fetchone()
            poll_ids = [poll_id for (poll_id,) in self._db.execute(
                "SELECT id FROM polls WHERE batch_id = ? ORDER BY id", (batch_id,))]
            if row is None or len(poll_ids) < 2:
                return None

            halves = (str(uuid.uuid4()), str(uuid.uuid4()))
            # Both keep the parent's creation time, and the older half gets the
            # smaller rowid, so `_open_batch_id` hands it out first.
            self._db.executemany(
                "INSERT INTO batches (batch_id, created_ms, gateway_id, lane) "
                "VALUES (?,?,?,?)",
                [(half, *row) for half in halves],
            )
            middle = poll_ids[len(poll_ids) // 2]
            self._db.execute(
                "UPDATE polls SET batch_id = ? WHERE batch_id = ? AND id < ?",
                (halves[0], batch_id, middle),
            )
            self._db.execute("UPDATE polls SET batch_id = ? WHERE batch_id = ?",
                             (halves[1], batch_id))
            self._db.execute("UPDATE gaps SET batch_id = ? WHERE batch_id = ?",
                             (halves[0], batch_id))
            self._db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
        logger.debug("split batch %s into %s and %s", batch_id, *halves)
        return halves

    def quarantine(self, batch_id: str, reason: str) -> None:
        """Set the batch aside with a one-line reason; it is not handed out again."""
        with self._lock, self._transaction():
            self._quarantine(batch_id, reason)

    def _quarantine(self, batch_id: str, reason: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO quarantine VALUES (?,?,?)",
            (batch_id, _now_ms(), " ".join(reason.split())),
        )

    def _set_aside_foreign(self) -> None:
        """Quarantine polls, gaps and open batches stamped by another gateway id."""
        for (batch_id, stamp) in self._db.execute(
            "SELECT batch_id, gateway_id FROM batches WHERE gateway_id IS NOT ? "
            "AND batch_id NOT IN (SELECT batch_id FROM quarantine)",
            (self.gateway_id,),
        ).fetchall():
            self._quarantine(batch_id, self._foreign_reason(stamp))

        stamps = self._db.execute(
            "SELECT gateway_id FROM polls WHERE batch_id IS NULL AND gateway_id IS NOT ? "
            "UNION SELECT gateway_id FROM gaps WHERE batch_id IS NULL "
            "AND reported_ms IS NULL AND gateway_id IS NOT ?",
            (self.gateway_id, self.gateway_id),
        ).fetchall()
        for (stamp,) in stamps:
            batch_id = str(uuid.uuid4())
            self._db.execute(
                "INSERT INTO batches (batch_id, created_ms, gateway_id, lane) "
                "VALUES (?,?,?,?)",
                (batch_id, _now_ms(), stamp, str(Lane.BACKLOG)),
            )
            for table in ("polls", "gaps"):
                self._db.execute(
                    f"UPDATE {table} SET batch_id = ? "
                    "WHERE batch_id IS NULL AND gateway_id IS ?",
                    (batch_id, stamp),
                )
            reason = self._foreign_reason(stamp)
            self._quarantine(batch_id, reason)
            logger.error("buffer %s: %s; moved them to quarantine batch %s",
                         self.path, reason, batch_id)

    def _foreign_reason(self, stamp: str | None) -> str:
        writer = "without a gateway id" if stamp is None else f"by gateway {stamp!r}"
        return (f"written {writer}, but this agent is gateway {self.gateway_id!r}; "
                "readings are never sent under another gateway's id")

    # --- reporting --------------------------------------------------------------------

    def stats(self) -> BufferStats:
        """Count what waits to be sent, what is quarantined and what was dropped.

        :raises BufferFileError: the file is corrupt or cannot be read.
        """
        try:
            return self._stats()
        except _CODE_ERRORS:
            raise
        except sqlite3.DatabaseError as err:
            raise _corrupt(self.path, str(err)) from err

    def _stats(self) -> BufferStats:
        with self._lock:
            polls, readings, oldest_ms = self._db.execute(
                """
                SELECT count(*), coalesce(sum(readings), 0), min(time_ms) FROM polls
                WHERE batch_id IS NULL
                   OR batch_id NOT IN (SELECT batch_id FROM quarantine)
                """
            ).fetchone()
            batches, quarantined = self._db.execute(
                """
                SELECT count(DISTINCT quarantine.batch_id), coalesce(sum(polls.readings), 0)
                FROM quarantine LEFT JOIN polls USING (batch_id)
                """
            ).fetchone()
            counters = dict(self._db.execute("SELECT name, value FROM counters"))
            size = self._file_bytes()
        return BufferStats(
            polls, readings, size, oldest_ms, batches, quarantined,
            dropped_polls=counters.get("dropped_polls", 0) + self._lost_polls,
            dropped_readings=counters.get("dropped_readings", 0) + self._lost_readings,
        )

    def quarantined(self) -> list[QuarantinedBatch]:
        """List the quarantined batches, oldest first."""
        with self._lock:
            rows = self._db.execute(
                """
                SELECT quarantine.batch_id, quarantined_ms, count(polls.id),
                       coalesce(sum(polls.readings), 0), reason
                FROM quarantine LEFT JOIN polls USING (batch_id)
                GROUP BY quarantine.batch_id ORDER BY quarantined_ms, quarantine.batch_id
                """
            ).fetchall()
        return [QuarantinedBatch(*row) for row in rows]

    def gaps(self) -> list[GapEntry]:
        """List the gaps waiting or in a batch, and the last reported ones, oldest first.

        Reported gaps beyond the newest `KEPT_REPORTED_GAPS` are pruned; the totals in
        `stats` still count them.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, first_ms, last_ms, readings, polls, reason, batch_id, "
                "reported_ms FROM gaps ORDER BY id"
            ).fetchall()
        return [GapEntry(Gap(*row[:6]), row[6], row[7]) for row in rows]

    def _file_bytes(self) -> int:
        wal = Path(f"{self.path}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return self._pragma("page_count") * self._page_size + wal_bytes

    def _pragma(self, name: str) -> int:
        return self._db.execute(f"PRAGMA {name}").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock at BEGIN, so a lock held by another connection
        # is waited for there (up to the connect timeout) instead of failing half-way.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._channels.clear()  # it may hold ids of rolled-back channel rows
            raise
        self._db.execute("COMMIT")


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """Open the file, set WAL mode, and bring its schema up to date."""
    pragma = _synchronous_pragma(synchronous)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=10.0)
    except sqlite3.Error as err:
        raise BufferFileError(
            f"cannot open buffer file {path} ({err}); check that its folder exists and "
            "is writable"
        ) from err
    try:
        _check_integrity(db, path)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {pragma}")
        _migrate(db, path)
    except BufferFileError:
        db.close()
        raise
    except sqlite3.DatabaseError as err:
        db.close()
        if "malformed" in str(err):
            raise _corrupt(path, str(err)) from err
        raise BufferFileError(
            f"cannot use buffer file {path} ({err}); check that the path names the "
            "agent's SQLite buffer and that the file is writable"
        ) from err
    return db


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """Raise BufferFileError when SQLite's quick check finds the file corrupt.

    The quick check reads every page once, but skips the index-to-table comparison of
    the full integrity check.
    """
    # NOTE: on an SD card, a buffer near its 1 GiB default cap may take tens of
    # seconds to check; this is an estimate, not measured on gateway hardware.
    rows = db.execute("PRAGMA quick_check(1)").fetchall()
    if rows != [("ok",)]:
        raise _corrupt(path, rows[0][0] if rows else "no result")


def _corrupt(path: Path, detail: str) -> BufferFileError:
    # The quick check's report starts with a header line; the message keeps one line.
    detail = " ".join(detail.replace("*** in database main ***", "").split())
    return BufferFileError(
        f"buffer file {path} is corrupt ({detail}); stop the agent, move the file "
        f"aside (mv {path} {path}.corrupt) and start it again with a new buffer"
    )


def _synchronous_pragma(synchronous: str) -> str:
    if synchronous not in ("full", "normal"):
        raise ValueError(f'synchronous must be "full" or "normal", got {synchronous!r}')
    return synchronous.upper()


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise BufferFileError(
            f"buffer file {path} has schema version {version}, but this agent knows "
            f"versions up to {SCHEMA_VERSION}; upgrade the agent"
        )
    for number in range(version, SCHEMA_VERSION):
        # executescript commits any open transaction first, so the script opens its own.
        try:
            db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[number]}; "
                             f"PRAGMA user_version = {number + 1}; COMMIT;")
        except sqlite3.Error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        logger.info("buffer %s: schema upgraded to version %d", path, number + 1)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000

