"""Keep credentials out of everything a client or a log reader sees.

Upstream URLs may carry `user:token@` userinfo or a token in the query string (presigned URLs,
`?access_token=`), and error texts from the HTTP client quote URLs verbatim. Every error body, status
page value and log line passes through `redact`, so a secret never leaves the process by accident.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact", "split_userinfo"]

MASK = "***"

# scheme://userinfo@  — userinfo never contains '/', '@' or white space.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@")
# A query parameter whose name says it is a secret: token, key, signature, password, X-Amz-Credential...
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:[\w.-]*(?:token|key|secret|sig|signature|password|passwd|pwd|auth|credential|session)"
    r"[\w.-]*))=[^&#\s\"'<>]*",
    re.IGNORECASE,
)
# "Authorization: <anything>" or "Bearer <token>" in free text (an echoed request, a client error).
_AUTH_VALUE = re.compile(
    r"(?P<name>\b(?:authorization|proxy-authorization)\b\s*[:=]\s*)[^\s,;]+(?:\s+[^\s,;]+)?", re.IGNORECASE
)
_BEARER = re.compile(r"(?P<name>\bbearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with userinfo, secret-looking query values and Authorization values masked."""
    if "://" in text:
        text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    if "=" in text:
        text = _SECRET_PARAM.sub(rf"\g<name>={MASK}", text)
    if "uthorization" in text or "earer" in text:
        text = _AUTH_VALUE.sub(rf"\g<name>{MASK}", text)
        text = _BEARER.sub(rf"\g<name>{MASK}", text)
    return text


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(url without userinfo, (user, password) or None). The credentials go into an Authorization
    header for that origin only; the URL kept for messages and requests no longer carries them."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, (unquote(parts.username or ""), unquote(parts.password or ""))
