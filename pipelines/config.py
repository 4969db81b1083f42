"""The resolved configuration of a run and the parity tolerance table.

Configs are frozen dataclasses; the resolved config is saved in the run directory so a
single stage can be re-run later with exactly the settings the run started with.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from crossport.cli import C_INT_MAX
from crossport.errors import ConfigError
from crossport.formats import BY_NAME, BY_RUNTIME, TFLITE_FORMATS
from crossport.interface import LOGITS, SCORES
from crossport.parity import FP32, RECORDED, HopSpec, LossyPolicy, Tolerance
from training.data import DATASETS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
UNDECIDED_POLICIES = ("publish", "omit")
ORIENTATION_CHOICES = ("auto", "emnist", "upright")  # translation.onnx_import.ORIENTATIONS, plus detection
ARCHITECTURE_NAMES = ("mlp", "cnn")  # training.model.ARCHITECTURES (kept here so --help imports no torch)
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
    republish: bool = False  # publish even when the newest version already holds exactly these model files
    threads: int | None = None  # threads per runtime when checking artifacts; None: each runtime's default
    # A run from a model brought as an ONNX file (--onnx) instead of one trained here.
    onnx: str | None = None
    eval_data: str | None = None  # .npz, a folder of PNGs per label, or a dataset name; None: by class count
    labels_file: str | None = None  # one label per line, used when the ONNX file carries none
    orientation: str = "auto"  # what the imported model expects; auto: detected from the evaluation data
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
        if self.undecided not in UNDECIDED_POLICIES:
            raise ConfigError(f"--undecided must be one of {', '.join(UNDECIDED_POLICIES)}, found {self.undecided!r}.")
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


# --- parity tolerances: every row carries its reason -------------------------------------

REFERENCE = "pytorch"
ONNX = BY_NAME["onnx"].runtime  # "onnxruntime"
TF_GRAPH = "tf_graph"  # the onnx-tf translation itself, before packaging
SM_PREDICT = BY_NAME["saved_model"].runtime  # "saved_model:serving_default"
SM_CLASSIFY = "saved_model:classify"
TFLITE = {fmt.variant: fmt.runtime for fmt in TFLITE_FORMATS}  # variant → "tflite_<variant>"
TFLITE_FP32 = TFLITE["fp32"]
# The artifacts that expose logits; the served ones return scores only, by contract.
WITH_LOGITS = {REFERENCE, ONNX, TF_GRAPH}

FP32_VALUES = Tolerance(
    kind=FP32,
    reason="both sides evaluate the same network in float32, so each may be off from the exact value by its "
           "float32 error bound B (crossport/exact/: running error analysis, Higham & Mary's probabilistic "
           "constant, false-alarm chance below 1e-6 per run); they may differ by 2·B",
)
LOSSY_VALUES = Tolerance(
    kind=RECORDED,
    reason="float16 and int8 change values by design; the error is recorded and the variant is judged by how "
           "often its answer changes and how much accuracy moves",
)
# How much noisier than PyTorch float32 an fp32 artifact may be against the exact values:
# derived per model from its fan-ins (crossport.exact.Exact.noise_factor).
NOISE_FACTOR_RULE = "sqrt(largest fan-in)"
NOISE_FACTOR_REASON = (
    "summation order is the freedom a correct float32 kernel has; a length-n sum kept as p interleaved partial "
    "sums has about sqrt(p) times less RMS rounding error than one summed in sequence (one-lane kernels such as "
    "TFLite's reference and XNNPACK convolutions measure 3.5-6x PyTorch's on the CNN), and p <= n, so a correct "
    "artifact stays within sqrt(n) of PyTorch's; reduced precision, which this catches, is >= 2^13 times noisier"
)
CONFIDENCE = 0.99  # one-sided level of every confidence bound the lossy verdicts use


@dataclass(frozen=True)
class HopPolicy:
    """How a candidate runtime is judged against any reference. ``lossy`` None: fp32 rules."""

    values: Tolerance
    lossy: LossyPolicy | None = None

    @property
    def fp32(self) -> bool:
        return self.lossy is None


FP32_POLICY = HopPolicy(values=FP32_VALUES)
# What a deployer accepts from each lossy format (crossport/formats.py marks which are lossy).
LOSSY_POLICIES: dict[str, LossyPolicy] = {
    TFLITE["fp16"]: LossyPolicy(
        max_disagreement=0.001, max_accuracy_drop=0.001, confidence=CONFIDENCE,
        reason="float16 weights keep about 3 significant digits: a deployer accepts at most 1 changed answer "
               "in 1,000 and 0.1 accuracy points"),
    TFLITE["int8_dynamic"]: LossyPolicy(
        max_disagreement=0.01, max_accuracy_drop=0.005, confidence=CONFIDENCE,
        reason="int8 weights with float activations: at most 1 changed answer in 100, costing at most "
               "0.5 accuracy points"),
    TFLITE["int8_full"]: LossyPolicy(
        max_disagreement=0.015, max_accuracy_drop=0.01, confidence=CONFIDENCE,
        reason="int8 weights and activations calibrated on training images: at most 1.5 changed answers in "
               "100, costing at most 1 accuracy point"),
}
# Checks that are not a published format of their own: the TF graph before packaging, and the
# SavedModel's second signature.
INTERMEDIATE = {TF_GRAPH: ONNX, SM_CLASSIFY: ONNX}
# Every candidate in conversion order → its parent in the chain. Every candidate is checked
# against its parent and against the PyTorch reference, so drift cannot accumulate unseen.
PARENTS = {ONNX: BY_RUNTIME[ONNX].parent, TF_GRAPH: INTERMEDIATE[TF_GRAPH], SM_PREDICT: BY_RUNTIME[SM_PREDICT].parent,
           SM_CLASSIFY: INTERMEDIATE[SM_CLASSIFY], **{fmt.runtime: fmt.parent for fmt in TFLITE_FORMATS}}
POLICIES: dict[str, HopPolicy] = {
    name: HopPolicy(LOSSY_VALUES, LOSSY_POLICIES[name]) if name in BY_RUNTIME and BY_RUNTIME[name].lossy
    else FP32_POLICY
    for name in PARENTS
}


def hop_spec(reference: str, candidate: str) -> HopSpec:
    policy = POLICIES[candidate]
    outputs = [(SCORES, policy.values)]
    if {reference, candidate} <= WITH_LOGITS:
        outputs.append((LOGITS, FP32_VALUES))
    return HopSpec(name=f"{reference} -> {candidate}", reference=reference, candidate=candidate,
                   outputs=tuple(outputs), lossy=policy.lossy)


def hop_specs(reference: str = REFERENCE) -> list[HopSpec]:
    """Every hop to check when ``reference`` is the original: PyTorch for a model trained here, ONNX Runtime on
    the imported graph for a model brought as an ONNX file (which then is no candidate of its own)."""
    hops = []
    for candidate, parent in PARENTS.items():
        if candidate == reference:
            continue
        hops.append(hop_spec(parent, candidate))
        if parent != reference:
            hops.append(hop_spec(reference, candidate))
    return hops


def tolerance_table() -> list[dict]:
    """The tolerance table as data: what docs/parity.md shows and parity.json carries."""
    rows = []
    for candidate, policy in POLICIES.items():
        lossy = policy.lossy
        rows.append({
            "candidate": candidate,
            "values": "|Δ| <= 2·B per element" if policy.fp32 else "recorded",
            "against_exact": f"|error| <= B; RMS per class <= {NOISE_FACTOR_RULE} x PyTorch float32's"
                             if policy.fp32 else "recorded",
            "top1": "every decisive example unchanged" if policy.fp32 else
                    f"disagreement <= {lossy.max_disagreement:.2%} (not applied when as accurate as the reference)",
            "max_accuracy_drop_points": None if policy.fp32 or lossy.max_accuracy_drop is None
                                        else 100 * lossy.max_accuracy_drop,
            "confidence": None if policy.fp32 else lossy.confidence,
            "why": policy.values.reason if policy.fp32 else f"{lossy.reason}; {policy.values.reason}",
        })
    rows.append({"candidate": "(every fp32 artifact)", "values": "noise factor", "against_exact": NOISE_FACTOR_RULE,
                 "top1": None, "max_accuracy_drop_points": None, "confidence": None, "why": NOISE_FACTOR_REASON})
    return rows
