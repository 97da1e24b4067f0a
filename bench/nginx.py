"""nginx configured as a crates.io caching proxy in front of the same upstream: the baseline.

It serves /index/config.json itself (with `dl` pointing at its own /api/v1/crates), proxies
/index/... to the upstream index and /api/v1/crates/{name}/{version}/download to the upstream's
download URL, caching both (proxy_cache_lock coalesces misses, proxy_cache_use_stale serves stale
while upstream fails). It runs in the foreground with its own prefix in a temp dir.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import aiohttp

from bench.procs import Child, LocalServer
from tests.mirror_process import free_port

START_TIMEOUT = 15.0

CONF = """\
{user}worker_processes 2;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/octet-stream;
    access_log {prefix}/logs/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=crates:16m max_size=20g inactive=7d
                     use_temp_path=off;

    upstream registry {{
        server {upstream_host}:{upstream_port};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # Cache identity bodies, as the mirror does (wrk and the mirror's clients send no gzip).
        proxy_set_header Accept-Encoding "";
        proxy_cache crates;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 30s;
        proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
        proxy_cache_background_update on;
        proxy_cache_revalidate on;
        add_header X-Cache $upstream_cache_status always;

        location = /index/config.json {{
            default_type application/json;
            return 200 '{{"dl":"http://127.0.0.1:{port}/api/v1/crates","api":"http://127.0.0.1:{port}"}}';
        }}

        location /index/ {{
            proxy_pass http://registry/index/;
            # Same freshness as the mirror's cache.index_ttl, whatever the upstream's Cache-Control says;
            # bodies are always identity (Accept-Encoding is not forwarded), so one variant per file.
            proxy_ignore_headers Cache-Control Expires Vary;
            proxy_cache_valid 200 {index_ttl}s;
            proxy_cache_valid 404 60s;
        }}

        location ~ ^/api/v1/crates/([^/]+)/([^/]+)/download$ {{
            proxy_pass http://registry/crates/$1/$2/download;
            proxy_cache_valid 200 365d;
            proxy_cache_valid 404 60s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


class Nginx(LocalServer):
    def __init__(self, prefix: Path, upstream_host: str, upstream_port: int, index_ttl: int) -> None:
        self.prefix = prefix
        self.port = free_port()
        for sub in ("logs", "tmp", "cache"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        conf = CONF.format(
            # As root, workers would otherwise run as nobody and could not write the cache.
            user="user root;\n" if os.geteuid() == 0 else "",
            prefix=prefix,
            port=self.port,
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            index_ttl=index_ttl,
        )
        self.conf_path = prefix / "nginx.conf"
        self.conf_path.write_text(conf)
        binary = nginx_binary()
        assert binary is not None
        argv = [binary, "-p", str(prefix), "-c", str(self.conf_path), "-e", str(prefix / "logs/stderr.log")]
        self.child = Child("nginx", argv, prefix / "logs/console.log", prefix, dict(os.environ))

    def output(self) -> str:
        logs = self.prefix / "logs"
        return "".join(
            (logs / name).read_text(errors="replace")[-2000:]
            for name in ("console.log", "stderr.log", "error.log")
            if (logs / name).exists()
        )

    async def start(self) -> None:
        await self.child.start()
        deadline = time.monotonic() + START_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for _ in range(int(START_TIMEOUT / 0.05)):
                if self.child.proc is not None and self.child.proc.returncode is not None:
                    raise RuntimeError(f"nginx exited with {self.child.proc.returncode}:\n{self.output()}")
                try:
                    async with session.get(f"{self.url}/index/config.json") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        raise RuntimeError(f"nginx did not answer on {self.url} within {START_TIMEOUT:g}s:\n{self.output()}")

    async def stop(self) -> None:
        await self.child.stop()
