"""The store-and-forward buffer: every poll in a local SQLite file until it is confirmed.

A poll is committed in one transaction, so a power cut keeps all of it or none of it. The
file runs in WAL mode with ``synchronous=FULL`` by default: a commit has reached the disk
when `add_poll` returns. ``synchronous="normal"`` writes less often, which spares SD cards,
but a power cut may then lose the last commits (the file itself stays consistent).

Batches are cut from the oldest polls. A batch keeps its id until the collector confirmed
it, so a batch sent again after a timeout or a restart carries the same id and the
collector stores it once. At most one batch is open at a time. A batch the collector
rejected moves to the quarantine table, keeps its readings and is not sent again.

The methods block on SQLite; call them from a worker thread (`asyncio.to_thread`) in the
event loop. One lock serialises them, and `close` waits for a commit in progress.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import BufferFileError
from edge_agent.readings import Channel, DeviceInfo, Poll

logger = logging.getLogger(__name__)

# Rows of a batch, in the order of the wire format's arrays.
ReadingRow = tuple[str, str, int, float | None]  # device id, channel, time in ms, value
StateRow = tuple[str, int, str]  # device id, time in ms, state

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
)
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass(frozen=True, slots=True)
class Batch:
    """Polls cut from the buffer to be sent together under one batch id."""

    batch_id: str
    devices: tuple[DeviceInfo, ...]  # every device that a reading or state names
    channels: tuple[tuple[str, Channel], ...]  # (device id, channel) for every reading
    readings: tuple[ReadingRow, ...]
    states: tuple[StateRow, ...]


@dataclass(frozen=True, slots=True)
class QuarantinedBatch:
    """A batch the collector rejected; its readings stay in the buffer, unsent."""

    batch_id: str
    quarantined_ms: int
    polls: int
    readings: int
    reason: str


@dataclass(frozen=True, slots=True)
class BufferStats:
    """Depth and size of the buffer. Quarantined polls are counted apart."""

    polls: int  # waiting to be sent, including the open batch
    readings: int
    bytes: int  # database and WAL file
    oldest_ms: int | None  # poll time of the oldest waiting poll
    quarantined_batches: int
    quarantined_readings: int

    def oldest_age(self, now_ms: int) -> float | None:
        """Return the age of the oldest waiting poll in seconds, or None when empty."""
        if self.oldest_ms is None:
            return None
        return (now_ms - self.oldest_ms) / 1000


class Buffer:
    """An open buffer file. Use it as a context manager, or call `close`."""

    def __init__(self, path: str | Path, synchronous: str = "full") -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # (device id, channel name) -> (channel row id, unit), for committed rows only
        self._channels: dict[tuple[str, str], tuple[int, str | None]] = {}
        self._db = _connect(self.path, synchronous)

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

    def add_poll(self, poll: Poll) -> None:
        """Commit one poll: its state, its readings and its device's identity."""
        with self._lock, self._transaction():
            self._store_device(poll.device)
            channel_ids = self._channel_ids(poll)
            cursor = self._db.execute(
                "INSERT INTO polls (device_id, time_ms, state, readings) VALUES (?,?,?,?)",
                (poll.device.device_id, poll.time_ms, str(poll.state), len(poll.values)),
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

    # --- batches ----------------------------------------------------------------------

    def next_batch(self, max_readings: int) -> Batch | None:
        """Return the open batch, or cut a new one from the oldest polls; None if empty.

        A new batch takes whole polls, oldest first, up to `max_readings` readings. A
        poll without readings counts as one. A poll larger than the limit goes alone.
        """
        with self._lock, self._transaction():
            batch_id = self._open_batch_id() or self._cut_batch(max_readings)
            if batch_id is None:
                return None
            return self._read_batch(batch_id)

    def _open_batch_id(self) -> str | None:
        row = self._db.execute(
            """
            SELECT batch_id FROM batches
            WHERE batch_id NOT IN (SELECT batch_id FROM quarantine)
            ORDER BY created_ms, rowid LIMIT 1
            """
        ).fetchone()
        return row[0] if row else None

    def _cut_batch(self, max_readings: int) -> str | None:
        rows = self._db.execute(
            "SELECT id, max(readings, 1) FROM polls WHERE batch_id IS NULL "
            "ORDER BY id LIMIT ?",
            (max(max_readings, 1),),
        ).fetchall()
        if not rows:
            return None

        last_id, total = rows[0][0], 0
        for poll_id, weight in rows:
            total += weight
            if total > max_readings and poll_id != rows[0][0]:
                break
            last_id = poll_id

        batch_id = str(uuid.uuid4())
        self._db.execute("INSERT INTO batches VALUES (?,?)", (batch_id, _now_ms()))
        self._db.execute(
            "UPDATE polls SET batch_id = ? WHERE batch_id IS NULL AND id <= ?",
            (batch_id, last_id),
        )
        logger.debug("cut batch %s from polls up to %d", batch_id, last_id)
        return batch_id

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
            FROM devices WHERE device_id IN (SELECT device_id FROM polls WHERE batch_id = ?)
            ORDER BY device_id
            """,
            (batch_id,),
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
        return Batch(
            batch_id=batch_id,
            devices=tuple(DeviceInfo(*row) for row in devices),
            channels=tuple((device_id, Channel(name, unit))
                           for device_id, name, unit in channels),
            readings=tuple(readings),
            states=tuple(states),
        )

    def confirm(self, batch_id: str) -> int:
        """Delete the batch and its polls after the collector stored it.

        Return the number of readings deleted; 0 for an unknown or already confirmed id.
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
        return deleted

    def quarantine(self, batch_id: str, reason: str) -> None:
        """Set the batch aside with a one-line reason; it is not handed out again."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO quarantine VALUES (?,?,?)",
                (batch_id, _now_ms(), " ".join(reason.split())),
            )

    # --- reporting --------------------------------------------------------------------

    def stats(self) -> BufferStats:
        """Count what waits to be sent and what is quarantined."""
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
            size = self._file_bytes()
        return BufferStats(polls, readings, size, oldest_ms, batches, quarantined)

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

    def _file_bytes(self) -> int:
        page_count = self._db.execute("PRAGMA page_count").fetchone()[0]
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        wal = Path(f"{self.path}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return page_count * page_size + wal_bytes

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
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {pragma}")
        _migrate(db, path)
    except BufferFileError:
        db.close()
        raise
    except sqlite3.DatabaseError as err:
        db.close()
        raise BufferFileError(
            f"cannot use buffer file {path} ({err}); check that the path names the "
            "agent's SQLite buffer and that the file is writable"
        ) from err
    return db


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

