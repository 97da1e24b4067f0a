"""The unknown-name budget at the HTTP edge: charge before a request may go upstream for a client,
give the token back when the name exists, answer 429 with Retry-After when the client has none."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from cratemirror.cache.index import IndexService
from cratemirror.http.clients import client_address
from cratemirror.http.context import MIRROR
from cratemirror.http.responses import error
from cratemirror.names import CrateName


@dataclass(frozen=True, slots=True)
class Charge:
    client: str  # "" when nothing was taken
    taken: bool  # False: answered from the cache, nothing was charged

    async def settle(self, request: web.Request, found: bool) -> None:
        """The name existed: its token comes back (a cold build of real names costs nothing)."""
        if self.taken and found:
            await request.app[MIRROR].unknown_names.refund(self.client)


async def charge(
    request: web.Request, index: IndexService, crate: CrateName, *, always: bool = False
) -> Charge | web.Response:
    """A Charge, or the 429 to send: taken before the lookup, so concurrent lookups cannot overdraw.
    `always`: the request goes upstream whatever the cache holds (a refresh)."""
    if not always and index.answers_from_cache(crate):
        return Charge("", taken=False)
    client = client_address(request)
    wait = await request.app[MIRROR].unknown_names.take(client)
    if wait is None:
        return Charge(client, taken=True)
    return error(
        429, f"too many lookups of crates the mirror does not hold from {client}; retry in {wait}s",
        headers={"Retry-After": str(wait)},
    )  # fmt: skip
