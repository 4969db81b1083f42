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

FP32_SCORES = Tolerance(
    atol=1e-5, rtol=0.0,
    reason="fp32 graphs computing the same math; only summation order differs (seen: ~1e-7)",
)
FP32_LOGITS = Tolerance(
    atol=1e-5, rtol=1e-5,
    reason="logits are unbounded, so the bound grows with |logit| as numpy allclose does",
)
FP32_AGREEMENT = 1.0
FP32_AGREEMENT_REASON = (
    "fp32 hops must not change any prediction; near-ties (top-2 score gap under twice the "
    "score tolerance) are left out and counted"
)
# Two scores that may each move by up to atol can only swap order when closer than 2·atol.
FP32_TIE_MARGIN = 2 * FP32_SCORES.atol

REFERENCE = "pytorch"
ONNX = "onnxruntime"
SM_PREDICT = "saved_model:serving_default"
SM_CLASSIFY = "saved_model:classify"
TFLITE_FP32 = "tflite_fp32"

# candidate → its parent in the conversion chain. Every candidate is checked against its
# parent and against the PyTorch reference, so drift cannot accumulate unseen.
PARENTS = {ONNX: REFERENCE, SM_PREDICT: ONNX, SM_CLASSIFY: ONNX, TFLITE_FP32: SM_PREDICT}


def _fp32_hop(reference: str, candidate: str) -> HopSpec:
    outputs = [("scores", FP32_SCORES)]
    if {reference, candidate} <= {REFERENCE, ONNX}:
        outputs.append(("logits", FP32_LOGITS))  # only these two expose logits
    return HopSpec(
        name=f"{reference} -> {candidate}",
        reference=reference,
        candidate=candidate,
        outputs=tuple(outputs),
        min_agreement=FP32_AGREEMENT,
        agreement_reason=FP32_AGREEMENT_REASON,
        tie_margin=FP32_TIE_MARGIN,
    )


def hop_specs() -> list[HopSpec]:
    hops = []
    for candidate, parent in PARENTS.items():
        hops.append(_fp32_hop(parent, candidate))
        if parent != REFERENCE:
            hops.append(_fp32_hop(REFERENCE, candidate))
    return hops


def hop_spec(reference: str, candidate: str) -> HopSpec:
    return _fp32_hop(reference, candidate)
