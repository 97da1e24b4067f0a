"""The serving stack's ceiling: an aiohttp app on uvloop, with as many worker processes as the mirror
(SO_REUSEPORT), that answers each benchmark path with the bytes the mirror served for it, from a dict.

No cache logic, no metrics, no access log: what aiohttp + uvloop + Python cost per answer on this
machine, measured in the same run as the mirror and nginx, so `cratemirror / trivial` says how much of a
hit is the mirror's own work.

Run by the driver as ``python -m bench.trivial PORT WORKERS ANSWERS_FILE``; the answers file is a JSON
object `{path: [content_type, etag, body_hex]}`. Serves until SIGTERM/SIGINT or until its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import signal
import sys
import threading
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.procs import Child, LocalServer
from tests.mirror_process import clean_env, free_port, listening_sockets

START_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent


def load_answers(path: Path) -> dict[str, tuple[bytes, dict[str, str]]]:
    answers: dict[str, tuple[bytes, dict[str, str]]] = {}
    for url_path, (content_type, etag, body_hex) in json.loads(path.read_text()).items():
        headers = {"Content-Type": content_type, "ETag": etag, "X-Cache": "HIT"}
        answers[url_path] = (bytes.fromhex(body_hex), headers)
    return answers


def app(answers: dict[str, tuple[bytes, dict[str, str]]]) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        found = answers.get(request.path)
        if found is None:
            return web.Response(status=404, text="not found\n")
        body, headers = found
        return web.Response(body=body, headers=headers)

    application = web.Application()
    application.router.add_get("/{tail:.*}", answer)
    return application


def worker(port: int, answers_file: Path) -> None:
    import uvloop

    answers = load_answers(answers_file)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def serve() -> None:
        runner = web.AppRunner(app(answers), access_log=None, handle_signals=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        loop.run_until_complete(serve())


def _watch_stdin(stop: threading.Event) -> None:
    sys.stdin.buffer.read()
    stop.set()


def main() -> None:
    port, workers, answers_file = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker, args=(port, answers_file)) for _ in range(workers)]
    for process in processes:
        process.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    while not stop.wait(0.5):
        if not all(process.is_alive() for process in processes):
            break
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


class Trivial(LocalServer):
    """The driver's handle on the trivial server: fetch the answers from a warm server, start, stop."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        self.workers = workers
        self.port = free_port()
        self.answers_file = tmp / "trivial-answers.json"
        argv = [sys.executable, "-m", "bench.trivial", str(self.port), str(workers), str(self.answers_file)]
        self.child = Child("trivial", argv, tmp / "trivial.log", REPO, clean_env())

    async def copy_answers(self, source_url: str, paths: list[str]) -> None:
        """The exact bytes (and Content-Type, ETag) that `source_url` answers for each path."""
        answers: dict[str, list[str]] = {}
        async with aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
        ) as session:
            for path in paths:
                async with session.get(source_url + path) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"trivial: {source_url}{path} answered {response.status}")
                    content_type = response.headers.get("Content-Type", "application/octet-stream")
                    answers[path] = [content_type, response.headers.get("ETag", ""), body.hex()]
        self.answers_file.write_text(json.dumps(answers))

    async def start(self) -> None:
        await self.child.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        for _ in range(int(START_TIMEOUT / 0.05)):
            self.child.check_alive()
            if listening_sockets(self.port) >= self.workers:
                return
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        output = self.child.output()
        raise RuntimeError(f"the trivial server did not listen within {START_TIMEOUT:g}s:\n{output}")

    async def stop(self) -> None:
        await self.child.stop()


if __name__ == "__main__":
    main()
