"""What every benchmark of the suite shares: goals, repeats, servers and processes.

Every figure is a ratio to a limit measured in the same run on the same machine,
because the machines are shared and noisy. Each measurement is repeated, alternating
with its limit, and the medians are compared.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from collector import embedded, migrate
from collector.config import DatabaseConfig, ShardConfig
from collector.databases import create_database, drop_database, dsn_for

ROOT = Path(__file__).resolve().parent.parent
PG_DSN_ENV = "SOLARFLEET_TEST_PG_DSN"
DEVICE_IMAGE = ROOT / "tests" / "fixtures" / "images" / "device_1547.json"


@dataclass(frozen=True)
class Goal:
    """A measured ratio against its target; `at_least` False means at most."""

    name: str
    ratio: float | None  # None: not measured
    target: float
    at_least: bool = True
    reason: str = ""  # why it was not measured

    @property
    def met(self) -> bool:
        if self.ratio is None:
            return False
        return self.ratio >= self.target if self.at_least else self.ratio <= self.target

    def line(self) -> str:
        """Return the goal's summary line, e.g. "ingest: 0.72 (goal >= 0.60) met"."""
        sign = ">=" if self.at_least else "<="
        if self.ratio is None:
            return f"{self.name}: not measured ({self.reason}) not met"
        verdict = "met" if self.met else "not met"
        return f"{self.name}: {self.ratio:.2f} (goal {sign} {self.target:g}) {verdict}"


@dataclass
class Section:
    """One benchmark's part of docs/benchmarks.md: its title, text and goals."""

    title: str
    lines: list[str] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines]).rstrip() + "\n"


def median_of(runs: list[float]) -> float:
    return statistics.median(runs)


def alternate(repeats: int, *measures: Callable[[int], float]) -> list[list[float]]:
    """Run each measure `repeats` times, alternating, and return their results.

    Each measure is called with the repeat's index, so it can use fresh data.
    Alternating spreads the machine's noise over all of them alike.
    """
    results: list[list[float]] = [[] for _ in measures]
    for index in range(repeats):
        for measure, runs in zip(measures, results):
            runs.append(measure(index))
    return results


def machine() -> str:
    """Describe this machine: architecture, cores and CPU model."""
    arch = os.uname().machine
    cores = os.cpu_count()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"{arch}, {cores} cores, {model}, Python {python}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0,
                  alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`.

    :raises RuntimeError: nothing listens after `timeout` seconds, or `alive()`
        returned False because the process that should listen has ended.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process for 127.0.0.1:{port} ended; see its "
                               "error above")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


@contextmanager
def temporary_folder(prefix: str) -> Iterator[Path]:
    # Not 0700 under pytest's tmp_path: the embedded server runs as its own user.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def postgres() -> Iterator[str]:
    """Yield an admin DSN: SOLARFLEET_TEST_PG_DSN, or a new embedded server."""
    dsn = os.environ.get(PG_DSN_ENV)
    if dsn:
        yield dsn
        return
    with temporary_folder("solarfleet-bench-pg-") as root:
        server = embedded.start(root / "data")
        try:
            yield server.admin_dsn
        finally:
            server.stop()


@contextmanager
def collector_databases(admin_dsn: str) -> Iterator[DatabaseConfig]:
    """Create a migrated catalog and two shards, and drop them afterwards."""
    prefix = f"sf_bench_{secrets.token_hex(4)}"
    names = [f"{prefix}_catalog", f"{prefix}_shard_1", f"{prefix}_shard_2"]
    created: list[str] = []
    try:
        for name in names:
            create_database(admin_dsn, name)
            created.append(name)
        shards = (
            ShardConfig("shard-1", dsn_for(admin_dsn, names[1])),
            ShardConfig("shard-2", dsn_for(admin_dsn, names[2])),
        )
        catalog_dsn = dsn_for(admin_dsn, names[0])
        migrate.migrate_all(migrate.Databases(catalog_dsn, shards))
        yield DatabaseConfig(catalog=catalog_dsn, shards=shards)
    finally:
        for name in created:
            drop_database(admin_dsn, name)


@contextmanager
def child_process(args: list[str], *, port: int | None = None) -> Iterator[
        subprocess.Popen[bytes]]:
    """Run a child process; wait for its port, if any; terminate it at the end."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=ROOT)
    try:
        if port is not None:
            _wait_for_child(process, port)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_child(process: subprocess.Popen[bytes], port: int) -> None:
    try:
        wait_for_port(port, alive=lambda: process.poll() is None)
    except RuntimeError:
        process.terminate()
        error = process.stderr.read().decode() if process.stderr else ""
        raise RuntimeError(f"{process.args!r} did not start: {error}") from None


def simulator(devices: int, port: int) -> list[str]:
    """Command that serves `devices` copies of the 1547 test device, units 1..N."""
    return [sys.executable, "-m", "edge_agent", "simulate",
            *[str(DEVICE_IMAGE)] * devices, "--port", str(port)]


def rss_bytes(pid: int) -> int:
    """Return the resident set size of process `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} reports no VmRSS")


def cpu_seconds(pids: list[int]) -> float:
    """Return the CPU time (user and system) the processes used so far, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended in the meantime
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def postgres_pids() -> list[int]:
    """Return the ids of this machine's PostgreSQL server processes."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
