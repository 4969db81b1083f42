"""One writer per run directory: an advisory lock held for the life of the process.

A second ``pipelines.run`` on the same run directory gets one line naming the holder
instead of racing it (two writers would interleave stages and manifests). The lock is an
``flock`` on ``<run-dir>/.lock``: the kernel drops it when the holder exits, however it
exits, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from crossport.errors import CrossportError

LOCK_NAME = ".lock"
_HELD: dict[Path, int] = {}  # run directory → open descriptor, kept open until exit


class RunDirBusy(CrossportError):
    """Another process is writing the run directory."""


def lock_run_dir(run_dir: Path) -> None:
    """Take the run directory's lock, or raise :class:`RunDirBusy` naming the process holding it."""
    import fcntl

    key = Path(run_dir).resolve()
    if key in _HELD:
        return
    path = key / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(path)
        os.close(fd)
        raise RunDirBusy(f"run directory {run_dir} is in use by another crossport process ({holder}).",
                         hint="Wait for it to finish, or pass another --run-dir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": datetime.now(UTC).isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv)[:300]}).encode())
    _HELD[key] = fd


def _describe(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
