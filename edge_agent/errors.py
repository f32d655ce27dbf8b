"""Exceptions of the edge agent. The CLI turns each into one line naming the fix."""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration or a device profile is invalid; the message names key and fix."""
