"""Exceptions a user can act on. The CLI prints their message and exits non-zero."""


class PoisongridError(Exception):
    """Base class: the message alone must tell the user what to fix."""


class ConfigError(PoisongridError):
    """A configuration key holds a value that is not allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {short_repr(value)} is not valid: allowed {allowed}")


def short_repr(value, limit: int = 120) -> str:
    """A value as an error message shows it: one line, at most `limit` characters (a huge list or
    mapping never floods the terminal)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 8, 8, 3
    text = " ".join(r.repr(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def did_you_mean(value, names) -> str:
    """' (did you mean 'x'?)' for the nearest of `names` to a mistyped value, else ''."""
    import difflib

    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(n) for n in names], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class DatasetError(PoisongridError):
    """A dataset is missing or not in the on-disk layout its loader expects."""


class ArtifactError(PoisongridError):
    """An input artifact is truncated, foreign or inconsistent with the others."""
