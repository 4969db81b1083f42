"""A rank program for torchrun that fails the way a real run did: rank 1 is killed from outside, and rank 0,
whose peer has vanished, aborts a moment later — both inside one of torchrun's monitor intervals.

    python -m torch.distributed.run --nproc-per-node 2 --monitor-interval 2 ... -m tests.fault_ranks MEETING_DIR

Rank 1 publishes its pid and waits to be killed; rank 0 kills it (SIGKILL), waits until the kernel says it is dead,
then calls abort() as a rank does on a gloo "Connection reset by peer". torchrun then sees both failures in one
poll, stamps both with the same second, and names the lower rank — rank 0 — as the root cause.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tests.helpers import wait_until


def dead(pid: int) -> bool:
    """Killed and not yet reaped by torchrun (a zombie), or already reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def finish_then_abort(rank: int, out: Path) -> None:
    """The teardown race, in the order it was seen: both ranks finish (rank 0's files written, each logs "done" as
    after the final barrier), then rank 1 aborts, as gloo aborts a rank whose peer closed the process group first,
    while rank 0 is still closing, so torchrun stops it (SIGTERM). Each step waits for the one before it."""
    import json

    done = out.parent / "rank0.done"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.pt").write_bytes(b"a checkpoint")
        (out / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    print(f"rank {rank} pid {os.getpid()} done", flush=True)
    if rank == 0:
        done.touch()
        while True:  # still closing its group when torchrun stops it
            signal.pause()
    wait_until(done.is_file, "rank 0 to finish", timeout=60, interval=0.005)
    os.abort()


def main() -> None:
    rank, meeting = int(os.environ["RANK"]), Path(sys.argv[1])
    print(f"rank {rank} pid {os.getpid()} started", flush=True)
    if len(sys.argv) > 2 and sys.argv[2] == "teardown":
        finish_then_abort(rank, meeting / "out")
        return
    pid_file = meeting / "rank1.pid"
    if rank == 1:
        partial = pid_file.with_suffix(".partial")
        partial.write_text(str(os.getpid()))
        partial.replace(pid_file)  # whole, or not there
        while True:
            signal.pause()
    wait_until(pid_file.is_file, "rank 1's pid file", timeout=60, interval=0.005)
    peer = int(pid_file.read_text())
    os.kill(peer, signal.SIGKILL)
    wait_until(lambda: dead(peer), "rank 1 to die", timeout=60, interval=0.005)
    print("rank 0: peer vanished (Connection reset by peer); aborting", flush=True)
    os.abort()


if __name__ == "__main__":
    main()
