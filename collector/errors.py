"""Exceptions of the collector. The CLI and the HTTP API turn each into one line."""


class CollectorError(Exception):
    """Base of every error the collector raises on purpose."""


class ConfigError(CollectorError):
    """The configuration is invalid; the message names the key and the fix."""


class DatabaseError(CollectorError):
    """A database cannot be reached, created or migrated."""


class NotFound(CollectorError):
    """An owner, installation, gateway, key or shard does not exist."""


class AlreadyExists(CollectorError):
    """A gateway id, key name or shard name is already taken."""


class ShardUnavailable(CollectorError):
    """A shard database cannot be reached; only its installations are affected."""


class BatchRejected(CollectorError):
    """A batch is malformed (400) or too large (413); nothing of it is stored."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
