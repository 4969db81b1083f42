"""Peak resident memory: the kernel's high-water mark of this process (VmHWM), read after each stage, so a run's
record shows which stage raised the process's peak and to what.

The mark is never reset (Linux could, through /proc/self/clear_refs, but that also resets what getrusage and
``/usr/bin/time`` report, and anyone measuring crossport from outside would read the last stage's peak as the
run's). One stage's own peak is its process's when it runs alone (``--stage NAME``: a process of its own).
Child processes (torchrun's workers) are not counted: they are processes of their own.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


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
