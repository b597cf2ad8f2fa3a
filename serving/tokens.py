"""Bearer tokens (RFC 6750), read and written the same way by gRPC, REST and the client."""

from __future__ import annotations

import hmac

SCHEME = "Bearer"
HEADER = "authorization"  # gRPC metadata keys are lower case; HTTP's header names are not cased


def header_value(token: str) -> str:
    """What a client sends: `Bearer <token>`."""
    return f"{SCHEME} {token}"


def parse(value: str | bytes | None) -> bytes | None:
    """The token of an `authorization` value, or None when it is missing, empty or of another
    scheme. The scheme's name is case-insensitive (RFC 7235)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME.lower() or not token:
        return None
    return token.encode("latin-1", "replace")


def matches(value: str | bytes | None, expected: bytes) -> bool:
    """Whether an `authorization` value carries `expected`, compared in constant time (the
    comparison takes as long wherever the first difference is)."""
    given = parse(value)
    return given is not None and hmac.compare_digest(given, expected)
