"""The solarfleet-collector command, run through click's CliRunner."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import make_conninfo

from collector import catalog
from collector.cli import main
from collector.config import ShardConfig
from collector.databases import dsn_for, dsn_without_password
from conftest import CollectorDatabases

pytestmark = pytest.mark.postgres


def write_config(path: Path, dbs: CollectorDatabases) -> Path:
    shards = "".join(
        f'\n[[shards]]\nname = "{s.name}"\ndsn = "{s.dsn}"\n' for s in dbs.shards
    )
    path.write_text(f'[database]\ncatalog = "{dbs.catalog_dsn}"\n{shards}')
    return path


@pytest.fixture
def config_file(tmp_path: Path, collector_databases: CollectorDatabases) -> str:
    return str(write_config(tmp_path / "collector.toml", collector_databases))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_migrate_prints_applied(
    tmp_path: Path, empty_databases: CollectorDatabases
) -> None:
    config = str(write_config(tmp_path / "c.toml", empty_databases))

    first = run("migrate", "--config", config)
    second = run("migrate", "--config", config)

    assert first == (
        0,
        "catalog: 0001_catalog, 0002_key_owners\n"
        "shard-1: 0001_shard, 0002_gaps, 0003_rollups, 0004_alerts\n"
        "shard-2: 0001_shard, 0002_gaps, 0003_rollups, 0004_alerts\n",
        "",
    )
    assert second == (
        0,
        "catalog: up to date\nshard-1: up to date\nshard-2: up to date\n",
        "",
    )


def test_owners_add(config_file: str) -> None:
    assert run(
        "owners",
        "add",
        "Alice Meyer",
        "--email",
        "alice@example.org",
        "-c",
        config_file,
    ) == (0, "added owner 1: Alice Meyer\n", "")


def test_installations_add_least_loaded(config_file: str) -> None:
    run("owners", "add", "Alice", "-c", config_file)

    first = run("installations", "add", "Roof A", "--owner", "1", "-c", config_file)
    second = run(
        "installations",
        "add",
        "Barn B",
        "--owner",
        "1",
        "--timezone",
        "Europe/Zurich",
        "-c",
        config_file,
    )
    third = run(
        "installations",
        "add",
        "Shed C",
        "--owner",
        "1",
        "--shard",
        "shard-2",
        "-c",
        config_file,
    )

    assert first == (
        0,
        "added installation 1: Roof A (owner 1, shard shard-1, timezone UTC)\n",
        "",
    )
    assert second == (
        0,
        "added installation 2: Barn B (owner 1, shard shard-2, "
        "timezone Europe/Zurich)\n",
        "",
    )
    assert third == (
        0,
        "added installation 3: Shed C (owner 1, shard shard-2, timezone UTC)\n",
        "",
    )


def test_gateways_add_prints_token_once(
    config_file: str, collector_databases: CollectorDatabases
) -> None:
    run("owners", "add", "Alice", "-c", config_file)
    run("installations", "add", "Roof A", "--owner", "1", "-c", config_file)

    code, out, err = run(
        "gateways", "add", "gw-a", "--installation", "1", "-c", config_file
    )

    lines = out.splitlines()
    assert (code, err) == (0, "")
    assert lines[0] == "added gateway gw-a to installation 1"
    assert lines[1].startswith("token: ")
    assert lines[2] == (
        "The token is shown only once: put it in the agent's [collector] token."
    )
    token = lines[1].removeprefix("token: ")
    with psycopg.connect(collector_databases.catalog_dsn) as conn:
        stored = conn.execute("SELECT token_hash FROM gateways").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).digest()


def test_gateways_revoke(config_file: str) -> None:
    run("owners", "add", "Alice", "-c", config_file)
    run("installations", "add", "Roof A", "--owner", "1", "-c", config_file)
    run("gateways", "add", "gw-a", "--installation", "1", "-c", config_file)

    assert run("gateways", "revoke", "gw-a", "-c", config_file) == (
        0,
        "revoked gateway gw-a\n",
        "",
    )


def test_keys_add(config_file: str) -> None:
    code, out, err = run("keys", "add", "ops", "-c", config_file)

    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "added key ops"
    assert len(out.splitlines()[1].removeprefix("key: ")) == 43


ERRORS = [
    (
        ["installations", "add", "Roof", "--owner", "7"],
        "error: owner 7 not found: use the id printed by `owners add`\n",
    ),
    (
        ["gateways", "add", "gw-a", "--installation", "9"],
        "error: installation 9 not found: use the id printed by `installations add`\n",
    ),
    (
        ["gateways", "revoke", "gw-x"],
        "error: gateway 'gw-x' not found: check the gateway id\n",
    ),
    (
        ["owners", "add", "Bob", "--email", "bob"],
        "error: email 'bob' is invalid: use an address like ops@example.org\n",
    ),
]


@pytest.mark.parametrize(("args", "expected"), ERRORS)
def test_command_error_one_line(
    config_file: str, args: list[str], expected: str
) -> None:
    assert run(*args, "-c", config_file) == (2, "", expected)


def test_installation_unknown_shard(config_file: str) -> None:
    run("owners", "add", "Alice", "-c", config_file)

    assert run(
        "installations",
        "add",
        "Roof",
        "--owner",
        "1",
        "--shard",
        "shard-9",
        "--timezone",
        "Mars/Olympus",
        "-c",
        config_file,
    ) == (
        2,
        "",
        "error: timezone 'Mars/Olympus' is unknown: use an IANA name like "
        "Europe/Zurich\n",
    )
    assert run(
        "installations",
        "add",
        "Roof",
        "--owner",
        "1",
        "--shard",
        "shard-9",
        "-c",
        config_file,
    ) == (2, "", "error: shard 'shard-9' not found: use one of shard-1, shard-2\n")


def test_gateway_id_taken(config_file: str) -> None:
    run("owners", "add", "Alice", "-c", config_file)
    run("installations", "add", "Roof A", "--owner", "1", "-c", config_file)
    run("gateways", "add", "gw-a", "--installation", "1", "-c", config_file)

    assert run("gateways", "add", "gw-a", "--installation", "1", "-c", config_file) == (
        2,
        "",
        "error: gateway 'gw-a' already exists: choose another gateway id\n",
    )


def test_bad_config_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 80800\n")

    assert run("migrate", "-c", str(path)) == (
        2,
        "",
        "error: [server] port must be an integer from 0 to 65535, got 80800\n",
    )


def test_unreachable_catalog_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[database]\ncatalog = "host=127.0.0.1 port=1 dbname=c"\n'
        '[[shards]]\nname = "s1"\ndsn = "host=127.0.0.1 port=1 dbname=s"\n'
    )

    code, out, err = run("owners", "add", "Alice", "-c", str(path))

    assert (code, out) == (2, "")
    assert err.startswith(
        "error: cannot reach catalog database dbname=c "
        "host=127.0.0.1 port=1: connection failed"
    )
    assert err.count("\n") == 1


def test_help_alias() -> None:
    code, out, _ = run("gateways", "add", "-h")

    assert code == 0
    assert out.startswith("Usage: main gateways add [OPTIONS] GATEWAY_ID")


@pytest.mark.parametrize(
    ("catalog", "shard", "key"),
    [
        ("not a dsn ===", "dbname=s", "[database] catalog"),
        ("dbname=c", "garbage ===", "[shards[0]] dsn"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ("migrate",),
        ("serve",),
        ("owners", "add", "Alice"),
        ("gateways", "add", "gw-a", "--installation", "1"),
    ],
)
def test_unparsable_dsn_one_line(
    tmp_path: Path, command: tuple[str, ...], catalog: str, shard: str, key: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[database]\ncatalog = "{catalog}"\n[[shards]]\nname = "s1"\ndsn = "{shard}"\n'
    )

    assert run(*command, "-c", str(path)) == (
        2,
        "",
        f"error: {key} is not a valid PostgreSQL connection string: write key=value "
        "pairs (host=db1 dbname=solarfleet) or a postgresql:// URI\n",
    )


def test_config_not_utf8_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')

    assert run("serve", "-c", str(path)) == (
        2,
        "",
        f"error: config file {path} is not valid UTF-8 (byte 17): save it as UTF-8\n",
    )


@pytest.fixture
def catalog_role(collector_databases: CollectorDatabases) -> Iterator[str]:
    """A login role without any right on the catalog's tables, dropped after."""
    role = f"sf_test_role_{secrets.token_hex(3)}"
    with psycopg.connect(collector_databases.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    with psycopg.connect(collector_databases.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize(
    ("command", "table"),
    [
        (("owners", "add", "Alice"), "owners"),
        (("gateways", "add", "gw-a", "--installation", "1"), "installations"),
    ],
)
def test_catalog_no_rights_one_line(
    tmp_path: Path,
    collector_databases: CollectorDatabases,
    catalog_role: str,
    command: tuple[str, ...],
    table: str,
) -> None:
    dsn = make_conninfo(collector_databases.catalog_dsn, user=catalog_role)
    limited = dataclasses.replace(collector_databases, catalog_dsn=dsn)
    config = str(write_config(tmp_path / "c.toml", limited))

    assert run(*command, "-c", config) == (
        2,
        "",
        f"error: catalog database {dsn_without_password(dsn)} denied access: "
        f"permission denied for table {table}: grant the role SELECT, INSERT and "
        "UPDATE on the catalog's tables and USAGE on its sequences\n",
    )


def shard_names(catalog_dsn: str) -> list[str]:
    with psycopg.connect(catalog_dsn) as conn:
        rows = conn.execute("SELECT name FROM shards ORDER BY id").fetchall()
    return [row[0] for row in rows]


def test_migrate_missing_shard_unregistered(
    tmp_path: Path, empty_databases: CollectorDatabases
) -> None:
    missing = dsn_for(empty_databases.admin_dsn, "sf_test_no_such_database")
    ghost = ShardConfig("ghost", missing)
    dbs = dataclasses.replace(
        empty_databases, shards=(empty_databases.shards[0], ghost)
    )
    config = str(write_config(tmp_path / "c.toml", dbs))

    code, out, err = run("migrate", "-c", config)

    assert (code, out) == (2, "")
    assert err.startswith("error: cannot migrate shard database ")
    assert err.count("\n") == 1
    assert shard_names(dbs.catalog_dsn) == ["shard-1"]


@pytest.fixture
def ghost_shard(collector_databases: CollectorDatabases) -> Iterator[str]:
    """A shard registered in the catalog whose database does not exist."""
    dsn = collector_databases.catalog_dsn
    missing = dsn_for(collector_databases.admin_dsn, "sf_test_no_such_database")
    catalog.register_shard(dsn, "ghost", missing)
    yield "ghost"
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM shards WHERE name = 'ghost'")


def test_installation_skips_unready_shard(
    tmp_path: Path, collector_databases: CollectorDatabases, ghost_shard: str
) -> None:
    config = str(write_config(tmp_path / "c.toml", collector_databases))
    run("owners", "add", "Alice", "-c", config)
    run("installations", "add", "Roof A", "--owner", "1", "-c", config)
    run("installations", "add", "Roof B", "--owner", "1", "-c", config)

    third = run("installations", "add", "Roof C", "--owner", "1", "-c", config)
    named = run(
        "installations", "add", "Roof D", "--owner", "1", "--shard", "ghost",
        "-c", config,
    )

    assert third == (
        0,
        "added installation 3: Roof C (owner 1, shard shard-1, timezone UTC)\n",
        "",
    )
    assert named == (
        2,
        "",
        "error: shard 'ghost' is not in the config, not reachable or not migrated: "
        "run `solarfleet-collector migrate` and check its dsn\n",
    )


@pytest.mark.parametrize("host", ["999.1.1.1", "192.0.2.1"])
def test_serve_bad_host_named(config_file: str, host: str) -> None:
    config = Path(config_file)
    config.write_text(f'[server]\nhost = "{host}"\nport = 0\n' + config.read_text())

    code, out, err = run("serve", "-c", str(config))

    assert (code, out) == (2, "")
    assert err.startswith(f"error: cannot listen on {host}:0: ")
    assert err.endswith(
        f": set [server] host to an address of this machine, not {host!r}\n"
    )


def test_cli_skips_pgserver_import() -> None:
    code = "import sys, collector.cli; print('pgserver' in sys.modules)"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout == "False\n"
    assert "XDG_RUNTIME_DIR" not in result.stderr
