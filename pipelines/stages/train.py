"""The train stage: in this process, or across processes with torchrun; a diverged training is refused."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crossport.errors import TrainingError
from pipelines.results import Made, ModelToLog, StageResult
from pipelines.stages.context import Context, golden_inputs, load_arrays, read_labels

log = logging.getLogger(__name__)


def training_configs(config, num_classes: int):
    """The model and training-loop configs a run's settings give (the train stage and every node of a
    distributed run build them the same way)."""
    from training.model import ModelConfig
    from training.train import TrainConfig

    return (ModelConfig(arch=config.model, num_classes=num_classes),
            TrainConfig(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                        seed=config.seed, patience=config.patience))


def launch_of(config):
    """This machine's share of a distributed run (training.launch.Launch)."""
    from training.launch import Launch

    return Launch(config.nproc, config.nnodes, config.node_rank, config.rdzv_endpoint)


def train_stage(ctx: Context) -> StageResult:
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.model import ARCHITECTURES, macs_per_example
    from training.train import evaluate, split_validation, train

    arrays = load_arrays(ctx)
    labels = read_labels(ctx)
    config = ctx.config
    model_config, train_config = training_configs(config, len(labels))
    path = ctx.run_dir / "model.pt"
    if config.nproc * config.nnodes == 1:
        # popped: the split's two parts are copies, and the whole split is not kept beside them (0.55 GB at full size)
        x_fit, y_fit, x_val, y_val = split_validation(arrays.pop("x_train"), arrays.pop("y_train"), config.seed)
        model, metrics = train(x_fit, y_fit, x_val, y_val, model_config, train_config)
        refuse_diverged(metrics, train_config)
        metrics["test_accuracy"] = evaluate(model, arrays["x_test"], arrays["y_test"])  # once, at the end
        save_checkpoint(path, model, labels, ctx.manifest.artifacts["dataset"].sha256, metrics, train_config)
    else:
        metrics = train_distributed(ctx, model_config, train_config, path)
    reloaded = load_checkpoint(path)
    model = reloaded.model
    accuracy = evaluate(reloaded.model, arrays["x_test"], arrays["y_test"])
    ctx.manifest.facts["test_accuracy"] = accuracy
    ctx.manifest.facts["model"] = {"arch": model_config.arch, "summary": ARCHITECTURES[model_config.arch].summary,
                                   "parameters": sum(p.numel() for p in model.parameters()),
                                   "macs_per_example": macs_per_example(model)}
    from pipelines.reports import training_curves_png

    curves = ctx.run_dir / "training_curves.png"
    training_curves_png(curves, metrics["history"])
    history = {f"epoch_{row['epoch']}_val_accuracy": row["val_accuracy"] for row in metrics["history"]}
    ctx.manifest.facts["best_epoch"] = metrics.get("best_epoch")
    return StageResult(
        made=[Made("checkpoint", path, ("dataset", "labels"))],
        params={"epochs": config.epochs, "patience": config.patience, "batch_size": config.batch_size,
                "learning_rate": config.learning_rate, "seed": config.seed, "model": config.model,
                "dropout": model_config.dropout,
                "world_size": config.nproc * config.nnodes,
                **({"hidden_sizes": str(model_config.hidden_sizes)} if config.model == "mlp" else
                   {"channels": str(model_config.channels)}),
                "macs_per_example": macs_per_example(model)},
        metrics={"test_accuracy": accuracy, "train_loss": metrics["train_loss"],
                 "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics["best_epoch"], **history},
        log_artifacts=[path, curves],
        models=[ModelToLog("pytorch", path, golden_inputs(ctx)[:4])],
    )


def refuse_diverged(metrics: dict, train_config) -> None:
    """Stop at train, before a checkpoint is kept, when the model kept is a diverged one."""
    from training.train import divergence

    reason = divergence(metrics, train_config.learning_rate)
    if reason is not None:
        raise TrainingError(reason)


def train_distributed(ctx: Context, model_config, train_config, path: Path) -> dict:
    """The train stage across processes: torchrun starts training.distributed per rank; rank 0's checkpoint
    becomes the run's model.pt. Its output (``ddp/``) and every rank's log (``torchrun/``) are the stage's own."""
    import shlex
    import shutil

    from training.launch import launch_command, run_distributed

    config = ctx.config
    launch = launch_of(config)
    out, log_dir = ctx.run_dir / "ddp", ctx.run_dir / "torchrun"
    for own in (out, log_dir):  # written by this stage only: a re-run starts clean
        shutil.rmtree(own, ignore_errors=True)
    command = launch_command(launch, data=ctx.input("dataset"), labels=ctx.input("labels"), out=out,
                             log_dir=log_dir, model_config=model_config, train_config=train_config,
                             dataset_sha256=ctx.manifest.artifacts["dataset"].sha256, threads=config.threads)
    log.info("training on %d processes (%d per node, %d node%s): %s", launch.world_size, launch.nproc,
             launch.nnodes, "s" if launch.nnodes > 1 else "", shlex.join(command))
    if launch.nnodes > 1:
        log.info("on node R of the others, with this run directory shared or copied: python -m pipelines.run "
                 "--stage train --run-dir %s --nproc %d --nnodes %d --node-rank R --rdzv-endpoint %s", ctx.run_dir,
                 launch.nproc, launch.nnodes, launch.rdzv_endpoint)
    metrics = run_distributed(command, log_dir=log_dir, out=out, world_size=launch.world_size)
    refuse_diverged(metrics, train_config)
    os.replace(out / "model.pt", path)
    return metrics
