"""Exceptions a user can act on. The CLI prints their message and exits non-zero."""


class PoisongridError(Exception):
    """Base class: the message alone must tell the user what to fix."""


class ConfigError(PoisongridError):
    """A configuration key holds a value that is not allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {value!r} is not valid: allowed {allowed}")


class DatasetError(PoisongridError):
    """A dataset is missing or not in the on-disk layout its loader expects."""


class ArtifactError(PoisongridError):
    """An input artifact is truncated, foreign or inconsistent with the others."""
