"""The data stage: a dataset's files in the run directory (the import stage writes the same files)."""

from __future__ import annotations

import logging

import numpy as np

from crossport.files import save_npz_atomic, write_bytes_atomic
from pipelines.results import DatasetToLog, Made, StageResult
from pipelines.stages.context import CALIBRATION_SIZE, GOLDEN_SIZE, Context

log = logging.getLogger(__name__)


def write_data(ctx: Context, dataset) -> StageResult:
    """A dataset's files in the run directory: arrays, labels, the golden batch, the calibration images."""
    config = ctx.config
    run_dir = ctx.run_dir
    save_npz_atomic(run_dir / "data.npz", x_train=dataset.x_train, y_train=dataset.y_train,
                    x_test=dataset.x_test, y_test=dataset.y_test)
    write_bytes_atomic(run_dir / "labels.txt", ("\n".join(dataset.labels) + "\n").encode())
    save_npz_atomic(run_dir / "golden.npz", images=dataset.x_test[:GOLDEN_SIZE], labels=dataset.y_test[:GOLDEN_SIZE])
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(dataset.x_train), size=min(CALIBRATION_SIZE, len(dataset.x_train)), replace=False)
    save_npz_atomic(run_dir / "calibration.npz", images=dataset.x_train[np.sort(pick)])
    digest = dataset.digest
    ctx.manifest.facts["dataset"] = {
        "name": dataset.name, "source": dataset.source, "digest": digest,
        "num_classes": len(dataset.labels), "train_examples": len(dataset.y_train),
        "test_examples": len(dataset.y_test),
    }
    log.info("dataset %s: %d train, %d test, %d classes, digest %s", dataset.name, len(dataset.y_train),
             len(dataset.y_test), len(dataset.labels), digest[:12])
    return StageResult(
        made=[Made("dataset", run_dir / "data.npz"), Made("labels", run_dir / "labels.txt", ("dataset",)),
              Made("golden", run_dir / "golden.npz", ("dataset",)),
              Made("calibration", run_dir / "calibration.npz", ("dataset",))],
        params={"dataset": dataset.name, "dataset_digest": digest, "dataset_source": dataset.source},
        metrics={"train_examples": len(dataset.y_train), "test_examples": len(dataset.y_test),
                 "num_classes": len(dataset.labels)},
        log_artifacts=[run_dir / "labels.txt"],
        dataset=DatasetToLog(dataset.name, digest, dataset.source, run_dir / "data.npz",
                             dataset.x_test, dataset.y_test),
    )


def data_stage(ctx: Context) -> StageResult:
    from training.data import data_dir_from, load_dataset

    config = ctx.config
    return write_data(ctx, load_dataset(config.dataset, data_dir_from(config.data_dir), seed=config.seed))
