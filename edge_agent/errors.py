"""Exceptions of the edge agent. The CLI turns each into one line naming the fix."""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration or a device profile is invalid; the message names key and fix."""


class BufferFileError(AgentError):
    """The SQLite buffer file cannot be opened, or its schema is newer than this agent."""


class CollectorUnavailable(AgentError):
    """The collector could not take a batch now: no connection, a timeout or a 5xx reply.

    The batch stays in the buffer and is sent again later with the same batch id.
    """


class StatusError(AgentError):
    """The agent's status cannot be read or published; the message names the fix."""
