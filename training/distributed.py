"""The training entry point torchrun starts: one rank of a DistributedDataParallel run.

    python -m torch.distributed.run --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] \\
        -m training.distributed --data RUN/data.npz --labels RUN/labels.txt --out DIR \\
        --model-config JSON --train-config JSON --dataset-sha256 SHA

The train stage builds this command (``launch_command``); on other machines the same
command runs with their ``--node-rank``. Every rank reads the same arrays and trains
with :func:`training.train.train`; gloo on CPU, nccl when CUDA is available. Rank 0 alone
writes the checkpoint (the unwrapped module: no ``module.`` prefix) and ``metrics.json``
into ``--out``, each through a temporary name and one rename; the pipeline records and
tracks them, so no rank talks to MLflow. Each rank writes one progress line per epoch
(with its pid) to its stdout, which torchrun keeps in its log directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("training.distributed")

CHECKPOINT = "model.pt"
METRICS = "metrics.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.distributed", allow_abbrev=False,
                                     description="One rank of crossport's distributed training (started by torchrun).")
    parser.add_argument("--data", type=Path, required=True, help="the run's data.npz")
    parser.add_argument("--labels", type=Path, required=True, help="the run's labels.txt")
    parser.add_argument("--out", type=Path, required=True, help="where rank 0 writes model.pt and metrics.json")
    parser.add_argument("--model-config", required=True, help="training.model.ModelConfig as JSON")
    parser.add_argument("--train-config", required=True, help="training.train.TrainConfig as JSON")
    parser.add_argument("--dataset-sha256", required=True, help="recorded in the checkpoint")
    parser.add_argument("--threads", type=int, help="PyTorch threads per rank (default: this machine's cores shared "
                                                    "out between its ranks)")
    return parser


def threads_per_rank(local_world_size: int) -> int:
    """The cores this machine has, shared out between the ranks it runs (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_world_size, 1))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    import torch.distributed as dist

    from crossport.files import write_json_atomic
    from training.checkpoint import save_checkpoint
    from training.model import ModelConfig
    from training.train import TrainConfig, World, evaluate, split_validation, train

    args = build_parser().parse_args(argv)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} pid {os.getpid()} %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    torch.set_num_threads(args.threads or threads_per_rank(local_size))
    cuda = torch.cuda.is_available()
    device = None
    if cuda:
        # deterministic cuBLAS needs a fixed workspace (torch.use_deterministic_algorithms refuses otherwise)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        with np.load(args.data) as arrays:
            x_train, y_train, x_test, y_test = (arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        labels = tuple(args.labels.read_text().splitlines())
        model_config = ModelConfig.from_dict(json.loads(args.model_config))
        train_config = TrainConfig(**json.loads(args.train_config))
        log.info("started: world size %d, %d threads, backend %s", size, torch.get_num_threads(),
                 dist.get_backend())
        x_fit, y_fit, x_val, y_val = split_validation(x_train, y_train, train_config.seed)
        model, metrics = train(x_fit, y_fit, x_val, y_val, model_config, train_config, progress=False,
                               world=World(rank, size), device=device,
                               on_epoch=lambda row: log.info("epoch %d done", row["epoch"]))
        if rank == 0:
            metrics["test_accuracy"] = evaluate(model, x_test, y_test)  # the test split, once, at the end
            args.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(args.out / CHECKPOINT, model, labels, args.dataset_sha256, metrics, train_config)
            write_json_atomic(args.out / METRICS, metrics)
        dist.barrier()  # nobody leaves before rank 0 has written
        log.info("done")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
