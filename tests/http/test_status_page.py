"""GET / rendered by a real headless Chromium against a mirror on loopback: the cargo snippet names this
mirror, the inline script runs, and every figure equals what /metrics says."""

from __future__ import annotations

import asyncio
import html.parser
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from cratemirror.config.client import cargo_ci_snippet, cargo_config_snippet
from cratemirror.config.schema import ServerConfig
from tests.conftest import MirrorFactory
from tests.fake_upstream import FakeRegistry, index_path
from tests.mirror_process import metric_value

REQUESTS = "cratemirror_cache_requests_total"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
)  # fmt: skip


class Page(html.parser.HTMLParser):
    """Text and attributes of every element that has an id, and the <html> element's attributes."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.attrs: dict[str, dict[str, str]] = {}
        self.texts: dict[str, str] = {}
        self.root: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "html":
            self.root = values
        if tag in ("meta", "link", "br", "img", "input"):
            return  # void elements never close
        element_id = values.get("id")
        if element_id:
            self.attrs[element_id] = values
            self.texts[element_id] = ""
        self._open.append(element_id)

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id:
                self.texts[element_id] += data

    def value(self, element_id: str) -> float:
        return float(self.attrs[element_id]["data-value"])


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "headless Chromium is needed: install the Debian package 'chromium' (apt-get install chromium)"
        )
    return path


async def render_in_chromium(url: str, profile: Path) -> str:
    browser = await asyncio.create_subprocess_exec(
        chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(browser.communicate(), timeout=60)
    finally:
        if browser.returncode is None:
            browser.kill()
            await browser.wait()
    assert browser.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def drive_traffic(registry: FakeRegistry, mirror: TestClient[Any, Any]) -> None:
    registry.add_crate("serde", "1.0.0")
    registry.add_crate("tokio", "1.0.0")
    for path in (
        "/api/v1/crates/serde/1.0.0/download",
        "/api/v1/crates/serde/1.0.0/download",
        "/api/v1/crates/tokio/1.0.0/download",
        f"/index/{index_path('serde')}",
        f"/index/{index_path('nosuch')}",
        f"/index/{index_path('nosuch')}",
        "/index/config.json",
    ):
        await (await mirror.get(path)).read()
    registry.status_override = 500  # one failed miss: an upstream error to show
    assert (await mirror.get(f"/index/{index_path('broken')}")).status == 502
    registry.status_override = None


async def test_status_page_in_chromium(
    registry: FakeRegistry, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    browser = chromium()  # fail early and clearly when it is missing
    assert browser
    mirror = await mirror_factory()
    await drive_traffic(registry, mirror)
    text = await (await mirror.get("/metrics")).text()
    base = str(mirror.make_url("")).rstrip("/")
    page = Page(await render_in_chromium(f"{base}/", tmp_path / "chromium"))

    assert page.root.get("data-js") == "ready"  # the inline script ran without an error
    assert page.texts["cargo-config"].strip() == cargo_config_snippet(base).strip()
    assert f'registry = "sparse+{base}/index/"' in page.texts["cargo-config"]
    assert page.texts["cargo-env"].strip() == cargo_ci_snippet(base).strip()

    # Every figure is the number /metrics shows.
    for kind in ("index", "crate", "config"):
        assert page.value(f"requests-{kind}") == metric_value(text, REQUESTS, kind=kind)
        for result in ("hit", "miss", "revalidated", "stale", "negative", "error"):
            expected = metric_value(text, REQUESTS, kind=kind, result=result)
            assert page.value(f"requests-{kind}-{result}") == expected, (kind, result)
    assert page.value("requests-total") == metric_value(text, REQUESTS) == 8
    hits = sum(metric_value(text, REQUESTS, kind=kind, result="hit") for kind in ("index", "crate"))
    answered = metric_value(text, REQUESTS, kind="index") + metric_value(text, REQUESTS, kind="crate")
    assert page.value("hit-rate") == pytest.approx(hits / answered)
    assert page.texts["hit-rate"] == f"{hits / answered * 100:.1f}%"
    assert page.value("hit-rate-crate") == pytest.approx(1 / 3)
    for element_id, name in (
        ("bytes-served", "cratemirror_bytes_served_total"),
        ("upstream-bytes", "cratemirror_upstream_bytes_total"),
        ("upstream-requests", "cratemirror_upstream_requests_total"),
        ("checksum-failures", "cratemirror_checksum_failures_total"),
        ("coalesced", "cratemirror_coalesced_requests_total"),
        ("cache-size", "cratemirror_cache_size_bytes"),
    ):
        assert page.value(element_id) == metric_value(text, name), element_id
    for kind in ("crate", "index"):
        assert page.value(f"cache-size-{kind}") == metric_value(
            text, "cratemirror_cache_size_bytes", kind=kind
        )
        assert page.value(f"cache-entries-{kind}") == metric_value(
            text, "cratemirror_cache_entries", kind=kind
        )
    assert page.value("cache-entries-crate") == 2
    assert page.value("upstream-failures") == metric_value(
        text, "cratemirror_upstream_requests_total", kind="index", status="500"
    )
    assert page.value("upstream-status") == metric_value(text, "cratemirror_upstream_up") == 1
    # The last upstream request failed (the 500): failing, though not yet down.
    assert "Upstream failing (2 failures in a row)" in page.texts["upstream-status"]
    assert "upstream answered 500" in page.texts["last-error"]
    assert f"/index/{index_path('broken')}" in page.texts["last-error"]

    misses = page.texts["recent-misses"]
    for path in (
        "/api/v1/crates/serde/1.0.0/download",
        "/api/v1/crates/tokio/1.0.0/download",
        f"/index/{index_path('broken')}",  # the error, as /metrics counts it
    ):
        assert path in misses
    assert misses.index("tokio") < misses.index("serde")  # newest first


async def test_status_page_before_any_traffic_and_with_public_url(mirror_factory: MirrorFactory) -> None:
    public = "https://crates.example.com"
    server = ServerConfig(host="127.0.0.1", port=8080, workers=1, public_url=public)
    mirror = await mirror_factory(server=server, offline=True)
    response = await mirror.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = Page(await response.text())
    assert page.texts["cargo-config"].strip() == cargo_config_snippet(public).strip()
    assert page.attrs["hit-rate"]["data-value"] == ""  # no requests yet: no rate, not 0%
    assert page.texts["hit-rate"] == "—"
    assert page.value("requests-total") == 0
    assert "Offline mode" in page.texts["upstream-status"]
    assert "no-misses" in page.texts
    assert "none since this worker started" in page.texts["last-error"]


async def test_status_page_is_honest_about_an_upstream_that_never_answered(
    mirror_factory: MirrorFactory,
) -> None:
    # Nothing listens on port 9 of loopback: every upstream request is refused at once.
    mirror = await mirror_factory(upstream__index_url="http://127.0.0.1:9/index/")
    page = Page(await (await mirror.get("/")).text())
    assert page.texts["upstream-status"].strip() == "Upstream not asked yet"  # not a green "up"
    assert page.attrs["upstream-status"]["data-value"] == ""
    # An empty cache holds nothing: 0 bytes, whatever the metadata database's own pages take.
    for element_id in ("cache-size", "cache-size-index", "cache-size-crate"):
        assert page.value(element_id) == 0 and page.texts[element_id] == "0 B", element_id

    for n in range(16):
        assert (await mirror.get(f"/index/{index_path(f'failing{n}')}")).status >= 500
    text = await (await mirror.get("/metrics")).text()
    errors = metric_value(text, REQUESTS, kind="index", result="error")
    assert errors == 16
    page = Page(await (await mirror.get("/")).text())
    assert page.texts["upstream-status"].strip() == "Upstream down"
    assert "no-misses" not in page.texts
    assert page.texts["recent-misses"].count("/index/") == 16  # every failed request, as /metrics counts
    assert page.value("requests-index-error") == errors
