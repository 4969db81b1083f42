"""The resolved configuration of a run.

Configs are frozen dataclasses; the resolved config is saved in the run directory so a
single stage can be re-run later with exactly the settings the run started with. The
parity gate's policy is :mod:`pipelines.gate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from crossport.cli import C_INT_MAX
from crossport.errors import ConfigError
from training.data import DATASETS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
UNDECIDED_POLICIES = ("publish", "omit")
INT8_FALLBACK = ("auto", "off")
EVAL_ORIENTATIONS = ("emnist", "upright")  # how an .npz holds its images (translation.onnx_import.ORIENTATIONS)
ORIENTATION_CHOICES = ("auto", "emnist", "upright")  # translation.onnx_import.ORIENTATIONS, plus detection
# training.model.ARCHITECTURES (kept here so --help imports no torch)
ARCHITECTURE_NAMES = ("mlp", "cnn", "resnet18", "mobilenet_v2", "mobilenet_v3_small")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: no trailing newline
# (field, lowest, highest). The seed seeds NumPy's default_rng (no negatives) and torch.manual_seed
# (below 2**64); counts end up in C ints inside the runtimes.
INTEGER_BOUNDS = (("epochs", 1, C_INT_MAX), ("batch_size", 1, C_INT_MAX), ("seed", 0, 2**64 - 1),
                  ("threads", 1, C_INT_MAX), ("nproc", 1, C_INT_MAX), ("nnodes", 1, C_INT_MAX),
                  ("node_rank", 0, C_INT_MAX), ("patience", 1, C_INT_MAX))


@dataclass(frozen=True)
class PipelineConfig:
    dataset: str = "auto"
    model: str = "mlp"  # an architecture in training.model.ARCHITECTURES
    data_dir: str | None = None
    epochs: int = 10
    patience: int | None = None  # early stopping: epochs without a better validation accuracy (None: off)
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    models_dir: str = "models"
    serving_root: str = "/models"  # where TF Serving mounts the models directory (models.config's base paths)
    name: str = "emnist_mlp"
    tracking_uri: str | None = None
    tracking: bool = True
    # What publish does with a lossy variant whose verdict is "undecided" (too few test
    # examples to tell): publish it marked unverified, or leave it out.
    undecided: str = "publish"
    # When int8_full fails the gate (or is undecided, with undecided "omit"): search for the fewest layers to keep in
    # float that pass it (auto), or not (off)
    int8_fallback: str = "auto"
    # The most accuracy points int8_full (and int8_mixed) may lose against the float model, at the gate's confidence
    int8_max_drop: float = 1.0
    republish: bool = False  # publish even when the newest version already holds exactly these model files
    threads: int | None = None  # threads per runtime when checking artifacts; None: each runtime's default
    # A run from a model brought as an ONNX file (--onnx) instead of one trained here.
    onnx: str | None = None
    eval_data: str | None = None  # .npz, a folder of PNGs per label, or a dataset name; None: by class count
    labels_file: str | None = None  # one label per line, used when the ONNX file carries none
    orientation: str = "auto"  # what the imported model expects; auto: detected from the evaluation data
    eval_orientation: str | None = None  # which way up an --eval-data .npz holds its images; None: emnist
    # the imported model expects (x - mean) / std of images in [0, 1], one value or one per channel; None: x itself
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # Distributed training (torchrun): processes on this machine, machines, this machine's rank, node 0's address.
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def route(self) -> str:
        """Which stages make the ONNX model: "train" (data, train, export) or "import" (the import stage)."""
        return "import" if self.onnx else "train"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}.",
                              hint="Pass --dataset with one of those names.")
        if self.model not in ARCHITECTURE_NAMES:
            raise ConfigError(f"unknown model {self.model!r}: expected one of {', '.join(ARCHITECTURE_NAMES)}.",
                              hint="Pass --model with one of those names.")
        if not (isinstance(self.name, str) and NAME_PATTERN.fullmatch(self.name)) or self.name in {".", ".."}:
            raise ConfigError(
                f"model name {self.name!r} is not allowed: expected letters, digits, '_', '.', '-' "
                "(no path separators, at most 64 characters).",
                hint="Pass --name with a plain name such as emnist_mlp.",
            )
        for field_name, low, high in INTEGER_BOUNDS:
            value = getattr(self, field_name)
            if value is None and field_name in ("threads", "patience"):  # optional: None means off / default
                continue
            flag = f"--{field_name.replace('_', '-')}"
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{flag} must be an integer, found {value!r}.")
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, found {value}.")
            if value > high:
                raise ConfigError(f"{flag} must be at most {high}, found {value}.")
        world = self.nproc * self.nnodes
        if self.batch_size % world:
            raise ConfigError(f"--batch-size {self.batch_size} is the global batch and must divide evenly over the "
                              f"{world} training processes (--nproc x --nnodes).",
                              hint=f"Pass a --batch-size that is a multiple of {world}.")
        if self.node_rank >= self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}.")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address).")
        if self.orientation not in ORIENTATION_CHOICES:
            raise ConfigError(f"--orientation must be one of {', '.join(ORIENTATION_CHOICES)}, "
                              f"found {self.orientation!r}.")
        for field_name in ("mean", "std"):  # one number (a saved config, an older one) or one per channel
            value = getattr(self, field_name)
            if isinstance(value, int | float | list):
                object.__setattr__(self, field_name, tuple(value) if isinstance(value, list) else (value,))
        if (self.mean is None) != (self.std is None):
            raise ConfigError("--mean and --std go together: the model expects (x − mean) / std.",
                              hint="Pass both, or neither.")
        if self.std is not None:
            found = f"found {', '.join(map(str, self.mean))} and {', '.join(map(str, self.std))}"
            if len(self.mean) != len(self.std):
                raise ConfigError(f"--mean and --std need as many values (one, or one per channel), {found}.")
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in (*self.mean, *self.std)) or min(
                    self.std) <= 0:
                raise ConfigError(f"--mean must be finite and --std finite and positive, {found}.")
        if self.eval_orientation not in (None, *EVAL_ORIENTATIONS):
            raise ConfigError(f"--eval-orientation must be one of {', '.join(EVAL_ORIENTATIONS)}, "
                              f"found {self.eval_orientation!r}.")
        if self.undecided not in UNDECIDED_POLICIES:
            raise ConfigError(f"--undecided must be one of {', '.join(UNDECIDED_POLICIES)}, found {self.undecided!r}.")
        if self.int8_fallback not in INT8_FALLBACK:
            raise ConfigError(f"--int8-fallback must be one of {', '.join(INT8_FALLBACK)}, "
                              f"found {self.int8_fallback!r}.")
        if not (isinstance(self.int8_max_drop, int | float) and 0 < self.int8_max_drop <= 100):
            raise ConfigError(f"--int8-max-drop must be accuracy points in (0, 100], found {self.int8_max_drop}.",
                              hint="For example --int8-max-drop 0.5: int8 may cost at most half a point.")
        if not (isinstance(self.learning_rate, int | float) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ConfigError(f"learning rate must be positive and finite, found {self.learning_rate}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> PipelineConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in known})

    def override(self, **changes) -> PipelineConfig:
        return replace(self, **{key: value for key, value in changes.items() if value is not None})
