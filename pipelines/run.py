"""``python -m pipelines.run``: the crossport command line.

Thin on purpose: it parses flags into a :class:`PipelineConfig`, opens the run directory,
runs the selected stages and prints a summary. Every ``CrossportError`` becomes one line
on stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crossport.errors import ConfigError, CrossportError

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig

log = logging.getLogger("crossport")


def channel_values(text: str) -> tuple[float, ...]:
    """``0.5`` or ``0.485,0.456,0.406``: one number, or one per channel."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number or one per channel separated by commas, found "
                                         f"{text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    # The stage table and the dataset list are the single sources of these choices; both
    # modules import only numpy, so --help stays fast.
    from pipelines.config import ARCHITECTURE_NAMES, INT8_FALLBACK, UNDECIDED_POLICIES
    from pipelines.stages import STAGE_NAMES
    from training.data import DATASETS

    parser = argparse.ArgumentParser(allow_abbrev=False,
        prog="python -m pipelines.run",
        description="Train an EMNIST model in PyTorch (or bring one as an ONNX file with --onnx) and publish "
                    "parity-checked TensorFlow servables "
                    "(ONNX, SavedModel with predict/classify signatures, TFLite).",
    )
    parser.add_argument("--stage", default="all", choices=("all", *STAGE_NAMES),
                        help="stage to run; a single stage runs against an existing --run-dir (default: all)")
    parser.add_argument("--run-dir", type=Path,
                        help="run directory (default: a new runs/<timestamp>-<id> for 'all', the latest run otherwise)")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset (default: auto)")
    parser.add_argument("--data-dir", help="where EMNIST's gzip.zip is or goes (default: $CROSSPORT_DATA_DIR "
                                           "or ~/.cache/crossport/data)")
    parser.add_argument("--model", choices=ARCHITECTURE_NAMES,
                        help="architecture to train (default: mlp); --name defaults to emnist_<model>")
    parser.add_argument("--epochs", type=int, help="training epochs (default: 10)")
    parser.add_argument("--patience", type=int,
                        help="stop training after N epochs without a better validation accuracy (default: run every "
                             "epoch); the best epoch is kept either way")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: 128)")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, help="random seed for data split and training (default: 0)")
    parser.add_argument("--models-dir", help="published model repository (default: models)")
    parser.add_argument("--serving-root", help="where TF Serving sees --models-dir: models.config's base paths are "
                                               "<serving-root>/<name> (default: /models, the usual container "
                                               "mount; '' for this machine's absolute paths)")
    parser.add_argument("--name", help="model name under the models directory (default: emnist_mlp)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///<repo>/mlflow/mlflow.db)")
    parser.add_argument("--no-tracking", action="store_true", help="run without MLflow")
    parser.add_argument("--republish", action="store_true",
                        help="publish a new version even when the newest one already holds exactly these model "
                             "files (default: report it and publish nothing)")
    parser.add_argument("--undecided", choices=UNDECIDED_POLICIES,
                        help="a lossy TFLite variant the test split is too small to judge: 'publish' it marked "
                             "unverified, or 'omit' it from the published version (default: publish)")
    parser.add_argument("--int8-fallback", choices=INT8_FALLBACK,
                        help="when int8_full fails the gate (or is undecided, with --undecided omit): 'auto' "
                             "searches for the fewest layers to keep in float that pass it and publishes that file as "
                             "int8_mixed; 'off' does not (default: auto)")
    parser.add_argument("--int8-max-drop", type=float, metavar="POINTS",
                        help="the most accuracy points int8_full may lose against the float model, judged at the "
                             "gate's confidence; a variant that may lose more is undecided or fails, and with "
                             "--undecided omit an undecided int8_full is searched like a failed one (default: 1)")
    parser.add_argument("--threads", type=int,
                        help="threads per runtime when checking artifacts, and per training process with --nproc "
                             "(default: each runtime's own; for training, the cores shared out between the processes)")
    parser.add_argument("--force", action="store_true",
                        help="with --stage all on an existing run directory, redo every stage instead of "
                             "skipping those whose inputs, config and outputs are unchanged")
    dist = parser.add_argument_group("distributed training (torchrun, DistributedDataParallel)")
    dist.add_argument("--nproc", type=int, help="training processes on this machine (default: 1, in-process)")
    dist.add_argument("--nnodes", type=int, help="machines taking part (default: 1)")
    dist.add_argument("--node-rank", type=int, help="this machine's rank, 0..nnodes-1 (default: 0: the one that "
                                                    "runs the pipeline and records the checkpoint)")
    dist.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0, where the nodes meet (needed with --nnodes > 1)")
    add_bring_flags(parser.add_argument_group("bring your own model (instead of training one)"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


START_FROM = "start the run from this ONNX file (trained anywhere): an import stage replaces data, train and export"


def add_bring_flags(group, onnx_help: str = START_FROM) -> None:
    """The flags that bring a model as an ONNX file (``--onnx`` and what reads it), on ``group``: the pipeline's, and
    ``pipelines.check``'s for a file converted from a model that never went through crossport."""
    from pipelines.config import EVAL_ORIENTATIONS, ORIENTATION_CHOICES

    group.add_argument("--onnx", help=onnx_help)
    group.add_argument("--eval-data", help="evaluation and calibration data for --onnx: an .npz (images, labels; "
                                           "EMNIST orientation unless --eval-orientation says), a folder with one "
                                           "sub-folder of images per label, or a dataset name (default: the built-in "
                                           "dataset with as many classes)")
    group.add_argument("--mean", type=channel_values, help="the --onnx model expects (x − mean) / std of images in "
                                                           "[0, 1], one value or one per channel (e.g. MNIST's 0.1307; "
                                                           "ImageNet's 0.485,0.456,0.406): computed inside the graph")
    group.add_argument("--std", type=channel_values, help="with --mean: the standard deviation(s) (e.g. MNIST's "
                                                          "0.3081; ImageNet's 0.229,0.224,0.225)")
    group.add_argument("--eval-orientation", choices=EVAL_ORIENTATIONS,
                       help="which way up an --eval-data .npz holds its images: emnist (transposed, crossport's "
                            "arrays; the default) or upright (as people see them)")
    group.add_argument("--labels", dest="labels_file",
                       help="label file for --onnx, one per line (default: the file's metadata, else the built-in "
                            "EMNIST split with as many classes, else class ids)")
    group.add_argument("--orientation", choices=ORIENTATION_CHOICES,
                       help="which way up the --onnx model wants its images: upright (as people see them) or emnist "
                            "(transposed, crossport's contract); default auto: detected from the evaluation data")


@dataclass(frozen=True)
class Invocation:
    """What a command line asks for, checked: the stage, the run directory and the resolved config."""

    stage: str
    run_dir: Path
    config: PipelineConfig
    force: bool = False
    debug: bool = False


def main(argv: list[str] | None = None) -> int:
    from crossport.console import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: execute(resolve(args)), debug=args.debug)


def resolve_config(argv: list[str]) -> Invocation:
    """The command line ``argv`` checked and resolved, touching nothing: every flag's range, every combination, and
    what an existing run directory's manifest says. Raises the ``CrossportError`` the command would report (argparse's
    own refusals exit 2, as on the command line)."""
    return resolve(build_parser().parse_args(argv))


def resolve(args: argparse.Namespace) -> Invocation:
    from pipelines.config import PipelineConfig
    from pipelines.manifest import Manifest
    from pipelines.runner import latest_run_dir, new_run_dir

    if args.no_tracking and args.tracking_uri:
        raise ConfigError("--no-tracking and --tracking-uri contradict each other.", hint="Pass only one of them.")
    if args.force and args.stage != "all":
        raise ConfigError(f"--force applies to --stage all; a single stage (--stage {args.stage}) always runs.",
                          hint="Drop --force, or use --stage all --force.")
    overrides = {
        "dataset": args.dataset, "model": args.model, "data_dir": args.data_dir, "epochs": args.epochs,
        "patience": args.patience, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "seed": args.seed,
        "models_dir": args.models_dir, "name": args.name, "serving_root": args.serving_root,
        "tracking_uri": args.tracking_uri, "tracking": False if args.no_tracking else None,
        "undecided": args.undecided, "int8_fallback": args.int8_fallback,
        "int8_max_drop": args.int8_max_drop, "threads": args.threads,
        "onnx": args.onnx, "eval_data": args.eval_data, "labels_file": args.labels_file,
        "orientation": args.orientation, "eval_orientation": args.eval_orientation, "mean": args.mean,
        "std": args.std,
        "nproc": args.nproc, "nnodes": args.nnodes, "node_rank": args.node_rank,
        "rdzv_endpoint": args.rdzv_endpoint, "republish": args.republish,  # per invocation: never inherited
    }
    check_import_flags(args)
    if args.stage == "all":
        run_dir = args.run_dir or new_run_dir()
        check_run_dir(run_dir)
        base = PipelineConfig()
        if (run_dir / "manifest.json").is_file():
            base = PipelineConfig.from_dict(Manifest.load(run_dir).config)
        if args.model and not args.name and base.model != args.model:
            overrides["name"] = f"emnist_{args.model}"  # a new architecture is a new model in the repository
        if args.onnx and not args.name and base.onnx != args.onnx:
            overrides["name"] = name_from_file(Path(args.onnx))
        config = base.override(**overrides)
        if (run_dir / "manifest.json").is_file() and base.route != config.route:
            kinds = {"import": "from an ONNX file", "train": "trained here"}
            raise ConfigError(f"--run-dir {run_dir} holds a run {kinds[base.route]}; this one is "
                              f"{kinds[config.route]}.", hint="Pass a new --run-dir.")
    else:
        run_dir = args.run_dir or latest_run_dir()
        if run_dir is None:
            raise ConfigError(f"--stage {args.stage} needs an existing run directory and none was found in runs/.",
                              hint="Pass --run-dir, or run --stage all first.")
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--run-dir {run_dir} is a file, expected a run directory.",
                              hint="Pass the directory of an earlier run.")
        config = PipelineConfig.from_dict(Manifest.load(run_dir).config).override(**overrides)

    if args.tracking_uri and not config.tracking:
        raise ConfigError(f"--tracking-uri {args.tracking_uri} was given, but run {run_dir} was made with "
                          "--no-tracking: only this stage would be tracked, without the runs before it.",
                          hint="Drop --tracking-uri, or start a new run (a new --run-dir) to track it from the start.")
    return Invocation(args.stage, run_dir, config, force=args.force, debug=args.debug)


def execute(invocation: Invocation) -> int:
    """Run what :func:`resolve` checked: this machine's ranks on a node other than 0, else the stages."""
    from pipelines.runner import open_run, run_stages, select
    from pipelines.summary import summary
    from pipelines.tracking import make_tracker

    config, run_dir, stage, debug = invocation.config, invocation.run_dir, invocation.stage, invocation.debug
    if config.node_rank != 0:
        return train_on_other_node(run_dir, config, stage)
    from crossport.console import LOG_NAME, quiet_console

    selected = select(stage, config)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # the frameworks' output (native code included) goes to run.log; crossport's own lines stay on the terminal
    with quiet_console(run_dir / LOG_NAME, debug):
        try:
            tracker = make_tracker(config.tracking, config.tracking_uri, config.name)  # fails fast when unreachable
        except CrossportError:
            if created:  # stopped before any work: leave no run directory behind, only the one line
                (run_dir / LOG_NAME).unlink(missing_ok=True)
                run_dir.rmdir()
            raise
        manifest = open_run(run_dir, config, fresh=stage == "all")
        log.info("run directory %s (library output in %s)", run_dir, run_dir / LOG_NAME)
        resume = stage == "all" and not invocation.force
        walls = run_stages(manifest, config, selected, tracker, resume=resume)
        skipped = [chosen.name for chosen in selected if chosen.name not in walls]
        sys.stdout.write(summary(manifest, walls, tracker.uri, skipped) + "\n")
    return 0


def train_on_other_node(run_dir: Path, config, stage: str) -> int:
    """Node R > 0 of a multi-machine run: start this machine's ranks and wait for them; node 0 records.

    It reads the run directory (shared, or a copy made after the data stage) and writes nothing there:
    no lock, no manifest change, its ranks' logs in a temporary folder.
    """
    import tempfile

    from pipelines.manifest import Manifest
    from pipelines.stages.train import launch_of, training_configs
    from training.launch import launch_command, run_distributed

    if stage != "train":
        raise ConfigError(f"--node-rank {config.node_rank} runs this machine's share of --stage train; node 0 runs "
                          "the rest of the pipeline.", hint="Pass --stage train on this machine.")
    manifest = Manifest.load(run_dir)
    data, labels = manifest.require("dataset", for_stage="train"), manifest.require("labels", for_stage="train")
    launch = launch_of(config)
    model_config, train_config = training_configs(config, len(labels.read_text().splitlines()))
    with tempfile.TemporaryDirectory(prefix="crossport-node-") as scratch:
        command = launch_command(launch, data=data, labels=labels, out=Path(scratch) / "ddp",
                                 log_dir=Path(scratch) / "torchrun", model_config=model_config,
                                 train_config=train_config, dataset_sha256=manifest.artifacts["dataset"].sha256,
                                 threads=config.threads)
        log.info("node %d of %d: starting %d rank(s)", config.node_rank, config.nnodes, config.nproc)
        run_distributed(command, log_dir=Path(scratch) / "torchrun", out=Path(scratch) / "ddp",
                        world_size=launch.world_size, lead=False)
    sys.stdout.write(f"node {config.node_rank} of {config.nnodes}: its {config.nproc} rank(s) finished; node 0 "
                     "records the checkpoint\n")
    return 0


TRAINING_FLAGS = ("model", "epochs", "patience", "batch_size", "learning_rate")
IMPORT_FLAGS = ("eval_data", "labels_file", "orientation", "eval_orientation", "mean", "std")


def check_import_flags(args: argparse.Namespace) -> None:
    """Training flags mean nothing for a model brought as a file, and import flags nothing without one."""
    if args.onnx and args.stage != "all":
        raise ConfigError(f"--onnx starts a run (--stage all); --stage {args.stage} re-runs a stage of an existing "
                          "run.", hint="Drop --onnx to re-run the stage, or use --stage all.")
    if args.onnx:
        given = [f"--{flag.replace('_', '-')}" for flag in TRAINING_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} configure training, and a model brought with --onnx is not trained "
                              "here.", hint="Drop them, or drop --onnx to train a model.")
    elif args.stage == "all":
        given = [f"--{'labels' if flag == 'labels_file' else flag.replace('_', '-')}" for flag in IMPORT_FLAGS
                 if getattr(args, flag) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to a model brought with --onnx.",
                              hint="Add --onnx PATH, or drop them.")


def name_from_file(path: Path) -> str:
    """The model name an imported file gets by default: its stem, in the characters names allow."""
    import re

    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip("._-")[:64]
    return stem or "imported"


def check_run_dir(run_dir: Path) -> None:
    """A run writes only into a new or empty directory, or into a crossport run it resumes."""
    from crossport.console import LOG_NAME
    from pipelines.lock import LOCK_NAME

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, expected a directory.", hint="Pass a new --run-dir.")
    if run_dir.is_dir() and not (run_dir / "manifest.json").is_file() and any(
            child.name not in (LOCK_NAME, LOG_NAME) for child in run_dir.iterdir()):  # a run that stopped early
        raise ConfigError(
            f"--run-dir {run_dir} is not empty and is not a crossport run (no manifest.json): the pipeline would "
            "write over its files.",
            hint="Pass a new or empty --run-dir, or the directory of an earlier run to resume it.",
        )


if __name__ == "__main__":
    from pipelines.memory import one_heap

    one_heap()
    sys.exit(main())
