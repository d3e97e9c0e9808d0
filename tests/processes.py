"""Process helpers shared by the tests that start Ray nodes with the ``ray`` command line."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def kill_processes_under(folder: str) -> None:
    """End the processes whose command line names ``folder`` (the Ray nodes a test started in
    its own temp folder): never ``ray stop``, which would end every Ray of the machine."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if folder in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
