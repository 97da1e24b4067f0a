"""`cratemirror serve`: load the config, then run one or more worker processes sharing the port.

With several workers each process binds the port with SO_REUSEPORT (the kernel spreads connections),
and prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set here before any worker
imports it) lets /metrics sum over all of them. The parent only supervises: it restarts a worker that
died and stops them all on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

from cratemirror.config.load import find_config_path, load_config
from cratemirror.config.schema import Config, ConfigError
from cratemirror.http.connections import ConnectionGuard, raise_open_file_limit
from cratemirror.http.tls import server_ssl_context
from cratemirror.redact import redact
from cratemirror.server.logs import setup_logging
from cratemirror.server.readiness import Readiness

log = logging.getLogger("cratemirror")

MAX_RESTARTS_PER_MINUTE = 10
WORKER_EXIT_GRACE = 5.0  # past server.shutdown_timeout, for a worker's own clean-up, before SIGKILL


def config_from_args(args: argparse.Namespace) -> Config:
    path = find_config_path(args.config, os.environ, Path.cwd())
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "server.workers": args.workers,
        "cache.dir": args.cache_dir,
        "upstream.index_url": args.upstream,
        "offline": args.offline,
    }
    return load_config(path, os.environ, overrides)


def serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    setup_logging(config.logging)
    raise_open_file_limit()
    from cratemirror.policy.rules import check_policy  # no prometheus_client in the supervisor

    check_policy(config)  # a bad deny entry stops start-up (exit 2) before any worker runs
    try:
        config.cache.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{config.source}: cache.dir: expected a directory that can be created, got "
            f"{str(config.cache.dir)!r} ({exc.strerror})"
        ) from exc
    scheme = "https" if server_ssl_context(config) is not None else "http"  # bad TLS files: exit 2 now
    _check_registry_tokens(config)
    ready_file = _ready_file(args.ready_file)
    problem = _port_problem(config.server.host, config.server.port)
    if problem:
        log.error("%s", problem)
        return 1
    readiness = Readiness(
        "cratemirror serving on {}://{}:{} with {} worker(s); upstream {}; cache {}{}; config: {}".format(
            scheme, _url_host(config.server.host), config.server.port, config.server.workers,
            redact(config.upstream.index_url), config.cache.dir, " (offline)" if config.offline else "",
            config.source,
        ),
        ready_file,
    )  # fmt: skip
    try:
        if config.server.workers == 1:
            run_worker(config, on_ready=readiness.announce)
            return 0
        return _supervise(config, readiness)
    finally:
        readiness.withdraw()


def _check_registry_tokens(config: Config) -> None:
    """An unset token_env is exit 2 now, not a crash in every worker."""
    # Imported here: cratemirror.cache.registry loads prometheus_client, which the supervisor must not do
    # before PROMETHEUS_MULTIPROC_DIR is set.
    from cratemirror.cache.registry import upstream_authorization

    for name, registry in config.registries.items():
        upstream_authorization(config, name, registry)


def _ready_file(text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text)
    if not path.parent.is_dir():
        raise ConfigError(f"--ready-file: expected a path in an existing directory, got {text!r}")
    return path


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run_worker(
    config: Config, ready: Connection | None = None, on_ready: Callable[[], None] | None = None
) -> None:
    """One worker process: an aiohttp server on the shared port. Once it listens it says so: through
    `ready` (to the supervising parent) or by calling `on_ready` (a single-process server)."""
    from aiohttp import web

    from cratemirror.http.app import create_app
    from cratemirror.http.hit_lane import install_hit_lane
    from cratemirror.http.instrument import start_timing
    from cratemirror.server.logs import AccessLogger, flush_access_log

    setup_logging(config.logging)
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass

    runner_loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    asyncio.set_event_loop(runner_loop)
    guard = ConnectionGuard(config.server.max_connections, config.server.idle_timeout)
    app = create_app(config)

    stopped: list[str] = []  # the signal that stopped this worker, once one did

    async def serve() -> None:
        # run_app's steps, with a hold on the Server object so the guard can watch its connections.
        runner = web.AppRunner(
            app,
            handle_signals=False,  # our own handlers below: a graceful stop that is not a cancellation
            access_log_class=AccessLogger,
            access_log=logging.getLogger("cratemirror.access"),
            keepalive_timeout=config.server.idle_timeout,
            shutdown_timeout=config.server.shutdown_timeout,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, signum, stop, stopped)
        await runner.setup()
        try:
            assert runner.server is not None
            install_hit_lane(app, runner.server)  # in front of the app; the guard wraps both
            guard.attach(runner.server, on_request=start_timing)
            site = web.TCPSite(
                runner, config.server.host, config.server.port, reuse_port=config.server.workers > 1,
                ssl_context=server_ssl_context(config),
            )  # fmt: skip
            await site.start()
            _ready(ready, on_ready)  # this worker accepts connections now
            await stop.wait()  # until SIGTERM/SIGINT
        finally:
            # The listening socket closes first (no new connections), idle keep-alive connections
            # close, and answers in flight get server.shutdown_timeout to finish.
            started = time.monotonic()
            await guard.close()
            await runner.cleanup()
            if stopped and on_ready is not None:  # a single-process server: its own one line
                log.info("%s", stop_line(stopped[0], time.monotonic() - started, config))

    main_task = runner_loop.create_task(serve())
    try:
        runner_loop.run_until_complete(main_task)
    except KeyboardInterrupt:
        main_task.cancel()  # runs the cleanup above: in-flight requests get shutdown_timeout to finish
        with contextlib.suppress(asyncio.CancelledError):
            runner_loop.run_until_complete(main_task)
    finally:
        for task in asyncio.all_tasks(runner_loop):
            task.cancel()
        runner_loop.run_until_complete(asyncio.sleep(0))
        runner_loop.run_until_complete(runner_loop.shutdown_asyncgens())
        flush_access_log()  # worker processes end with os._exit: atexit handlers do not run


def _on_signal(signum: int, stop: asyncio.Event, stopped: list[str]) -> None:
    if not stopped:
        stopped.append(signal.Signals(signum).name)
    stop.set()


def stop_line(signame: str, seconds: float, config: Config) -> str:
    """The one line a stop logs: what stopped it, and whether every answer in flight could finish."""
    limit = config.server.shutdown_timeout
    if seconds >= limit:
        outcome = f"answers still in flight after server.shutdown_timeout ({limit:g}s) were cut off"
    else:
        outcome = f"answers in flight finished (server.shutdown_timeout {limit:g}s)"
    return f"stopped on {signame} in {seconds:.2f}s: stopped accepting, {outcome}"


def _ready(ready: Connection | None, on_ready: Callable[[], None] | None) -> None:
    if ready is not None:
        with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
            ready.send(os.getpid())
    if on_ready is not None:
        on_ready()


def _supervise(config: Config, readiness: Readiness) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="cratemirror-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    listening, ready = context.Pipe(duplex=False)  # workers send their pid once they listen
    workers = [_start(context, config, ready) for _ in range(config.server.workers)]
    ready_pids: set[int] = set()
    stopping = False
    restarts: list[float] = []

    stop_signal = "SIGTERM"
    stop_started = 0.0

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, stop_signal, stop_started
        if not stopping:
            stop_signal, stop_started = signal.Signals(signum).name, time.monotonic()
        stopping = True
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: aiohttp shuts down gracefully

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            sentinels = [worker.sentinel for worker in workers]
            woken = multiprocessing.connection.wait([*sentinels, listening])
            if listening in woken:
                while listening.poll():
                    ready_pids.add(listening.recv())
                ready_pids &= {worker.pid for worker in workers if worker.pid is not None}
                if all(worker.pid in ready_pids for worker in workers):
                    readiness.announce()  # every worker accepts connections (once; restarts are quiet)
            if stopping:
                deadline = stop_started + config.server.shutdown_timeout + WORKER_EXIT_GRACE
                for worker in workers:
                    worker.join(timeout=max(0.0, deadline - time.monotonic()))
                    if worker.is_alive():
                        worker.kill()
                log.info("%s", stop_line(stop_signal, time.monotonic() - stop_started, config))
                return 0
            for position, worker in enumerate(workers):
                if worker.is_alive():
                    continue
                now = time.monotonic()
                restarts = [at for at in restarts if now - at < 60] + [now]
                if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                    log.error("workers keep dying (exit code %s); giving up", worker.exitcode)
                    stop(signal.SIGTERM, None)
                    for other in workers:
                        other.join(timeout=15)
                    return 1
                log.error("worker pid %s exited with %s; starting another", worker.pid, worker.exitcode)
                _mark_dead(worker.pid)
                workers[position] = _start(context, config, ready)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _start(
    context: multiprocessing.context.SpawnContext, config: Config, ready: Connection
) -> multiprocessing.process.BaseProcess:
    worker = context.Process(target=run_worker, args=(config, ready), daemon=False)
    worker.start()
    return worker


def _mark_dead(pid: int | None) -> None:
    """Tell prometheus_client a worker is gone so its live gauges stop counting."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _port_problem(host: str, port: int) -> str | None:
    """A clear message now beats N workers each failing to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    finally:
        probe.close()
    return None
