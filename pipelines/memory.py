"""Peak resident memory: the kernel's high-water mark of this process (VmHWM), read after each stage, so a run's
record shows which stage raised the process's peak and to what.

The mark is never reset (Linux could, through /proc/self/clear_refs, but that also resets what getrusage and
``/usr/bin/time`` report, and anyone measuring crossport from outside would read the last stage's peak as the
run's). One stage's own peak is its process's when it runs alone (``--stage NAME``: a process of its own).
Child processes (torchrun's workers) are not counted: they are processes of their own.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
# glibc's allocator with one heap for every thread: PyTorch's and TensorFlow's worker threads otherwise free blocks of
# tens of MB into heaps of their own, in an order that varies with their timing, and what one order strands between
# live blocks is never given back (docs/training.md, "EMNIST at full size": the same evaluation peaked anywhere
# between 0.86 and 4.47 GiB from run to run, 0.78-1.12 GiB with one heap). glibc reads it once, at start.
ONE_HEAP = {"MALLOC_ARENA_MAX": "1"}


def peak_gib() -> float:
    """The most this process has held since it started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def one_heap() -> None:
    """Run this command again, at once and in this process's place, with :data:`ONE_HEAP` set, unless it is set
    already (by that first run, or by a user who chose their own allocator settings) or the C library is not glibc.
    Call it first thing in a ``__main__``, before anything is imported or started: the command runs as if it had been
    typed with the variable (same process id, arguments, interpreter flags and standard streams)."""
    if any(name in os.environ for name in ONE_HEAP) or platform.libc_ver()[0] != "glibc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **ONE_HEAP})
