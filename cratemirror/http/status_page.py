"""GET / : a server-rendered status page (no external assets, so it works behind a firewall).

It tells people how to point cargo here and shows the same figures as /metrics (read from the same
aggregated registry, so the numbers agree), plus this worker's recent misses and last upstream error.
Every figure is an element with an id and its exact value in `data-value`, for scripts and tests.
"""

from __future__ import annotations

import dataclasses
import html
import os
import string
import time
from collections.abc import Callable, Iterable
from importlib import resources
from urllib.parse import urlsplit

from aiohttp import web

from cratemirror import __version__
from cratemirror.config.client import (
    BadBaseURL,
    cargo_ci_snippet,
    cargo_config_snippet,
    checked_base,
    client_setup,
)
from cratemirror.config.rustup_client import rustup_env_snippet
from cratemirror.config.schema import Config
from cratemirror.http.auth import TOKEN_NAME, presented_token
from cratemirror.http.context import MIRROR, Mirror, RecentMiss
from cratemirror.http.routes import base_url
from cratemirror.metrics import KINDS, RESULTS, Snapshot
from cratemirror.policy.status import policy_panel
from cratemirror.redact import redact

routes = web.RouteTableDef()

TEMPLATE = string.Template(resources.files("cratemirror").joinpath("web/status.html").read_text("utf-8"))

REQUESTS = "cratemirror_cache_requests_total"
UPSTREAM_REQUESTS = "cratemirror_upstream_requests_total"

_Format = Callable[[float], str]


@routes.get("/")
async def status(request: web.Request) -> web.Response:
    mirror = request.app[MIRROR]
    await mirror.refresh_usage()  # exactly what a scrape now would show
    page = render(mirror, mirror.metrics.snapshot(), base_url(request), anonymous=_anonymous(request))
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def _anonymous(request: web.Request) -> bool:
    """With auth.required, a viewer without a valid token (the page is open unless protect_status)."""
    mirror = request.app[MIRROR]
    if not mirror.config.auth.required or request.get(TOKEN_NAME) is not None:
        return False
    return mirror.tokens is None or mirror.tokens.check(presented_token(request)).reason is not None


def render(mirror: Mirror, snap: Snapshot, base: str, anonymous: bool = False) -> str:
    """`anonymous`: for a viewer without a token while auth is required, nothing about the extra
    registries (no /registries/ path) and no client address."""
    now = time.time()
    misses: Iterable[RecentMiss] = reversed(mirror.recent_misses)
    if anonymous:
        misses = (miss for miss in misses if not miss.path.startswith("/registries/"))
    return TEMPLATE.substitute(
        host=_esc(urlsplit(base).netloc or base),
        version=_esc(__version__),
        upstream_url=_esc(redact(mirror.config.upstream.index_url)),
        **_snippets(base, mirror.config, anonymous),
        **_health(mirror, snap),
        **_summary(snap),
        **_results_table(snap),
        **_upstream(snap),
        last_error=_esc(redact(mirror.default.upstream.last_error or "none since this worker started")),
        last_error_class="" if mirror.default.upstream.last_error else " none",
        recent_misses=_misses_table(misses, now, snap),
        policy_panel=policy_panel(mirror.policy, now, show_clients=not anonymous),
        rustup_panel=rustup_panel(base, mirror.config),
        pid=str(os.getpid()),
        uptime=_duration(now - mirror.started_at),
        rendered_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
    )


def rustup_panel(base: str, config: Config) -> str:
    """The two lines `cratemirror client-config --rustup` prints, with a copy button (toolchains on)."""
    if config.toolchains.upstream is None:
        return ""
    try:
        snippet = _esc(rustup_env_snippet(base))
    except BadBaseURL as exc:
        snippet = _esc(f"no snippet for this base URL: {exc}")
    return (
        "<h3>Point rustup at this mirror</h3>\n"
        "  <p>Toolchains (<code>rustup toolchain install</code>, <code>rust-toolchain.toml</code>, "
        "<code>rustup-init</code>) come through the mirror, checked against the Rust release signature, "
        "with these two variables (what <code>cratemirror client-config --rustup</code> prints):</p>\n"
        '  <div class="snippet">\n'
        f'    <pre id="rustup-env">{snippet}</pre>\n'
        '    <button type="button" class="copy" data-copy="rustup-env">Copy</button>\n'
        "  </div>"
    )


def _snippets(base: str, config: Config, anonymous: bool = False) -> dict[str, str]:
    """Exactly what `cratemirror client-config [--ci]` prints, so the copy buttons paste cleanly
    (`anonymous`: crates.io's part alone)."""
    try:
        setup = client_setup(config)
        if anonymous:
            setup = dataclasses.replace(setup, registries=())
        return {
            "config_snippet": _esc(cargo_config_snippet(base, setup)),
            "env_snippet": _esc(cargo_ci_snippet(base, setup)),
            # the same base URL check as the snippets: nothing a Host header says reaches a shell line
            "merge_command": _esc(
                f"cratemirror client-config --url {checked_base(base)} --merge ~/.cargo/config.toml"
            ),
        }
    except BadBaseURL as exc:  # e.g. a server.public_url with userinfo or a query: say so, never guess
        reason = _esc(f"no snippet for this base URL: {exc}")
        return {"config_snippet": reason, "env_snippet": reason, "merge_command": reason}


def _health(mirror: Mirror, snap: Snapshot) -> dict[str, str]:
    """What this worker knows of the upstream: nothing until it has answered or failed once (the gauge
    starts at 1, which says nothing yet), failing while its last request failed, down once the gauge is 0."""
    up = snap.value("cratemirror_upstream_up")
    health = mirror.default.upstream.health
    shown = _number(up)
    if mirror.config.offline:
        css, text = "offline", "Offline mode"
    elif up < 1:
        css, text = "down", "Upstream down"
    elif health.last_success_at == 0 and health.last_failure_at == 0:
        css, text, shown = "unknown", "Upstream not asked yet", ""
    elif health.last_failure_at > health.last_success_at:
        failures = health.consecutive_failures
        css, text = "down", f"Upstream failing ({failures} failure{'s' if failures != 1 else ''} in a row)"
    else:
        css, text = "up", "Upstream up"
    return {"health_class": css, "health_text": text, "upstream_up": shown}


def _summary(snap: Snapshot) -> dict[str, str]:
    figures = {
        "requests_total": _figure("requests-total", snap.total(REQUESTS), _count),
        "bytes_served": _figure("bytes-served", snap.total("cratemirror_bytes_served_total"), _bytes),
        "upstream_bytes": _figure("upstream-bytes", snap.total("cratemirror_upstream_bytes_total"), _bytes),
        "hit_rate": _figure("hit-rate", hit_rate(snap, "index", "crate"), _percent),
        "cache_size": _figure("cache-size", snap.total("cratemirror_cache_size_bytes"), _bytes),
    }
    for kind in KINDS:
        figures[f"requests_{kind}"] = _figure(f"requests-{kind}", snap.total(REQUESTS, kind=kind), _count)
    for kind in ("index", "crate"):
        figures[f"hit_rate_{kind}"] = _figure(f"hit-rate-{kind}", hit_rate(snap, kind), _percent)
        size = snap.value("cratemirror_cache_size_bytes", kind=kind)
        figures[f"cache_size_{kind}"] = _figure(f"cache-size-{kind}", size, _bytes)
        entries = snap.value("cratemirror_cache_entries", kind=kind)
        figures[f"cache_entries_{kind}"] = _figure(f"cache-entries-{kind}", entries, _count)
    return figures


def hit_rate(snap: Snapshot, *kinds: str) -> float | None:
    """The share of these kinds' requests that were fresh cache hits (result "hit": no upstream contact),
    the ratio the shipped dashboard and alerts use; None before the first request."""
    total = sum(snap.total(REQUESTS, kind=kind) for kind in kinds)
    hits = sum(snap.value(REQUESTS, kind=kind, result="hit") for kind in kinds)
    return hits / total if total else None


def _results_table(snap: Snapshot) -> dict[str, str]:
    rows = []
    for result in RESULTS:
        cells = "".join(
            "<td>"
            + _figure(f"requests-{kind}-{result}", snap.value(REQUESTS, kind=kind, result=result), _count)
            + "</td>"
            for kind in KINDS
        )
        total = _count(snap.total(REQUESTS, result=result))
        rows.append(f"        <tr><td>{result}</td>{cells}<td>{total}</td></tr>")
    totals = "".join(f"<td>{_count(snap.total(REQUESTS, kind=kind))}</td>" for kind in KINDS)
    return {
        "result_heads": "".join(f"<th>{kind}</th>" for kind in KINDS),
        "result_rows": "\n".join(rows),
        "result_totals": totals + f"<td>{_count(snap.total(REQUESTS))}</td>",
    }


def _upstream(snap: Snapshot) -> dict[str, str]:
    failures = sum(
        value for labels, value in snap.series(UPSTREAM_REQUESTS) if _is_failure(labels.get("status", ""))
    )
    return {
        "upstream_requests": _figure("upstream-requests", snap.total(UPSTREAM_REQUESTS), _count),
        "upstream_failures": _figure("upstream-failures", failures, _count),
        "upstream_bytes_crate": _figure(
            "upstream-bytes-crate", snap.value("cratemirror_upstream_bytes_total", kind="crate"), _bytes
        ),
        "upstream_bytes_index": _figure(
            "upstream-bytes-index", snap.value("cratemirror_upstream_bytes_total", kind="index"), _bytes
        ),
        "coalesced": _figure("coalesced", snap.total("cratemirror_coalesced_requests_total"), _count),
        "checksum_failures": _figure(
            "checksum-failures", snap.total("cratemirror_checksum_failures_total"), _count
        ),
    }


def _is_failure(status: str) -> bool:
    return status in ("error", "timeout") or status.startswith("5")


def _misses_table(misses: Iterable[RecentMiss], now: float, snap: Snapshot) -> str:
    rows = [_miss_row(miss, now) for miss in misses]
    if not rows:
        missed = snap.total(REQUESTS, result="miss")
        failed = snap.total(REQUESTS, result="error")
        if missed or failed:  # another worker's: this list is per worker, /metrics counts them all
            return (
                f'  <p class="empty" id="no-misses">None on this worker; /metrics counts '
                f"{_count(missed)} misses and {_count(failed)} errors over all workers.</p>"
            )
        return '  <p class="empty" id="no-misses">No misses or errors since this worker started.</p>'
    head = (
        '<tr><th>When</th><th class="left">Kind</th><th class="path">Path</th>'
        "<th>Status</th><th>Time</th><th>Upstream</th></tr>"
    )
    body = "\n".join(rows)
    return (
        f'  <table id="recent-misses">\n    <thead>{head}</thead>\n'
        f"    <tbody>\n{body}\n    </tbody>\n  </table>"
    )


def _miss_row(miss: RecentMiss, now: float) -> str:
    when = f'<time datetime="{_iso(miss.at)}" title="{_iso(miss.at)}">{_duration(now - miss.at)} ago</time>'
    return (
        f'      <tr><td>{when}</td><td class="left">{_esc(miss.kind)}</td>'
        f'<td class="path mono">{_esc(miss.path)}</td>'
        f"<td>{miss.status}</td><td>{_millis(miss.seconds)}</td><td>{_millis(miss.upstream_seconds)}</td></tr>"
    )


# --- formatting ------------------------------------------------------------------------------------


def _figure(element_id: str, value: float | None, show: _Format) -> str:
    shown = "—" if value is None else show(value)
    exact = "" if value is None else _number(value)
    return f'<span id="{element_id}" data-value="{exact}">{shown}</span>'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _count(value: float) -> str:
    return f"{int(value):,}"


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def _bytes(value: float) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _millis(seconds: float) -> str:
    return "—" if seconds <= 0 else f"{seconds * 1000:.1f} ms"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _esc(text: str) -> str:
    return html.escape(text, quote=True)
