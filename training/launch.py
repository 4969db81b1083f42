"""Start distributed training with PyTorch's own launcher (torchrun) and report how it ended.

The train stage calls :func:`run_distributed` when the world is larger than one process:
torchrun (``python -m torch.distributed.run``) starts :mod:`training.distributed` once per
rank, keeps each rank's output in its log directory, and — with no restarts — stops every
rank when one fails. A failure comes back as one :class:`TrainingError` naming the first
rank that failed, how it ended, and its last lines of output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from crossport.errors import TrainingError

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
    the failed rank."""
    from training.distributed import CHECKPOINT, METRICS

    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 and not lead:
        return {}
    if result.returncode == 0 and (out / CHECKPOINT).is_file() and (out / METRICS).is_file():
        return json.loads((out / METRICS).read_text())
    rank, how = failed_rank(result.stderr)
    if rank is None:
        tail = "; ".join(result.stderr.strip().splitlines()[-3:]) or "no output"
        raise TrainingError(f"torchrun exited with code {result.returncode} before any rank reported: {tail}.",
                            hint="Check --nproc, --nnodes and --rdzv-endpoint; run with --debug for the details.")
    lines = rank_output(log_dir, rank)
    raise TrainingError(
        f"training rank {rank} of {world_size} failed ({how}); its last lines: "
        + (" | ".join(lines) if lines else "(none)") + ". Nothing was recorded or published.",
        hint=f"Fix the cause and re-run --stage train --run-dir {Path(log_dir).parent}; every rank's output is in "
             f"{log_dir}.")


def failed_rank(stderr: str) -> tuple[int | None, str]:
    """The first failed rank and how it ended, from torchrun's failure summary ("Root Cause")."""
    root = stderr.split("Root Cause", 1)[-1] if "Root Cause" in stderr else stderr
    match = re.search(r"rank\s*:\s*(\d+)", root)
    if not match:
        return None, ""
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    signal = re.search(r"Signal (\d+) \((\w+)\)", root)
    if signal:
        how = f"killed by signal {signal.group(2)}"
    elif code and int(code.group(1)) < 0:
        how = f"killed by signal {-int(code.group(1))}"
    else:
        how = f"exit code {code.group(1)}" if code else "failed"
    return int(match.group(1)), how


def rank_output(log_dir: Path, rank: int) -> list[str]:
    """The last lines a rank wrote (torchrun keeps <log_dir>/<run>/attempt_<n>/<rank>/{stdout,stderr}.log)."""
    found = sorted(Path(log_dir).glob(f"**/attempt_*/{rank}/*.log"), key=lambda p: p.stat().st_mtime)
    lines: list[str] = []
    for path in found:
        lines += [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-TAIL_LINES:]
