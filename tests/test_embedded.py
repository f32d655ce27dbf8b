"""Embedded PostgreSQL: start, create databases, nested handles, stop."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from collector import embedded


@pytest.fixture
def datadir() -> Iterator[Path]:
    # Outside pytest's 0700 tmp_path: the server runs as the `pgserver` user when root.
    root = Path(tempfile.mkdtemp(prefix="solarfleet-embedded-"))
    yield root / "pg"
    shutil.rmtree(root, ignore_errors=True)


def test_embedded_creates_database(datadir: Path) -> None:
    server = embedded.start(datadir)
    try:
        dsn = server.create_database("solarfleet_catalog")
        again = server.create_database("solarfleet_catalog")
        with psycopg.connect(dsn) as conn:
            name = conn.execute("SELECT current_database()").fetchone()
    finally:
        server.stop()

    assert again == dsn
    assert name == ("solarfleet_catalog",)


def test_embedded_nested_start_shares_server(datadir: Path) -> None:
    outer = embedded.start(datadir)
    inner = embedded.start(datadir)
    inner.stop()
    try:
        with psycopg.connect(outer.admin_dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        outer.stop()

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(outer.admin_dsn, connect_timeout=2)


def test_embedded_keeps_data_after_stop(datadir: Path) -> None:
    first = embedded.start(datadir)
    first.create_database("kept")
    first.stop()

    second = embedded.start(datadir)
    try:
        with psycopg.connect(second.dsn("kept")) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("kept",)
    finally:
        second.stop()
