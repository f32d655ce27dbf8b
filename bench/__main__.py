"""Run the benchmark suite and write docs/benchmarks.md: `make bench`.

Run: .venv/bin/python -m bench [NAME ...] [--quick] [--no-write]

NAME is one of ingest, polling, buffer, memory, fleet (default: all). The suite starts
an embedded PostgreSQL, or uses the server of SOLARFLEET_TEST_PG_DSN, and creates and
drops its own databases. It ends with one line per goal. The "Backlog drain" section of
docs/benchmarks.md is written by bench/drain.py and kept as it is.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime

from bench.common import ROOT, Section, collector_databases, machine, postgres

BENCHMARKS = ROOT / "docs" / "benchmarks.md"
KEPT_SECTION = "## Backlog drain"
NAMES = ("ingest", "polling", "buffer", "memory", "fleet")


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format="%(relativeCreated)d ms %(name)s: %(message)s")
    started = time.monotonic()
    sections = run(args.names or list(NAMES), args.quick)
    text = render(sections, time.monotonic() - started)
    print(text)
    if not args.no_write:
        write(text)
        print(f"written to {BENCHMARKS.relative_to(ROOT)}")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run: {', '.join(NAMES)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="one short run of each, to check that the suite works")
    parser.add_argument("--no-write", action="store_true",
                        help="print the report without updating docs/benchmarks.md")
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}: use one of {', '.join(NAMES)}")
    return args


def run(names: list[str], quick: bool) -> list[Section]:
    """Run the named benchmarks in the suite's order; return their sections."""
    from bench import buffer_writes, fleet_reads, ingest, memory, polling

    sections: list[Section] = []
    with ExitStack() as stack:
        admin_dsn: str | None = None

        def database():
            nonlocal admin_dsn
            if admin_dsn is None:
                admin_dsn = stack.enter_context(postgres())
            return stack.enter_context(collector_databases(admin_dsn))

        steps: dict[str, Callable[[], Section]] = {
            "ingest": lambda: ingest.run(database(), quick),
            "polling": lambda: polling.run(quick),
            "buffer": lambda: buffer_writes.run(quick),
            "memory": lambda: memory.run(quick),
            "fleet": lambda: fleet_reads.run(database(), quick),
        }
        for name in NAMES:
            if name in names:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                sections.append(steps[name]())
    return sections


def render(sections: list[Section], seconds: float) -> str:
    """Render the whole report: the header, each section and the goal lines."""
    command = "python -m bench" + "".join(
        f" {shlex.quote(a)}" for a in sys.argv[1:])
    goals = [goal for section in sections for goal in section.goals]
    parts = [
        "# Benchmarks",
        "",
        f"Measured on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}, with "
        f"`{command}` (`make bench`) in {seconds / 60:.1f} minutes. Every figure is "
        "a ratio to a limit measured in the same run on the same machine, because "
        "the machine is shared and noisy; each is the median of repeated, "
        "alternated runs unless stated. Absolute rates hold for this machine only.",
        "",
        *(section.text() for section in sections),
        "## Goals",
        "",
        "```",
        *(goal.line() for goal in goals),
        "```",
        "",
    ]
    return "\n".join(parts)


def write(text: str) -> None:
    """Write the report, keeping the "Backlog drain" section of bench/drain.py."""
    kept = ""
    if BENCHMARKS.exists():
        pattern = re.compile(rf"^{re.escape(KEPT_SECTION)}\n.*?(?=^## |\Z)",
                             re.S | re.M)
        match = pattern.search(BENCHMARKS.read_text())
        if match:
            kept = match.group(0).rstrip("\n") + "\n\n"
    head, goals = text.split("## Goals", 1)
    BENCHMARKS.write_text(head + kept + "## Goals" + goals)


if __name__ == "__main__":
    main()
