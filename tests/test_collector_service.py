"""The collector under systemd: readiness, watchdog and stopping notifications."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from test_service import LIMIT, SystemdSocket

pytestmark = pytest.mark.postgres


@pytest.fixture
def systemd_socket(tmp_path):
    """A notification socket at a file system path; NOTIFY_SOCKET is its `path`."""
    path = tmp_path / "notify.sock"
    listener = SystemdSocket(str(path))
    listener.path = str(path)  # type: ignore[attr-defined]
    yield listener
    listener.close()


def write_config(tmp_path: Path, collector_databases) -> Path:
    shards = "".join(
        f'[[shards]]\nname = "{shard.name}"\ndsn = "{shard.dsn}"\n'
        for shard in collector_databases.shards
    )
    path = tmp_path / "collector.toml"
    path.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n'
        f'[database]\ncatalog = "{collector_databases.catalog_dsn}"\n' + shards
    )
    return path


async def test_serve_notifies_systemd(tmp_path, collector_databases, systemd_socket):
    environ = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    environ |= {"NOTIFY_SOCKET": systemd_socket.path, "WATCHDOG_USEC": "400000"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collector", "serve", "--config",
        str(write_config(tmp_path, collector_databases)),
        env=environ, stderr=asyncio.subprocess.PIPE)
    try:
        ready = await systemd_socket.receive_until("READY", "1")
        # Half of the 0.4 s timeout between pings: several arrive within a second.
        for _ in range(3):
            await systemd_socket.receive_until("WATCHDOG", "1")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), LIMIT)

    assert process.returncode == 0, stderr.decode()
    assert ready["STATUS"].startswith("listening on http://127.0.0.1:")
    assert {"STOPPING": "1"} in systemd_socket.pending()


def test_collector_unit_notify_settings():
    path = Path(__file__).parent.parent / "systemd" / "solarfleet-collector.service"
    settings = [line for line in path.read_text().splitlines() if line[:1].isalpha()]
    for expected in ("Type=notify", "NotifyAccess=main", "WatchdogSec=60s",
                     "Restart=on-failure", "ProtectSystem=strict",
                     "NoNewPrivileges=true", "PrivateTmp=true"):
        assert expected in settings
