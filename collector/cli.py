"""The `solarfleet-collector` command: thin click commands over the collector."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

import click
from aiohttp import web

from collector import catalog, config as config_module, migrate
from edge_agent.service import (
    Notifier,
    Progress,
    configure_logging,
    run_watchdog,
    watchdog_interval,
)
from collector.app import create_app
from collector.config import CollectorConfig
from collector.errors import CollectorError

logger = logging.getLogger(__name__)

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
CONFIG_ENV = "SOLARFLEET_COLLECTOR_CONFIG"

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    show_envvar=True,
    help="Collector TOML config. Without one, an embedded PostgreSQL is used.",
)


class _Group(click.Group):
    """Turn every CollectorError into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CollectorError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


def _load(config_path: Path | None) -> CollectorConfig:
    return config_module.load(config_path) if config_path else CollectorConfig()


def _catalog_dsn(config_path: Path | None) -> tuple[str, migrate.Databases]:
    dbs = migrate.open_databases(_load(config_path).database)
    return dbs.catalog_dsn, dbs


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def main(verbose: bool) -> None:
    """Receive readings from solarfleet gateways, store them in sharded PostgreSQL."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # pgserver logs every command it runs, with its whole output, at info level.
        logging.getLogger("pgserver").setLevel(logging.WARNING)


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Serve the ingest and read API until SIGTERM or SIGINT.

    Example: solarfleet-collector serve --config /etc/solarfleet/collector.toml
    """
    config = _load(config_path)
    asyncio.run(_serve(config))


async def _serve(config: CollectorConfig) -> None:
    runner = web.AppRunner(create_app(config), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise CollectorError(_listen_error(config, err)) from err
    # The bound port, which the system picks when the config sets port 0.
    host, port = runner.addresses[0][:2]
    logger.info("listening on http://%s:%s", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier.from_environ()
    notifier.send("READY=1", f"STATUS=listening on http://{host}:{port}")
    watchdog = _start_watchdog(notifier, stop)
    await stop.wait()

    logger.info("stopping")
    notifier.send("STOPPING=1")
    if watchdog is not None:
        await watchdog
    await runner.cleanup()
    notifier.close()
    logger.info("stopped")


def _start_watchdog(notifier: Notifier, stop: asyncio.Event) -> asyncio.Task[None] | None:
    """Ping systemd's watchdog at half its timeout while the event loop keeps running.

    Every request is served on this loop, so a blocked loop stops the pings and systemd
    restarts the collector. A shard that is down does not stop them: its installations
    get 503s while the others are served.
    """
    timeout = watchdog_interval()
    if timeout is None or not notifier.enabled:
        return None
    return asyncio.create_task(
        run_watchdog(notifier, Progress(), timeout / 2, stop), name="watchdog"
    )


def _listen_error(config: CollectorConfig, err: OSError) -> str:
    host, port = config.server.host, config.server.port
    address_fault = isinstance(err, socket.gaierror) or err.errno in (
        errno.EADDRNOTAVAIL,
        errno.EINVAL,
    )
    fix = (
        f"set [server] host to an address of this machine, not {host!r}"
        if address_fault
        else f"set another [server] port than {port}"
    )
    return f"cannot listen on {host}:{port}: {err.strerror}: {fix}"


@main.command("migrate")
@config_option
def migrate_command(config_path: Path | None) -> None:
    """Create or upgrade the schema of the catalog and every shard.

    Example: solarfleet-collector migrate --config /etc/solarfleet/collector.toml
    """
    dbs = migrate.open_databases(_load(config_path).database)
    try:
        applied = migrate.migrate_all(dbs)
    finally:
        dbs.close()
    for database, migrations in applied.items():
        labels = ", ".join(m.label for m in migrations) or "up to date"
        click.echo(f"{database}: {labels}")


@main.group()
def owners() -> None:
    """Manage owners of installations."""


@owners.command("add")
@click.argument("name")
@click.option("--organization", help="Company or organisation of the owner.")
@click.option("--email", help="Contact address of the owner.")
@config_option
def owners_add(
    name: str, organization: str | None, email: str | None, config_path: Path | None
) -> None:
    """Add an owner and print its id.

    Example: solarfleet-collector owners add "Alice Meyer" --email alice@example.org
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        owner = catalog.add_owner(dsn, name, organization, email)
    finally:
        dbs.close()
    click.echo(f"added owner {owner.id}: {owner.name}")


@main.group()
def installations() -> None:
    """Manage installations (sites)."""


@installations.command("add")
@click.argument("name")
@click.option("--owner", "owner_id", type=int, required=True, help="Id of the owner.")
@click.option(
    "--shard", help="Shard name. Default: the shard with fewest installations."
)
@click.option(
    "--timezone",
    default="UTC",
    show_default=True,
    help="IANA time zone of the site, for daily energy.",
)
@config_option
def installations_add(
    name: str, owner_id: int, shard: str | None, timezone: str, config_path: Path | None
) -> None:
    """Add an installation and print its id and shard.

    Example: solarfleet-collector installations add "Roof A" --owner 1
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        ready = [s.name for s in dbs.shards if migrate.is_migrated(s.dsn, "shard")]
        inst = catalog.add_installation(dsn, name, owner_id, shard, timezone, ready)
    finally:
        dbs.close()
    click.echo(
        f"added installation {inst.id}: {inst.name} "
        f"(owner {inst.owner_id}, shard {inst.shard}, timezone {inst.timezone})"
    )


@main.group()
def gateways() -> None:
    """Manage gateways and their tokens."""


@gateways.command("add")
@click.argument("gateway_id")
@click.option(
    "--installation",
    "installation_id",
    type=int,
    required=True,
    help="Id of the installation the gateway sends data for.",
)
@config_option
def gateways_add(
    gateway_id: str, installation_id: int, config_path: Path | None
) -> None:
    """Add a gateway and print its token, which is shown only this once.

    Example: solarfleet-collector gateways add gw-site-a --installation 1
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        gateway, token = catalog.add_gateway(dsn, gateway_id, installation_id)
    finally:
        dbs.close()
    click.echo(
        f"added gateway {gateway.gateway_id} to installation {gateway.installation_id}"
    )
    click.echo(f"token: {token}")
    click.echo("The token is shown only once: put it in the agent's [collector] token.")


@gateways.command("revoke")
@click.argument("gateway_id")
@config_option
def gateways_revoke(gateway_id: str, config_path: Path | None) -> None:
    """Revoke a gateway's token.

    Example: solarfleet-collector gateways revoke gw-site-a
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        gateway = catalog.revoke_gateway(dsn, gateway_id)
    finally:
        dbs.close()
    click.echo(f"revoked gateway {gateway.gateway_id}")


@main.group()
def keys() -> None:
    """Manage API keys for the read API: operator keys and owner keys."""


@keys.command("add")
@click.argument("name")
@click.option(
    "--owner",
    "owner_id",
    type=int,
    help="Id of the owner whose installations the key may read. "
    "Default: an operator key that reads the whole fleet.",
)
@config_option
def keys_add(name: str, owner_id: int | None, config_path: Path | None) -> None:
    """Add a read API key and print it, which is shown only this once.

    Example: solarfleet-collector keys add ops-dashboard
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        key, secret = catalog.add_key(dsn, name, owner_id)
    finally:
        dbs.close()
    scope = "operator, whole fleet" if owner_id is None else f"owner {owner_id}"
    click.echo(f"added key {key.name}")
    click.echo(f"key: {secret}")
    click.echo(f"scope: {scope}")
    click.echo("The key is shown only once: send it as Authorization: Bearer <key>.")


@keys.command("revoke")
@click.argument("name")
@config_option
def keys_revoke(name: str, config_path: Path | None) -> None:
    """Revoke a read API key.

    Example: solarfleet-collector keys revoke ops-dashboard
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        key = catalog.revoke_key(dsn, name)
    finally:
        dbs.close()
    click.echo(f"revoked key {key.name}")


@keys.command("list")
@config_option
def keys_list(config_path: Path | None) -> None:
    """List the read API keys: name, scope, creation and revocation time.

    Example: solarfleet-collector keys list
    """
    dsn, dbs = _catalog_dsn(config_path)
    try:
        found = catalog.list_keys(dsn)
    finally:
        dbs.close()
    for key in found:
        scope = "operator" if key.owner_id is None else f"owner {key.owner_id}"
        revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else ""
        created = f"created {key.created_at:%Y-%m-%d %H:%M}"
        click.echo(f"{key.name}\t{scope}\t{created}\t{revoked}".rstrip())
