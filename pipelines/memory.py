"""Peak resident memory, stage by stage: the kernel's high-water mark of this process (VmHWM), reset when a stage
starts, so each stage reports the most it held itself rather than the most any earlier stage did.

Linux resets the mark when "5" is written to /proc/self/clear_refs (proc(5)). Where that is refused, or there is
no /proc, each figure is the process's peak so far (getrusage), which is never below the stage's own.
Child processes (torchrun's workers) are not counted: they are processes of their own.
"""

from __future__ import annotations

from pathlib import Path

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_process_peak = 0.0  # the most of any stage reset away, so that the process's own peak is not lost


def peak_gib() -> float:
    """The most this process has held since the last :func:`reset_peak` (since it started, if never reset)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def reset_peak() -> bool:
    """Start a new high-water mark at what the process holds now; False where the kernel does not allow it."""
    global _process_peak
    _process_peak = max(_process_peak, peak_gib())
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def process_peak_gib() -> float:
    """The most this process has held since it started, across every reset."""
    return max(_process_peak, peak_gib())
