"""Start distributed training with PyTorch's own launcher (torchrun) and report how it ended.

The train stage calls :func:`run_distributed` when the world is larger than one process:
torchrun (``python -m torch.distributed.run``) starts :mod:`training.distributed` once per
rank, keeps each rank's output in its log directory, and — with no restarts — stops every
rank when one fails. A failure comes back as one :class:`TrainingError` naming the first
rank that failed, how it ended, and its last lines of output.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from crossport.errors import TrainingError

log = logging.getLogger(__name__)

TAIL_LINES = 8
RDZV_ID = "crossport"  # the rendezvous id every node of one run shares


@dataclass(frozen=True)
class Launch:
    nproc: int = 1  # processes on this machine
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of node 0; None: a single machine (torchrun --standalone)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def launch_command(launch: Launch, *, data: Path, labels: Path, out: Path, log_dir: Path, model_config,
                   train_config, dataset_sha256: str, threads: int | None = None,
                   python: str = sys.executable) -> list[str]:
    """The torchrun command for this node (other nodes run the same with their ``node_rank``)."""
    command = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(launch.nproc),
               "--max-restarts", "0", "--log-dir", str(log_dir), "--redirects", "3"]
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        command.append("--standalone")
    else:
        # the static rendezvous: node R's ranks are R·nproc .. R·nproc + nproc − 1, so a run's rank layout and
        # result do not depend on which node joins first
        command += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank), "--rdzv-backend", "static",
                    "--rdzv-endpoint", launch.rdzv_endpoint or "127.0.0.1:29400", "--rdzv-id", RDZV_ID]
    return [*command, "-m", "training.distributed", "--data", str(data), "--labels", str(labels), "--out", str(out),
            "--model-config", json.dumps(asdict(model_config)), "--train-config", json.dumps(asdict(train_config)),
            "--dataset-sha256", dataset_sha256, *(["--threads", str(threads)] if threads else [])]


def run_distributed(command: list[str], *, log_dir: Path, out: Path, world_size: int, lead: bool = True) -> dict:
    """Run ``command``; return rank 0's metrics (``lead``: rank 0 runs here), or raise one TrainingError naming
    the rank that failed first."""
    from training.distributed import CHECKPOINT, METRICS

    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and not lead:
        return {}
    if result.returncode == 0 and (out / CHECKPOINT).is_file() and (out / METRICS).is_file():
        return json.loads((out / METRICS).read_text())
    failures = rank_failures(result.stderr)
    outputs = {failure.rank: rank_output(log_dir, failure.rank) for failure in failures}
    if failures and all(finished(log_dir, f.rank) for f in failures) and (
            not lead or ((out / CHECKPOINT).is_file() and (out / METRICS).is_file())):
        # every failed rank had passed the final barrier (rank 0's files were whole by then) and logged "done": it
        # died closing its process group (gloo aborts a rank whose peer closed first), after the work was complete
        ended = blame(failures, outputs)  # the first to end in front, as in a failure's message
        log.warning("training finished, then rank(s) %s ended while closing the process group (%s); the checkpoint "
                    "is complete", ", ".join(str(f.rank) for f in ended), "; ".join(f.how for f in ended))
        return json.loads((out / METRICS).read_text()) if lead else {}
    if not failures:
        tail = "; ".join(result.stderr.strip().splitlines()[-3:]) or "no output"
        raise TrainingError(f"torchrun exited with code {result.returncode} before any rank reported: {tail}.",
                            hint="Check --nproc, --nnodes and --rdzv-endpoint; run with --debug for the details.")
    first, *others = blame(failures, outputs)
    lines = outputs[first.rank]
    after = "".join(f" Rank {other.rank} ended too ({other.how})." for other in others)
    raise TrainingError(
        f"training rank {first.rank} of {world_size} failed ({first.how}); its last lines: "
        + (" | ".join(lines) if lines else "(none)") + f".{after} Nothing was recorded or published.",
        hint=f"Fix the cause and re-run --stage train --run-dir {Path(log_dir).parent}; every rank's output is in "
             f"{log_dir}.")


# Signals a rank does not send itself: an operator, a scheduler or the kernel's OOM killer ended it. Not SIGTERM:
# torchrun itself stops the ranks still running with it once one has failed, so a SIGTERM beside another failure
# is most likely torchrun's own (it is blamed last).
OUTSIDE_SIGNALS = frozenset({"SIGKILL", "SIGINT", "SIGHUP", "SIGQUIT"})
# What a rank prints when the rank it was talking to vanished (gloo, c10d's store, the socket layer).
PEER_VANISHED = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|"
                           r"connection closed|peer closed", re.IGNORECASE)


@dataclass(frozen=True)
class RankFailure:
    """One entry of torchrun's failure summary."""

    rank: int
    exitcode: int
    signal: str | None  # e.g. "SIGKILL", when a signal ended the rank
    error_file: bool  # the rank wrote torchrun's error file: its timestamp is when it failed, not when seen
    timestamp: str  # ISO time, comparable as text

    @property
    def how(self) -> str:
        if self.signal:
            return f"killed by signal {self.signal}"
        return f"killed by signal {-self.exitcode}" if self.exitcode < 0 else f"exit code {self.exitcode}"


ENTRY = re.compile(r"^\s*\[\d+\]:", re.MULTILINE)  # each failure of torchrun's summary starts "[i]:"


def rank_failures(stderr: str) -> list[RankFailure]:
    """Every failed rank of torchrun's failure summary, the one torchrun calls the root cause first.

    Each entry reads ``time : ISO``, ``rank : R (local_rank: L)``, ``exitcode : C (pid: P) (SIGNAME)``,
    ``error_file: PATH or <N/A>``.
    """
    summary = stderr[stderr.rfind("Failures:"):] if "Failures:" in stderr else stderr
    others, _, root = summary.partition("Root Cause")
    found: dict[int, RankFailure] = {}
    for block in ENTRY.split(root) + ENTRY.split(others):
        rank = re.search(r"rank\s*:\s*(\d+)", block)
        if not rank or int(rank.group(1)) in found:
            continue
        code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
        signal = re.search(r"\((SIG[A-Z0-9]+)\)", block)
        error_file = re.search(r"error_file\s*:\s*(\S+)", block)
        time = re.search(r"time\s*:\s*(\S+)", block)
        found[int(rank.group(1))] = RankFailure(
            rank=int(rank.group(1)), exitcode=int(code.group(1)) if code else 1,
            signal=signal.group(1) if signal else None,
            error_file=bool(error_file) and error_file.group(1) != "<N/A>", timestamp=time.group(1) if time else "")
    return list(found.values())


def blame(failures: list[RankFailure], outputs: dict[int, list[str]]) -> list[RankFailure]:
    """The failed ranks, the one that failed first in front.

    torchrun names as root cause the failure with the smallest timestamp, in whole seconds; a rank that wrote no
    error file (one killed by a signal, or aborted from native code) gets the second torchrun noticed it, so two
    ranks seen in one poll tie and the lower rank wins — the one that aborted because its peer vanished, not the
    peer. So: a rank ended by an outside signal comes first; then one that failed on its own; then a rank that
    aborted (SIGABRT) or reported that its peer vanished; a rank stopped by SIGTERM (torchrun's way of stopping the
    others) last. Within a class, error-file timestamps (when the rank failed) decide, then torchrun's order.
    """

    def cause(failure: RankFailure) -> int:
        if failure.signal in OUTSIDE_SIGNALS:
            return 0
        if failure.signal == "SIGTERM":
            return 3
        if failure.signal == "SIGABRT" or any(PEER_VANISHED.search(line) for line in outputs.get(failure.rank, [])):
            return 2
        return 1

    order = {failure.rank: index for index, failure in enumerate(failures)}
    return sorted(failures, key=lambda f: (cause(f), f.timestamp if f.error_file else "~", order[f.rank]))


def finished(log_dir: Path, rank: int) -> bool:
    """The rank's last line of output is its "done", which it logs after the final barrier."""
    lines = [line for path in Path(log_dir).glob(f"**/attempt_*/{rank}/stdout.log")
             for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return bool(lines) and lines[-1].endswith(" done")


def rank_output(log_dir: Path, rank: int) -> list[str]:
    """The last lines a rank wrote (torchrun keeps <log_dir>/<run>/attempt_<n>/<rank>/{stdout,stderr}.log)."""
    found = sorted(Path(log_dir).glob(f"**/attempt_*/{rank}/*.log"), key=lambda p: p.stat().st_mtime)
    lines: list[str] = []
    for path in found:
        lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-TAIL_LINES:]
