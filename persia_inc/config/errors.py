"""The one error a configuration raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file that cannot be used; names the file and the key."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
