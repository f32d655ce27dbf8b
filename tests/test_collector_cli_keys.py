"""The `keys` commands: operator and owner keys, revocation, listing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from collector import catalog
from collector.cli import main
from conftest import CollectorDatabases
from test_collector_cli import write_config

pytestmark = pytest.mark.postgres


@pytest.fixture
def config_file(tmp_path: Path, collector_databases: CollectorDatabases) -> str:
    return str(write_config(tmp_path / "collector.toml", collector_databases))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_keys_add_owner_key(
    config_file: str, collector_databases: CollectorDatabases
) -> None:
    owner = catalog.add_owner(collector_databases.catalog_dsn, "Alice Meyer")

    code, out, err = run("keys", "add", "alice", "--owner", str(owner.id),
                         "-c", config_file)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "added key alice"
    assert lines[2] == f"scope: owner {owner.id}"
    key = catalog.list_keys(collector_databases.catalog_dsn)[0]
    assert (key.name, key.owner_id, key.revoked_at) == ("alice", owner.id, None)


def test_keys_add_unknown_owner(config_file: str) -> None:
    code, out, err = run("keys", "add", "alice", "--owner", "7", "-c", config_file)

    assert (code, out) == (2, "")
    assert err == "error: owner 7 not found: use the id printed by `owners add`\n"


def test_keys_revoke_and_list(config_file: str) -> None:
    run("keys", "add", "ops", "-c", config_file)
    run("keys", "add", "spare", "-c", config_file)

    code, out, err = run("keys", "revoke", "ops", "-c", config_file)
    listed = run("keys", "list", "-c", config_file)

    assert (code, out, err) == (0, "revoked key ops\n", "")
    rows = [line.split("\t") for line in listed[1].splitlines()]
    assert [row[:2] for row in rows] == [["ops", "operator"], ["spare", "operator"]]
    assert rows[0][3].startswith("revoked ")
    assert len(rows[1]) == 3


def test_keys_revoke_unknown(config_file: str) -> None:
    code, _, err = run("keys", "revoke", "nobody", "-c", config_file)

    assert code == 2
    assert err == "error: key 'nobody' not found: see `keys list` for the names\n"
