"""The catalog: owners, installations, gateways, read API keys and the shard map.

Administrative functions are synchronous and take the catalog's connection string. The
collector's request path uses `Authenticator`, which looks tokens up asynchronously and
caches each result for a short time.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import zoneinfo
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from collector.databases import dsn_without_password
from collector.errors import AlreadyExists, CollectorError, DatabaseError, NotFound
from collector.outage import Outage

logger = logging.getLogger(__name__)

_MAX_NAME = 200
_MAX_CACHED = 10_000


@dataclass(frozen=True, slots=True)
class Owner:
    id: int
    name: str
    organization: str | None
    email: str | None


@dataclass(frozen=True, slots=True)
class Installation:
    id: int
    owner_id: int
    name: str
    timezone: str
    shard_id: int
    shard: str


@dataclass(frozen=True, slots=True)
class Gateway:
    id: int
    gateway_id: str
    installation_id: int
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Key:
    """A read API key: an owner key with `owner_id`, an operator key without."""

    id: int
    name: str
    created_at: datetime
    owner_id: int | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """Identity of a valid read API key; `owner_id` is None for an operator key."""

    name: str
    owner_id: int | None

    def may_read(self, installation: Installation) -> bool:
        """True if this key may read `installation`."""
        return self.owner_id is None or self.owner_id == installation.owner_id


@dataclass(frozen=True, slots=True)
class Shard:
    id: int
    name: str
    dsn: str


@dataclass(frozen=True, slots=True)
class GatewayIdentity:
    """Identity of a valid gateway token: its gateway, installation and shard."""

    gateway_id: str
    installation_id: int
    shard: str


def hash_secret(secret: str) -> bytes:
    """Return the SHA-256 digest under which a token or key is stored."""
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    """Return a new random token: 32 random bytes, URL-safe base64."""
    return secrets.token_urlsafe(32)


@contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """Connect to the catalog, translating connection and missing-schema errors."""
    label = dsn_without_password(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            yield conn
    except psycopg.errors.UndefinedTable as err:
        raise DatabaseError(
            f"catalog database {label} has no schema: run `solarfleet-collector "
            "migrate` with the same --config (or SOLARFLEET_COLLECTOR_CONFIG)"
        ) from err
    except psycopg.OperationalError as err:
        first_line = (str(err).strip().splitlines() or ["connection failed"])[0]
        raise DatabaseError(
            f"cannot reach catalog database {label}: {first_line}"
        ) from err
    except psycopg.errors.InsufficientPrivilege as err:
        raise DatabaseError(
            f"catalog database {label} denied access: {_first_line(err)}: grant the "
            "role SELECT, INSERT and UPDATE on the catalog's tables and USAGE on "
            "its sequences"
        ) from err
    except psycopg.IntegrityError:
        raise  # the caller turns a unique violation into AlreadyExists
    except psycopg.Error as err:
        raise DatabaseError(
            f"catalog database {label} failed: {_first_line(err)}"
        ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_name(kind: str, name: str) -> str:
    name = name.strip()
    if not name or len(name) > _MAX_NAME:
        raise CollectorError(
            f"{kind} name {name!r} is invalid: use 1-{_MAX_NAME} characters"
        )
    return name


def add_owner(
    dsn: str, name: str, organization: str | None = None, email: str | None = None
) -> Owner:
    """Add an owner of installations."""
    name = _check_name("owner", name)
    if email is not None and "@" not in email:
        raise CollectorError(
            f"email {email!r} is invalid: use an address like ops@example.org"
        )
    with _connect(dsn) as conn, conn.cursor(row_factory=class_row(Owner)) as cur:
        cur.execute(
            "INSERT INTO owners (name, organization, email) VALUES (%s, %s, %s) "
            "RETURNING id, name, organization, email",
            (name, organization, email),
        )
        owner = cur.fetchone()
    assert owner is not None
    return owner


def add_installation(
    dsn: str,
    name: str,
    owner_id: int,
    shard: str | None = None,
    timezone: str = "UTC",
    ready_shards: Collection[str] | None = None,
) -> Installation:
    """Add an installation on shard `shard`, or on the shard with fewest installations.

    With `ready_shards`, only those registered shards may take the installation: the
    caller passes the configured shards that are migrated.

    :raises NotFound: the owner or the named shard does not exist or is not ready.
    """
    name = _check_name("installation", name)
    _check_timezone(timezone)
    with _connect(dsn) as conn:
        if (
            conn.execute("SELECT 1 FROM owners WHERE id = %s", (owner_id,)).fetchone()
            is None
        ):
            raise NotFound(
                f"owner {owner_id} not found: use the id printed by `owners add`"
            )
        shard_id, shard_name = _pick_shard(conn, shard, ready_shards)
        row = conn.execute(
            "INSERT INTO installations (owner_id, name, timezone, shard_id) "
            "VALUES (%s, %s, %s, %s) RETURNING id",
            (owner_id, name, timezone, shard_id),
        ).fetchone()
    assert row is not None
    return Installation(row[0], owner_id, name, timezone, shard_id, shard_name)


def _check_timezone(timezone: str) -> None:
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
        raise CollectorError(
            f"timezone {timezone!r} is unknown: use an IANA name like Europe/Zurich"
        ) from err


def _pick_shard(
    conn: psycopg.Connection[Any], name: str | None, ready: Collection[str] | None
) -> tuple[int, str]:
    rows = conn.execute(
        "SELECT s.id, s.name FROM shards s "
        "LEFT JOIN installations i ON i.shard_id = s.id "
        "GROUP BY s.id ORDER BY count(i.id), s.id"
    ).fetchall()
    usable = [row for row in rows if ready is None or row[1] in ready]
    if name is not None and any(row[1] == name for row in rows):
        rows = [row for row in usable if row[1] == name]
        if not rows:
            raise NotFound(
                f"shard {name!r} is not in the config, not reachable or not "
                "migrated: run `solarfleet-collector migrate` and check its dsn"
            )
        return rows[0][0], rows[0][1]
    if name is not None:
        known = ", ".join(sorted(row[1] for row in rows))
        raise NotFound(f"shard {name!r} not found: use one of {known}")
    if not usable:
        raise NotFound(
            "no migrated shard is reachable: run `solarfleet-collector migrate` "
            "first and check the [[shards]] dsn values"
        )
    return usable[0][0], usable[0][1]


def add_gateway(dsn: str, gateway_id: str, installation_id: int) -> tuple[Gateway, str]:
    """Add a gateway to an installation and return it with its new token.

    The token is returned only here: the catalog keeps its SHA-256 digest.

    :raises NotFound: the installation does not exist.
    :raises AlreadyExists: the gateway id is taken, also by a revoked gateway.
    """
    gateway_id = _check_name("gateway", gateway_id)
    token = new_secret()
    with _connect(dsn) as conn:
        found = conn.execute(
            "SELECT 1 FROM installations WHERE id = %s", (installation_id,)
        ).fetchone()
        if found is None:
            raise NotFound(
                f"installation {installation_id} not found: "
                "use the id printed by `installations add`"
            )
        try:
            with conn.cursor(row_factory=class_row(Gateway)) as cur:
                cur.execute(
                    "INSERT INTO gateways (gateway_id, installation_id, token_hash) "
                    "VALUES (%s, %s, %s) "
                    "RETURNING id, gateway_id, installation_id, created_at, revoked_at",
                    (gateway_id, installation_id, hash_secret(token)),
                )
                gateway = cur.fetchone()
        except psycopg.errors.UniqueViolation as err:
            raise AlreadyExists(
                f"gateway {gateway_id!r} already exists: choose another gateway id"
            ) from err
    assert gateway is not None
    return gateway, token


def revoke_gateway(dsn: str, gateway_id: str) -> Gateway:
    """Revoke a gateway's token; the collector rejects it within its auth cache time.

    :raises NotFound: no gateway has this id.
    """
    with _connect(dsn) as conn, conn.cursor(row_factory=class_row(Gateway)) as cur:
        cur.execute(
            "UPDATE gateways SET revoked_at = coalesce(revoked_at, now()) "
            "WHERE gateway_id = %s "
            "RETURNING id, gateway_id, installation_id, created_at, revoked_at",
            (gateway_id,),
        )
        gateway = cur.fetchone()
    if gateway is None:
        raise NotFound(f"gateway {gateway_id!r} not found: check the gateway id")
    return gateway


_KEY_COLUMNS = "id, name, created_at, owner_id, revoked_at"


def add_key(dsn: str, name: str, owner_id: int | None = None) -> tuple[Key, str]:
    """Add a read API key and return it with its secret, shown only here.

    With `owner_id` the key reads only that owner's installations; without, it is an
    operator key that reads the whole fleet.

    :raises NotFound: the owner does not exist.
    :raises AlreadyExists: a key with this name exists, also a revoked one.
    """
    name = _check_name("key", name)
    secret = new_secret()
    try:
        with _connect(dsn) as conn, conn.cursor(row_factory=class_row(Key)) as cur:
            if owner_id is not None:
                _check_owner(conn, owner_id)
            cur.execute(
                "INSERT INTO keys (name, key_hash, owner_id) VALUES (%s, %s, %s) "
                f"RETURNING {_KEY_COLUMNS}",
                (name, hash_secret(secret), owner_id),
            )
            key = cur.fetchone()
    except psycopg.errors.UniqueViolation as err:
        raise AlreadyExists(
            f"key {name!r} already exists: choose another name"
        ) from err
    assert key is not None
    return key, secret


def _check_owner(conn: psycopg.Connection[Any], owner_id: int) -> None:
    if conn.execute("SELECT 1 FROM owners WHERE id = %s", (owner_id,)).fetchone():
        return
    raise NotFound(f"owner {owner_id} not found: use the id printed by `owners add`")


def revoke_key(dsn: str, name: str) -> Key:
    """Revoke a read API key; the collector rejects it within its auth cache time.

    :raises NotFound: no key has this name.
    """
    with _connect(dsn) as conn, conn.cursor(row_factory=class_row(Key)) as cur:
        cur.execute(
            "UPDATE keys SET revoked_at = coalesce(revoked_at, now()) "
            f"WHERE name = %s RETURNING {_KEY_COLUMNS}",
            (name,),
        )
        key = cur.fetchone()
    if key is None:
        raise NotFound(f"key {name!r} not found: see `keys list` for the names")
    return key


def list_keys(dsn: str) -> list[Key]:
    """Return every read API key, revoked ones included, ordered by name."""
    with _connect(dsn) as conn, conn.cursor(row_factory=class_row(Key)) as cur:
        cur.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY name")
        return cur.fetchall()


def register_shard(dsn: str, name: str, shard_dsn: str) -> Shard:
    """Add shard `name` to the shard map, or update its recorded connection string."""
    with _connect(dsn) as conn, conn.cursor(row_factory=class_row(Shard)) as cur:
        cur.execute(
            "INSERT INTO shards (name, dsn) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET dsn = EXCLUDED.dsn "
            "RETURNING id, name, dsn",
            (name, shard_dsn),
        )
        shard = cur.fetchone()
    assert shard is not None
    return shard


class Authenticator:
    """Look up gateway tokens, operator keys and installations in the catalog.

    Each result, found or not, is cached for `ttl` seconds, so a revoked token keeps
    working for at most that long.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[tuple[str, Any], tuple[float, Any]] = {}
        self._outage = Outage(logger, "catalog database")

    async def gateway(self, token: str) -> GatewayIdentity | None:
        """Return who the gateway token belongs to, or None if unknown or revoked."""
        return await self._cached(("gateway", hash_secret(token)), self._fetch_gateway)

    async def key(self, secret: str) -> KeyIdentity | None:
        """Return who the read API key belongs to, or None if unknown or revoked."""
        return await self._cached(("key", hash_secret(secret)), self._fetch_key)

    async def installation(self, installation_id: int) -> Installation | None:
        """Return the installation with its shard name, or None if unknown."""
        return await self._cached(
            ("installation-record", installation_id), self._fetch_installation
        )

    async def installations(self, owner_id: int | None) -> list[Installation]:
        """Return the installations of `owner_id`, or of every owner if None.

        Not cached, so a new installation is listed at once.
        """
        return await self._query(self._fetch_installations, owner_id)

    async def installation_shard(self, installation_id: int) -> str | None:
        """Return the name of the shard holding the installation, or None if unknown."""
        return await self._cached(("installation", installation_id), self._fetch_shard)

    async def _cached(self, key: tuple[str, Any], fetch: Callable[[Any], Any]) -> Any:
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        value = await self._query(fetch, key[1])
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now, value)
        return value

    async def _query(self, fetch: Callable[[Any], Any], argument: Any) -> Any:
        try:
            value = await fetch(argument)
        except psycopg.Error as err:  # PoolTimeout included
            self._outage.failed(err)
            raise DatabaseError("catalog database is unavailable, retry later") from err
        self._outage.recovered()
        return value

    async def _fetch_gateway(self, token_hash: bytes) -> GatewayIdentity | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT g.gateway_id, g.installation_id, s.name FROM gateways g "
                "JOIN installations i ON i.id = g.installation_id "
                "JOIN shards s ON s.id = i.shard_id "
                "WHERE g.token_hash = %s AND g.revoked_at IS NULL",
                (token_hash,),
            )
            row = await cur.fetchone()
        return GatewayIdentity(*row) if row else None

    async def _fetch_key(self, key_hash: bytes) -> KeyIdentity | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT name, owner_id FROM keys "
                "WHERE key_hash = %s AND revoked_at IS NULL",
                (key_hash,),
            )
            row = await cur.fetchone()
        return KeyIdentity(*row) if row else None

    async def _fetch_installation(self, installation_id: int) -> Installation | None:
        found = await self._fetch_installations(None, installation_id)
        return found[0] if found else None

    async def _fetch_installations(
        self, owner_id: int | None, installation_id: int | None = None
    ) -> list[Installation]:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=class_row(Installation))
            await cur.execute(
                "SELECT i.id, i.owner_id, i.name, i.timezone, i.shard_id, "
                "s.name AS shard FROM installations i "
                "JOIN shards s ON s.id = i.shard_id "
                "WHERE (%(owner)s::bigint IS NULL OR i.owner_id = %(owner)s) "
                "AND (%(id)s::bigint IS NULL OR i.id = %(id)s) ORDER BY i.id",
                {"owner": owner_id, "id": installation_id},
            )
            return await cur.fetchall()

    async def _fetch_shard(self, installation_id: int) -> str | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT s.name FROM installations i JOIN shards s ON s.id = i.shard_id "
                "WHERE i.id = %s",
                (installation_id,),
            )
            row = await cur.fetchone()
        return row[0] if row else None
