"""Which outbound proxy a request to upstream goes through: `upstream.proxy` when set, else the
HTTPS_PROXY / HTTP_PROXY / NO_PROXY environment (as curl and cargo read it), read once at start and
decided once per scheme and host. aiohttp's `trust_env` would re-read the whole environment (and
~/.netrc, a source of credentials nobody configured here) on every request: about a tenth of the CPU
an index miss costs."""

from __future__ import annotations

import urllib.request

from yarl import URL

MEMO_LIMIT = 1024  # distinct (scheme, host) pairs remembered; a registry talks to two or three


class ProxyChoice:
    def __init__(self, configured: str | None) -> None:
        self.configured = configured
        self._environment = urllib.request.getproxies_environment() if configured is None else {}
        self._memo: dict[tuple[str, str], str | None] = {}

    def for_url(self, url: URL) -> str | None:
        if self.configured is not None:
            return self.configured
        host = url.raw_host or ""
        key = (url.scheme, host)
        if key not in self._memo:
            proxy = self._environment.get(url.scheme)
            if proxy is not None and bypassed(host, self._environment.get("no", "")):
                proxy = None
            if len(self._memo) >= MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = proxy
        return self._memo[key]


def bypassed(host: str, no_proxy: str) -> bool:
    """NO_PROXY as curl reads it: `*`, or comma-separated names that match the host or a domain it is
    in (a leading dot optional); case does not matter."""
    host = host.lower().strip("[]")
    for entry in no_proxy.lower().split(","):
        name = entry.strip().lstrip(".")
        if name == "*":
            return True
        if name and (host == name or host.endswith("." + name)):
            return True
    return False
