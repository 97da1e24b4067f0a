"""Telling the world the mirror accepts connections: the "serving on" log line, `--ready-file`, and
systemd's sd_notify (`Type=notify`), all at the moment every worker process listens.

sd_notify is one datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
or `@name` in the abstract namespace); written here directly rather than through libsystemd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("cratemirror")


def sd_notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `state` (e.g. "READY=1") to systemd if it asked for notifications; False if not sent."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a transport (vsock) this does not speak
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd through NOTIFY_SOCKET: %s", exc)
        return False
    return True


class Readiness:
    """Announced once, when every worker listens; withdrawn when the server stops."""

    def __init__(self, message: str, ready_file: Path | None) -> None:
        self.message = message
        self.ready_file = ready_file
        self.announced = False
        if ready_file is not None:
            # One left by a run that was killed would claim readiness before this one is ready.
            with contextlib.suppress(FileNotFoundError):
                ready_file.unlink()

    def announce(self) -> None:
        if self.announced:
            return
        self.announced = True
        log.info("%s", self.message)
        if self.ready_file is not None:
            try:
                temp = self.ready_file.with_name(f".{self.ready_file.name}.{os.getpid()}.tmp")
                temp.write_text(f"{os.getpid()}\n")
                os.replace(temp, self.ready_file)  # appears complete or not at all
            except OSError as exc:
                log.error("could not write --ready-file %s: %s", self.ready_file, exc.strerror or exc)
        sd_notify(f"READY=1\nSTATUS={self.message}")

    def withdraw(self) -> None:
        if self.ready_file is not None and self.announced:
            with contextlib.suppress(FileNotFoundError):
                self.ready_file.unlink()
        sd_notify("STOPPING=1")
