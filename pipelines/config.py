"""The resolved configuration of a run and the parity tolerance table.

Configs are frozen dataclasses; the resolved config is saved in the run directory so a
single stage can be re-run later with exactly the settings the run started with.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from crossport.errors import ConfigError
from crossport.parity import HopSpec, Tolerance
from training.data import DATASETS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class PipelineConfig:
    dataset: str = "auto"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    models_dir: str = "models"
    name: str = "emnist_mlp"
    tracking_uri: str | None = None
    tracking: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}.",
                              hint="Pass --dataset with one of those names.")
        if not NAME_PATTERN.match(self.name) or self.name in {".", ".."}:
            raise ConfigError(
                f"model name {self.name!r} is not allowed: expected letters, digits, '_', '.', '-' "
                "(no path separators, at most 64 characters).",
                hint="Pass --name with a plain name such as emnist_mlp.",
            )
        for field_name in ("epochs", "batch_size"):
            if getattr(self, field_name) < 1:
                raise ConfigError(f"--{field_name.replace('_', '-')} must be at least 1, "
                                  f"found {getattr(self, field_name)}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be positive, found {self.learning_rate}.")

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
ONNX = "onnxruntime"
TF_GRAPH = "tf_graph"  # the onnx-tf translation itself, before packaging
SM_PREDICT = "saved_model:serving_default"
SM_CLASSIFY = "saved_model:classify"
TFLITE_VARIANTS = ("fp32", "fp16", "int8_dynamic", "int8_full")
TFLITE = {variant: f"tflite_{variant}" for variant in TFLITE_VARIANTS}
TFLITE_FP32 = TFLITE["fp32"]
# The artifacts that expose logits; the served ones return scores only, by contract.
WITH_LOGITS = {REFERENCE, ONNX, TF_GRAPH}

FP32_SCORES = Tolerance(
    atol=1e-5, rtol=0.0,
    reason="fp32 graphs computing the same math; only summation order differs (seen: ~1e-6 after training)",
)
FP32_LOGITS = Tolerance(
    atol=1e-5, rtol=1e-5,
    reason="logits are unbounded, so the bound grows with |logit| as numpy allclose does",
)
FP16_SCORES = Tolerance(
    atol=1e-3, rtol=0.0,
    reason="float16 weights keep about 3 significant digits; probabilities move by well under 1e-3",
)
INT8_SCORES = Tolerance(
    atol=None, rtol=0.0,
    reason="int8 changes values by design; judged by agreement and accuracy, error recorded only",
)


@dataclass(frozen=True)
class HopPolicy:
    """How a candidate runtime is judged against any reference."""

    scores: Tolerance
    min_agreement: float
    agreement_reason: str
    tie_margin: float | None = None
    max_accuracy_drop: float | None = None


FP32_POLICY = HopPolicy(
    scores=FP32_SCORES,
    min_agreement=1.0,
    # Two scores that may each move by atol can only swap order when closer than 2·atol.
    tie_margin=2 * FP32_SCORES.atol,
    agreement_reason="fp32 hops must not change any prediction; near-ties (top-2 score gap under "
                     "twice the score tolerance) are left out and counted",
)
POLICIES: dict[str, HopPolicy] = {
    ONNX: FP32_POLICY,
    TF_GRAPH: FP32_POLICY,
    SM_PREDICT: FP32_POLICY,
    SM_CLASSIFY: FP32_POLICY,
    TFLITE["fp32"]: FP32_POLICY,
    TFLITE["fp16"]: HopPolicy(
        scores=FP16_SCORES, min_agreement=0.999,
        agreement_reason="float16 rounding may flip at most 1 in 1,000 close calls",
    ),
    TFLITE["int8_dynamic"]: HopPolicy(
        scores=INT8_SCORES, min_agreement=0.99, max_accuracy_drop=0.005,
        agreement_reason="int8 weights with float activations: at most 1 in 100 predictions may change, "
                         "costing at most 0.5 accuracy points",
    ),
    TFLITE["int8_full"]: HopPolicy(
        scores=INT8_SCORES, min_agreement=0.985, max_accuracy_drop=0.01,
        agreement_reason="int8 weights and activations calibrated on training images: at most 1.5 in 100 "
                         "predictions may change, costing at most 1 accuracy point",
    ),
}

# candidate → its parent in the conversion chain. Every candidate is checked against its
# parent and against the PyTorch reference, so drift cannot accumulate unseen.
PARENTS = {
    ONNX: REFERENCE,
    TF_GRAPH: ONNX,
    SM_PREDICT: ONNX,
    SM_CLASSIFY: ONNX,
    **{name: SM_PREDICT for name in TFLITE.values()},
}


def hop_spec(reference: str, candidate: str) -> HopSpec:
    policy = POLICIES[candidate]
    outputs = [("scores", policy.scores)]
    if {reference, candidate} <= WITH_LOGITS:
        outputs.append(("logits", FP32_LOGITS))
    return HopSpec(
        name=f"{reference} -> {candidate}",
        reference=reference,
        candidate=candidate,
        outputs=tuple(outputs),
        min_agreement=policy.min_agreement,
        agreement_reason=policy.agreement_reason,
        tie_margin=policy.tie_margin,
        max_accuracy_drop=policy.max_accuracy_drop,
    )


def hop_specs() -> list[HopSpec]:
    hops = []
    for candidate, parent in PARENTS.items():
        hops.append(hop_spec(parent, candidate))
        if parent != REFERENCE:
            hops.append(hop_spec(REFERENCE, candidate))
    return hops


def tolerance_table() -> list[dict]:
    """The tolerance table as data: what the README shows and parity.json carries."""
    rows = []
    for candidate, policy in POLICIES.items():
        rows.append({
            "candidate": candidate,
            "scores_atol": policy.scores.atol,
            "logits": f"atol {FP32_LOGITS.atol:g} + rtol {FP32_LOGITS.rtol:g}" if candidate in WITH_LOGITS else None,
            "min_top1_agreement": policy.min_agreement,
            "near_tie_margin": policy.tie_margin,
            "max_accuracy_drop_points": None if policy.max_accuracy_drop is None else 100 * policy.max_accuracy_drop,
            "why": f"{policy.scores.reason}; {policy.agreement_reason}",
        })
    return rows
