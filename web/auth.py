"""Who may use the gateway: a shared secret token, shown either as a bearer token
(`Authorization: Bearer <token>`, what WHEP players send) or as a signed URL whose query
carries an expiry and an HMAC of it (`?exp=<unix s>&sig=<hex>`), to hand a viewer a link
that stops working without handing out the token.

The signature is HMAC-SHA256 over ``avatard-web:<exp>`` keyed with the token; the expiry
is a Unix time (wall clock, since the link is made on one machine and checked on
another). Comparisons are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Mapping

MIN_TOKEN_CHARS = 16  # shorter secrets are guessable; `openssl rand -hex 32` gives 64
SIGNATURE_CONTEXT = "avatard-web:"


class AuthError(Exception):
    """A request without valid credentials; `str()` says what was wrong."""


def check_token(token: str) -> str:
    """The token, stripped; raises `ValueError` when shorter than `MIN_TOKEN_CHARS`."""
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"the token has {len(token)} characters; at least "
            f"{MIN_TOKEN_CHARS} are required (e.g. `openssl rand -hex 32`)"
        )
    return token


def sign(token: str, expires_unix_s: int) -> str:
    """The hex signature of a URL valid until `expires_unix_s` (seconds since the epoch)."""
    message = f"{SIGNATURE_CONTEXT}{expires_unix_s}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def signed_query(token: str, valid_for_s: int, now_s: float | None = None) -> str:
    """``exp=...&sig=...`` for a URL valid for `valid_for_s` seconds from now."""
    expires = int((time.time() if now_s is None else now_s) + valid_for_s)
    return f"exp={expires}&sig={sign(token, expires)}"


def authorize(
    token: str, headers: Mapping[str, str], query: Mapping[str, str], now_s: float | None = None
) -> None:
    """Accept a request carrying the bearer `token` or a valid signed query; else raise
    `AuthError` saying which credential was missing, wrong or expired."""
    header = headers.get("Authorization", "")
    if header:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError("Authorization: only the Bearer scheme is accepted")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise AuthError("Authorization: the bearer token is wrong")
        return
    exp, sig = query.get("exp"), query.get("sig")
    if exp is None and sig is None:
        raise AuthError(
            "this gateway needs a token: send `Authorization: Bearer <token>` "
            "or use a signed URL (`exp` and `sig` query parameters)"
        )
    if not exp or not sig or not exp.isdigit():
        raise AuthError("exp, sig: a signed URL needs both, exp in Unix seconds")
    if not hmac.compare_digest(sig.encode(), sign(token, int(exp)).encode()):
        raise AuthError("sig: the URL's signature is wrong")
    if int(exp) < (time.time() if now_s is None else now_s):
        raise AuthError(f"exp: the signed URL expired at {exp} (Unix seconds)")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) resolves to loopback addresses only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
