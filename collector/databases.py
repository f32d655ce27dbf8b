"""Server-level PostgreSQL operations: connection strings, create and drop databases."""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from collector.errors import DatabaseError

logger = logging.getLogger(__name__)


def dsn_for(dsn: str, dbname: str) -> str:
    """Return `dsn` with its database name replaced by `dbname`."""
    return make_conninfo(dsn, dbname=dbname)


def dsn_without_password(dsn: str) -> str:
    """Return `dsn` with any password removed, safe to store and to log."""
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    return make_conninfo("", **params)


def dbname_of(dsn: str) -> str:
    """Return the database name a connection string names."""
    return str(conninfo_to_dict(dsn).get("dbname", ""))


def create_database(admin_dsn: str, name: str) -> bool:
    """Create database `name` unless it exists; return True if it was created.

    :raises DatabaseError: the server cannot be reached or refuses the database.
    """
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if found:
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.DuplicateDatabase:
        return False  # created by a concurrent caller between the check and CREATE
    except psycopg.Error as err:
        raise DatabaseError(
            f"cannot create database {name!r} on {dsn_without_password(admin_dsn)}: "
            f"{_first_line(err)}"
        ) from err
    logger.info("created database %s", name)
    return True


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database `name` if it exists, ending every session connected to it first.

    :raises DatabaseError: the server cannot be reached or refuses the drop.
    """
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(name)
    )
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(statement)
    except psycopg.Error as err:
        raise DatabaseError(
            f"cannot drop database {name!r}: {_first_line(err)}"
        ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
