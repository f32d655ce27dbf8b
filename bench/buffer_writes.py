"""Agent buffer: polls committed by Buffer.add_poll against raw sqlite3 executemany.

Both write the same polls (five devices of 100 channels, one transaction per poll)
into a fresh file of the buffer's schema in WAL mode with the same `synchronous`
setting. The raw writer knows its channel ids beforehand and does nothing but insert
the poll row and its readings; Buffer.add_poll also stores the device's identity,
registers channels and checks the file's size limits.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from bench.common import Goal, Section, alternate, median_of, temporary_folder
from edge_agent.buffer import Buffer
from edge_agent.readings import Channel, DeviceInfo, DeviceState, Poll

DEVICES = 5
CHANNELS = 100
POLLS = {"normal": 2_000, "full": 300}
REPEATS = 3
GATEWAY_ID = "gw-bench"


def make_polls(count: int) -> list[Poll]:
    devices = [DeviceInfo(f"inv-{n}", f"127.0.0.1:502/{n}", f"inverter {n}")
               for n in range(1, DEVICES + 1)]
    channels = tuple(Channel(f"160.module[{i}].DCW", "W")
                     for i in range(1, CHANNELS + 1))
    polls = []
    for number in range(count):
        time_ms = 1_764_864_000_000 + (number // DEVICES) * 10_000
        values: dict[str, float | None] = {
            c.name: float(number % 1000 + i) for i, c in enumerate(channels)}
        polls.append(Poll(devices[number % DEVICES], time_ms, DeviceState.ONLINE,
                          values, channels))
    return polls


def buffer_rate(path: Path, polls: list[Poll], synchronous: str) -> float:
    with Buffer(path, synchronous, gateway_id=GATEWAY_ID) as buffer:
        started = time.perf_counter()
        for poll in polls:
            buffer.add_poll(poll)
        return len(polls) / (time.perf_counter() - started)


def raw_rate(path: Path, polls: list[Poll], synchronous: str) -> float:
    Buffer(path, synchronous, gateway_id=GATEWAY_ID).close()  # the same schema
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        ids = _insert_channels(db, polls)
        started = time.perf_counter()
        for poll in polls:
            device_id = poll.device.device_id
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute(
                "INSERT INTO polls (device_id, time_ms, state, readings, gateway_id) "
                "VALUES (?,?,?,?,?)",
                (device_id, poll.time_ms, str(poll.state), len(poll.values),
                 GATEWAY_ID))
            db.executemany(
                "INSERT INTO readings (poll_id, channel_id, value) VALUES (?,?,?)",
                [(cursor.lastrowid, ids[(device_id, name)], value)
                 for name, value in poll.values.items()])
            db.execute("COMMIT")
        return len(polls) / (time.perf_counter() - started)
    finally:
        db.close()


def _insert_channels(db: sqlite3.Connection, polls: list[Poll]
                     ) -> dict[tuple[str, str], int]:
    names = {(p.device.device_id, c.name, c.unit) for p in polls for c in p.channels}
    db.executemany("INSERT INTO channels (device_id, name, unit) VALUES (?,?,?)",
                   sorted(names, key=lambda n: (n[0], n[1])))
    rows = db.execute("SELECT device_id, name, id FROM channels")
    return {(device_id, name): id_ for device_id, name, id_ in rows}


def run(quick: bool = False) -> Section:
    repeats = 1 if quick else REPEATS
    results: dict[str, tuple[list[float], list[float]]] = {}
    with temporary_folder("solarfleet-bench-buffer-") as root:
        for synchronous, count in POLLS.items():
            polls = make_polls(count // 10 if quick else count)
            results[synchronous] = tuple(alternate(  # type: ignore[assignment]
                repeats,
                lambda i, s=synchronous, p=polls: buffer_rate(
                    root / f"buffer-{s}-{i}.sqlite", p, s),
                lambda i, s=synchronous, p=polls: raw_rate(
                    root / f"raw-{s}-{i}.sqlite", p, s)))
    return report(results)


def report(results: dict[str, tuple[list[float], list[float]]]) -> Section:
    section = Section("Agent buffer")
    section.lines += [
        f"Buffer.add_poll of polls of {CHANNELS} readings ({DEVICES} devices in turn), "
        "one transaction each, against raw sqlite3 inserting the same rows "
        "(executemany for the readings) into the same schema with the same pragmas. "
        f"Medians of {len(next(iter(results.values()))[0])} alternated runs, "
        "each on a fresh file in the system's temporary folder.",
        "",
        "| synchronous | polls | add_poll, polls/s | raw, polls/s | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    ratios = {}
    for synchronous, (buffer_runs, raw_runs) in results.items():
        ratio = median_of(buffer_runs) / median_of(raw_runs)
        ratios[synchronous] = ratio
        section.lines.append(
            f"| {synchronous} | {POLLS[synchronous]} | {median_of(buffer_runs):,.0f} "
            f"| {median_of(raw_runs):,.0f} | {ratio:.2f} |")
    section.lines += [
        "",
        "With `synchronous = full` (the default) each commit waits for the disk, so "
        "both rates depend on the disk more than on the code; `normal` shows the "
        "code's own cost, and the goal is checked there.",
    ]
    section.goals.append(
        Goal("buffer add_poll / raw executemany (synchronous normal)",
             ratios["normal"], 0.50))
    return section
