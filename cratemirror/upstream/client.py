"""The upstream registry client: one ClientSession, per-attempt timeouts, retries with backoff, health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

import aiohttp
from yarl import URL

from cratemirror import PROJECT_URL, __version__
from cratemirror.conditions import LastingCondition
from cratemirror.config.schema import UpstreamConfig
from cratemirror.metrics import Metrics
from cratemirror.redact import split_userinfo
from cratemirror.upstream.proxies import ProxyChoice

log = logging.getLogger("cratemirror.upstream")

T = TypeVar("T")

MAX_BACKOFF = 10.0
FAILURES_BEFORE_DOWN = 3
MAX_REDIRECTS = 5
PROBE_JOIN = 2.0  # seconds a request waits for the half-open probe's verdict before failing fast
MAX_CONFIG_JSON = 64 * 1024  # a registry's config.json is a few hundred bytes
READ_CHUNK = 256 * 1024


class UpstreamError(Exception):
    """Upstream could not give an answer; `status` is what the client gets (502, or 504 on timeout)."""

    def __init__(self, reason: str, status: int = 502) -> None:
        super().__init__(reason)
        self.status = status


class TooLarge(UpstreamError):
    """An upstream body over its configured cap: refused (502), nothing stored."""


class UpstreamNotFound(Exception):
    pass


@dataclass(frozen=True, slots=True)
class IndexFetch:
    status: int  # 200, 304 or 404
    body: bytes
    etag: str | None
    last_modified: str | None


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, timeout: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.timeout = timeout


class Upstream:
    def __init__(self, config: UpstreamConfig, metrics: Metrics, *, authorization: str | None = None) -> None:
        self.config = config
        self.metrics = metrics
        # user:token@ in index_url becomes an Authorization header for that origin only, so no URL we
        # keep, log or show carries it.
        clean_url, credentials = split_userinfo(config.index_url)
        self.index_url = URL(clean_url)
        self._auth = aiohttp.BasicAuth(*credentials) if credentials else None
        # A registry's own token (registries.<name>.token): sent as Authorization to its index origin,
        # and to its download host once its config.json says auth-required; never on a hop elsewhere.
        self._authorization = authorization
        self._downloads_need_auth = False
        self.user_agent = config.user_agent or f"cratemirror/{__version__} (+{PROJECT_URL})"
        self.health = Health(metrics)
        self._session: aiohttp.ClientSession | None = None
        self._proxies = ProxyChoice(config.proxy)

    async def start(self) -> None:
        ssl_context: ssl.SSLContext | bool = True
        if self.config.ca_bundle is not None:
            ssl_context = ssl.create_default_context()
            ssl_context.load_verify_locations(cafile=str(self.config.ca_bundle))
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, ssl=ssl_context)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Per attempt: connect, and any gap between bytes (first byte or a stall mid-body).
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.timeout, sock_read=self.config.timeout
            ),
            headers={"User-Agent": self.user_agent},
            trust_env=False,  # the proxy environment is read once, by ProxyChoice
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    @property
    def is_up(self) -> bool:
        return self.health.is_up

    @property
    def last_error(self) -> str | None:
        return self.health.last_error

    # --- requests ----------------------------------------------------------------------------

    async def fetch_index(
        self, path: str, etag: str | None, last_modified: str | None, kind: str = "index"
    ) -> IndexFetch:
        """GET an index file (`path` relative to the index root), conditionally when we hold a copy;
        `kind` labels the metrics (a toolchain manifest is fetched the same way)."""
        headers = {"Accept": "text/plain", "Accept-Encoding": "gzip"}
        if etag:
            headers["If-None-Match"] = etag
        elif last_modified:
            headers["If-Modified-Since"] = last_modified
        url = self.index_url.join(URL(path))

        async def attempt() -> IndexFetch:
            async with self._request(kind, url, headers) as response:
                if response.status == 304:
                    return IndexFetch(304, b"", etag, last_modified)
                if response.status in (403, 404, 410, 451):
                    return IndexFetch(404, b"", None, None)
                self._raise_for_status(response)
                body = await read_capped(response, self.config.max_index_size, "index file")
                self.metrics.upstream_bytes.labels(kind).inc(len(body))
                return IndexFetch(
                    200, body, response.headers.get("ETag"), response.headers.get("Last-Modified")
                )

        return await self._with_retries(attempt)

    async def fetch_json(self, path: str) -> object:
        url = self.index_url.join(URL(path))

        async def attempt() -> object:
            async with self._request("config", url, {"Accept": "application/json"}) as response:
                if response.status == 404:
                    raise UpstreamNotFound(str(url))
                self._raise_for_status(response)
                body = await read_capped(response, MAX_CONFIG_JSON, "config.json")
                try:
                    document = json.loads(body)
                except (ValueError, RecursionError) as exc:
                    raise UpstreamError(f"{url}: not JSON: {exc}") from exc
                if path == "config.json" and isinstance(document, dict):
                    self._downloads_need_auth = document.get("auth-required") is True
                return document

        return await self._with_retries(attempt)

    async def fetch_api(self, url: URL, limit: int) -> bytes:
        """One GET of the registry's web API (`cargo search`): the body, at most `limit` bytes. Not
        retried and not counted in the index's health (another host; the caller answers from its
        cache); a redirect is refused."""
        try:
            async with self._request("search", url, {"Accept": "application/json"}) as response:
                self._raise_for_status(response)
                body = await read_capped(response, limit, "search answer")
        except _Retryable as exc:
            raise UpstreamError(str(exc), status=504 if exc.timeout else 502) from exc
        self.metrics.upstream_bytes.labels("search").inc(len(body))
        return body

    @contextlib.asynccontextmanager
    async def open_crate(self, url: str, kind: str = "crate") -> AsyncIterator[aiohttp.ClientResponse]:
        """An upstream 200 response for a tarball, retried until its headers arrive; the caller reads
        the body. Raises UpstreamNotFound (a 403/404/410 from the store) or UpstreamError."""

        async def attempt() -> aiohttp.ClientResponse:
            response = await self._send(kind, URL(url, encoded=True), {"Accept-Encoding": "identity"})
            try:
                if response.status in (403, 404, 410, 451):
                    raise UpstreamNotFound(url)
                self._raise_for_status(response)
            except BaseException:
                response.release()
                raise
            return response

        response = await self._with_retries(attempt)
        try:
            yield response
        finally:
            response.release()

    # --- plumbing ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(
        self, kind: str, url: URL, headers: dict[str, str]
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        response = await self._send(kind, url, headers)
        try:
            yield response
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise _Retryable(f"{url}: body cut off: {exc}") from exc
        except TimeoutError as exc:
            raise _Retryable(f"{url}: timed out reading the body", timeout=True) from exc
        finally:
            response.release()

    async def _send(self, kind: str, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        started = time.perf_counter()
        status = "error"
        try:
            response = await self._follow(kind, url, headers)
            status = str(response.status)
            return response
        except TimeoutError as exc:
            status = "timeout"
            raise _Retryable(f"{url}: timed out after {self.config.timeout:g}s", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise _Retryable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
        finally:
            self.metrics.upstream_requests.labels(kind, status).inc()
            self.metrics.upstream_duration.labels(kind).observe(time.perf_counter() - started)

    async def _follow(self, kind: str, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET with redirects followed by hand: index files and config.json only within the index's
        origin (a redirect elsewhere could make the mirror cache and serve an internal URL), crates
        only to http(s); credentials go only to the index's origin."""
        trusted = {self.index_url.origin()}
        if kind == "crate" and self._downloads_need_auth:
            trusted.add(url.origin())  # the registry's own download host (its config.json's dl)
        for _ in range(MAX_REDIRECTS + 1):
            auth = self._auth if url.origin() == self.index_url.origin() else None
            hop_headers = headers
            if self._authorization is not None and url.origin() in trusted:
                hop_headers, auth = {**headers, "Authorization": self._authorization}, None
            response = await self.session.get(
                url, headers=hop_headers, proxy=self._proxies.for_url(url), auth=auth, allow_redirects=False
            )
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("Location", "")
            response.release()
            try:
                target = url.join(URL(location))
            except ValueError:
                raise UpstreamError(f"{url}: upstream redirected to an invalid location") from None
            if target.scheme not in ("http", "https") or not target.host:
                raise UpstreamError(f"{url}: upstream redirected to a non-http(s) location")
            if kind == "search":  # the API answers where it is asked; a hop elsewhere is not followed
                raise UpstreamError(f"{url}: the registry's API redirected the search")
            if kind != "crate" and target.origin() != self.index_url.origin():
                raise UpstreamError(f"{url}: upstream redirected the {kind} request to another host")
            url = target
        raise UpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _raise_for_status(response: aiohttp.ClientResponse) -> None:
        if response.status == 200:
            return
        reason = f"{response.url}: upstream answered {response.status}"
        if response.status == 429 or response.status >= 500:
            raise _Retryable(reason, retry_after=_parse_retry_after(response.headers.get("Retry-After")))
        raise UpstreamError(reason)

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]]) -> T:
        if not await self.health.admit():
            return await self._attempts(attempt, self.config.retries + 1)
        try:  # the half-open probe: one attempt, no backoff
            return await self._attempts(attempt, 1)
        finally:
            self.health.probe_done()

    async def _attempts(self, attempt: Callable[[], Awaitable[T]], attempts: int) -> T:
        for number in range(attempts):
            try:
                result = await attempt()
            except (UpstreamNotFound, UpstreamError):
                self.health.success()  # it answered, if not what we hoped
                raise
            except _Retryable as exc:
                self.health.failure(str(exc))
                if number + 1 >= attempts:
                    raise UpstreamError(str(exc), status=504 if exc.timeout else 502) from exc
                await asyncio.sleep(self._backoff(number, exc.retry_after))
                continue
            self.health.success()
            return result
        raise AssertionError("unreachable")

    def _backoff(self, number: int, retry_after: float | None) -> float:
        if retry_after is not None:
            # Honour Retry-After, but never wait longer than one attempt's timeout.
            return min(retry_after, self.config.timeout, MAX_BACKOFF)
        base = min(0.1 * 2.0**number, MAX_BACKOFF)
        return base / 2 + random.uniform(0, base / 2)  # jitter: runners that failed together spread out


async def read_capped(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refusing one larger than `limit` (declared or as it arrives, after decoding):
    an upstream cannot make the mirror hold or store an endless or huge body."""
    if response.content_length is not None and response.content_length > limit:
        raise TooLarge(f"{response.url}: upstream {what} is {response.content_length} bytes, over {limit}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"{response.url}: upstream {what} is larger than {limit} bytes")
    return bytes(body)


class Health:
    """Marks the upstream down after consecutive failures. While down, requests fail at once (callers
    serve stale copies), except one at a time: that one probes the upstream with a single attempt
    (half-open), so the first request after the upstream recovers gets through, with no backoff to wait
    out. Requests that come while a probe is out wait up to PROBE_JOIN seconds for its verdict (a build
    after a recovery asks for many files at once: they all go through with the probe), then fail fast.
    Recovery, like failure, is shared with the other replicas through coordination."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._probe: asyncio.Future[None] | None = None  # set while a request probes the down upstream
        self.adopted = False  # down because another replica said so (coordination), not our own failures
        self.last_failure_at = 0.0  # wall clock, for the other replicas to weigh against their own
        self.last_success_at = 0.0
        self.recovered_at = 0.0  # wall clock of the first success after being down
        self._down = LastingCondition(log, "upstream down, failing fast (one request at a time probes it)")

    @property
    def is_up(self) -> bool:
        return self.consecutive_failures < FAILURES_BEFORE_DOWN

    async def admit(self) -> bool:
        """Whether the request goes upstream as the probe (one attempt); False: as usual (up, or the
        probe it waited for got an answer). Raises (fail fast) while the upstream stays down."""
        if self.is_up:
            return False
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_future()
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._probe), PROBE_JOIN)
        if self.is_up:
            return False
        self._down.happened(self.last_error or "")
        raise UpstreamError(
            f"upstream is down after {self.consecutive_failures} failures in a row "
            f"(last: {self.last_error}); one request at a time probes it"
        )

    def probe_done(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None and not probe.done():
            probe.set_result(None)

    def adopt_down(self, reason: str, failed_at: float) -> None:
        """Another replica found the upstream down: fail fast here too, until our own probe answers
        (unless we have seen it answer since)."""
        if not self.is_up or failed_at <= self.last_success_at:
            return
        log.warning("upstream marked down by another replica: %s", reason)
        self.consecutive_failures = FAILURES_BEFORE_DOWN
        self.last_error = f"{reason} (seen by another replica)"
        self.adopted = True
        self.metrics.upstream_up.set(0)

    def adopt_up(self, answered_at: float) -> None:
        """Another replica saw the upstream answer after our last failure: up here too."""
        if self.is_up or answered_at <= self.last_failure_at:
            return
        log.info("upstream answering again (seen by another replica)")
        self._up(answered_at)

    def failure(self, reason: str) -> None:
        self.adopted = False
        self.last_failure_at = time.time()
        self.consecutive_failures += 1
        self.last_error = reason
        if self.is_up:
            log.warning("upstream failure (%d in a row): %s", self.consecutive_failures, reason)
        else:
            self._down.happened(reason)
            self.metrics.upstream_up.set(0)

    def success(self) -> None:
        self._up(time.time())

    def _up(self, now: float) -> None:
        if not self.is_up:
            self._down.ended("upstream is answering again")
            self.recovered_at = now
        self.consecutive_failures = 0
        self.adopted = False
        self.last_success_at = max(self.last_success_at, now)
        self.metrics.upstream_up.set(1)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
