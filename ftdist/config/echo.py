"""A user's value quoted in a message: bounded (a value can be any size) and with the credentials
in its URLs redacted."""

from __future__ import annotations

from typing import Any

from ftdist.config.redact import redact_url

MAX_ECHO_CHARS = 200  # of a user's value quoted in a message


def echo(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """repr(value) for a message, cut to `limit` characters (a user's value can be any size)
    and with credentials in URLs redacted."""
    return redact_url(_bounded_repr(value, limit))


def _bounded_repr(value: Any, limit: int) -> str:
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:  # no repr of a huge container
        return f"<a {type(value).__name__} of {len(value)} items>"
    if isinstance(value, str) and len(value) > min(limit, 80):  # cut, with the length it had
        return f"{value[:50]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except RecursionError:  # a structure that contains itself
        return f"<a {type(value).__name__} that contains itself>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
