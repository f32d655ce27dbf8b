"""Agent memory: RSS of a running agent with a large backlog, against bare imports.

`solarfleet-agent run` polls ten simulated 1547 test devices (one endpoint, units
1 to 10, every second) while its buffer holds a backlog written beforehand and the
collector URL points at a closed port on 127.0.0.1, so the backlog only grows. Its
resident set size is sampled every second. The limit is a bare Python process that
imports the same modules from outside this project (standard library and
third-party) as the agent, and does nothing else.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    Goal,
    Section,
    child_process,
    free_port,
    rss_bytes,
    simulator,
    temporary_folder,
)
from bench.buffer_writes import make_polls
from edge_agent.buffer import Buffer

DEVICES = 10
BACKLOG_POLLS = 10_000  # of 100 readings: a million readings
SECONDS = 45
WARM_UP = 10  # seconds before the first sample that counts
GATEWAY_ID = "gw-bench"
MB = 1024 * 1024

# The agent's modules that `solarfleet-agent run` loads. The probe lists the modules
# from outside this project that they import.
_AGENT_MODULES = ("edge_agent.cli", "edge_agent.agent", "edge_agent.poller",
                  "edge_agent.forwarder", "edge_agent.buffer")
_PROBE = f"""
import sys
before = set(sys.modules)
for name in {_AGENT_MODULES!r}:
    __import__(name)
own = ("edge_agent", "collector", "bench")
print(" ".join(sorted(m for m in set(sys.modules) - before
                      if not m.startswith(own) and "._" not in m
                      and not m.startswith("_"))))
"""


def third_party_modules() -> list[str]:
    """Return the modules from outside this project that the agent's modules import."""
    output = subprocess.run([sys.executable, "-c", _PROBE], check=True,
                            capture_output=True, text=True).stdout
    return output.split()


def bare_rss(modules: list[str]) -> int:
    """Return the RSS of a Python process that imported `modules` and idles."""
    script = ("import importlib, sys, time\n"
              f"for name in {modules!r}:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except ImportError:\n"
              "        pass\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        process.stdout.readline()
        time.sleep(1)
        return rss_bytes(process.pid)
    finally:
        process.terminate()
        process.wait(10)


def write_config(root: Path, modbus_port: int, buffer_path: Path) -> Path:
    path = root / "agent.toml"
    units = ", ".join(str(u) for u in range(1, DEVICES + 1))
    path.write_text(f"""
[gateway]
id = "{GATEWAY_ID}"

[collector]
url = "http://127.0.0.1:{free_port()}"
token = "bench-token-not-registered"

[buffer]
path = "{buffer_path}"

[[devices]]
name = "bench"
transport = "tcp"
host = "127.0.0.1"
port = {modbus_port}
unit_ids = [{units}]
poll_interval = 1.0
""")
    return path


def write_backlog(path: Path, polls: int) -> int:
    with Buffer(path, "normal", gateway_id=GATEWAY_ID) as buffer:
        for poll in make_polls(polls):
            buffer.add_poll(poll)
    return polls * 100


def file_bytes(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def sample_agent(config: Path, buffer_path: Path, seconds: int
                 ) -> tuple[list[tuple[float, int]], int]:
    """Run the agent; return (seconds, RSS) samples and the buffer's growth."""
    samples = []
    command = [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]
    with child_process(command) as agent:
        started = time.monotonic()
        size_before = file_bytes(buffer_path)
        while (elapsed := time.monotonic() - started) < seconds:
            if agent.poll() is not None:
                error = agent.stderr.read().decode() if agent.stderr else ""
                raise RuntimeError(f"the agent stopped: {error}")
            samples.append((elapsed, rss_bytes(agent.pid)))
            time.sleep(1.0)
        grown = file_bytes(buffer_path) - size_before
    return samples, grown


def run(quick: bool = False) -> Section:
    seconds = 20 if quick else SECONDS
    backlog_polls = BACKLOG_POLLS // 10 if quick else BACKLOG_POLLS
    modbus_port = free_port()
    with temporary_folder("solarfleet-bench-memory-") as root, child_process(
            simulator(DEVICES, modbus_port), port=modbus_port):
        buffer_path = root / "buffer.sqlite"
        backlog = write_backlog(buffer_path, backlog_polls)
        backlog_bytes = file_bytes(buffer_path)
        config = write_config(root, modbus_port, buffer_path)
        samples, grown = sample_agent(config, buffer_path, seconds)
    modules = third_party_modules()
    bare = bare_rss(modules)
    return report(samples, bare, backlog, backlog_bytes, grown, len(modules))


def report(samples: list[tuple[float, int]], bare: int, backlog: int,
           backlog_bytes: int, grown: int, modules: int) -> Section:
    counted = [rss for elapsed, rss in samples if elapsed >= WARM_UP]
    third = max(1, len(counted) // 3)
    early = statistics.median(counted[:third])
    late = statistics.median(counted[-third:])
    excess = (statistics.median(counted) - bare) / MB
    growth = (late - early) / MB
    section = Section("Agent memory")
    section.lines += [
        f"`solarfleet-agent run` polling {DEVICES} simulated 1547 test devices every "
        f"second, with a backlog of {backlog:,} readings ({backlog_bytes / MB:.1f} MB "
        "buffer file) and its collector unreachable, against a bare Python process "
        f"that imports the same {modules} modules from outside this project "
        "(standard library and third-party). RSS from /proc, "
        f"sampled every second for {len(samples)} s; the first {WARM_UP} s "
        "(start, discovery) are not counted.",
        "",
        f"- Bare imports: {bare / MB:.1f} MB. Agent: median "
        f"{statistics.median(counted) / MB:.1f} MB, max {max(counted) / MB:.1f} MB: "
        f"**{excess:.1f} MB above the bare process**.",
        f"- While the buffer grew by {grown / MB:.1f} MB, the RSS went from "
        f"{early / MB:.1f} MB (median of the first third) to {late / MB:.1f} MB "
        f"(last third): **{growth:+.1f} MB**.",
        "- Samples (s: MB): " + ", ".join(
            f"{elapsed:.0f}: {rss / MB:.1f}" for elapsed, rss in samples[::5]) + ".",
    ]
    section.goals += [
        Goal("agent RSS above bare imports, MB", excess, 25.0, at_least=False),
        Goal("agent RSS growth while the backlog grows, MB", growth, 2.0,
             at_least=False),
    ]
    return section
