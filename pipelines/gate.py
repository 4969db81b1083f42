"""The parity gate's policy: every runtime crossport checks, the parent it is checked against, and the tolerance
each hop is held to, every row with its reason (docs/parity.md). The statistics and verdicts themselves are
:mod:`crossport.parity`; the error bounds the fp32 rows use are :mod:`crossport.exact`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from crossport.formats import BY_NAME, BY_RUNTIME, OPTIONAL, TFLITE_FORMATS
from crossport.interface import LOGITS, SCORES
from crossport.parity import CONFIDENCE, FP32, RECORDED, SIGN_TEST, HopSpec, LossyPolicy, Tolerance

REFERENCE = "pytorch"
ONNX = BY_NAME["onnx"].runtime  # "onnxruntime"
TF_GRAPH = "tf_graph"  # the onnx-tf translation itself, before packaging
SM_PREDICT = BY_NAME["saved_model"].runtime  # "saved_model:serving_default"
SM_CLASSIFY = "saved_model:classify"
TFLITE = {fmt.variant: fmt.runtime for fmt in TFLITE_FORMATS}  # variant → "tflite_<variant>"
TFLITE_FP32 = TFLITE["fp32"]
OPTIONAL_RUNTIMES = {BY_NAME[name].runtime for name in OPTIONAL}  # checked only in the runs that make them
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
# Against the exact values every fp32 artifact also meets the sign test (crossport.parity.SIGN_TEST).
SIGN_TEST_RULE = ("per class, T = (|Σe/B| − Σb/B) / (√Σ(e/B)² + √Σ(b/B)²) below t = √(2·ln(2·tests/α)), "
                  "α = 1e-6 per run")


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
}
INT8_MAX_DROP_POINTS = 1.0  # --int8-max-drop's default


def _int8_promise(points: float) -> str:
    plural, chosen = "" if points == 1 else "s", "" if points == INT8_MAX_DROP_POINTS else " (--int8-max-drop)"
    return f"at most 1.5 changed answers in 100, costing at most {points:g} accuracy point{plural}{chosen}"


def int8_full_policy(points: float = INT8_MAX_DROP_POINTS) -> LossyPolicy:
    """int8_full's policy with at most ``points`` accuracy points lost: a deployer who needs int8 closer to the float
    model says so (--int8-max-drop); the changed answers allowed are not loosened by it."""
    return LossyPolicy(max_disagreement=0.015, max_accuracy_drop=points / 100, confidence=CONFIDENCE,
                       reason=f"int8 weights and activations calibrated on training images: {_int8_promise(points)}")


def int8_mixed_policy(points: float = INT8_MAX_DROP_POINTS) -> LossyPolicy:
    """int8_mixed makes int8_full's promise with a few layers in float; it is the first of several candidates the int8
    fallback judges (pipelines/stages/int8.py), each at a Bonferroni-corrected confidence (fallback_confidence)."""
    return replace(int8_full_policy(points),
                   reason=f"int8_full's promise ({_int8_promise(points)}), kept by leaving the fewest layers in float; "
                          "each candidate judged at a confidence corrected for the candidates tried")


LOSSY_POLICIES[TFLITE["int8_full"]] = int8_full_policy()
LOSSY_POLICIES[TFLITE["int8_mixed"]] = int8_mixed_policy()


def fallback_confidence(candidates: int) -> float:
    """The confidence each of ``candidates`` int8_mixed candidates is judged at, so that the chance that the search
    publishes one that breaks the policy stays within 1 − CONFIDENCE (Bonferroni: the chances add up)."""
    return 1.0 - (1.0 - CONFIDENCE) / max(candidates, 1)


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


def run_policies(int8_max_drop: float = INT8_MAX_DROP_POINTS) -> dict[str, HopPolicy]:
    """:data:`POLICIES` as one run holds them: with its --int8-max-drop for int8_full and int8_mixed."""
    if int8_max_drop == INT8_MAX_DROP_POINTS:
        return POLICIES
    int8 = {TFLITE["int8_full"]: int8_full_policy(int8_max_drop),
            TFLITE["int8_mixed"]: int8_mixed_policy(int8_max_drop)}
    return {name: HopPolicy(LOSSY_VALUES, int8[name]) if name in int8 else policy for name, policy in POLICIES.items()}


def hop_spec(reference: str, candidate: str, policies: dict[str, HopPolicy] = POLICIES) -> HopSpec:
    policy = policies[candidate]
    outputs = [(SCORES, policy.values)]
    if {reference, candidate} <= WITH_LOGITS:
        outputs.append((LOGITS, FP32_VALUES))
    return HopSpec(name=f"{reference} -> {candidate}", reference=reference, candidate=candidate,
                   outputs=tuple(outputs), lossy=policy.lossy)


def hop_specs(reference: str = REFERENCE, present: Iterable[str] | None = None,
              policies: dict[str, HopPolicy] = POLICIES) -> list[HopSpec]:
    """Every hop to check when ``reference`` is the original: PyTorch for a model trained here, ONNX Runtime on
    the imported graph for a model brought as an ONNX file (which then is no candidate of its own); of the
    optional formats only those ``present`` (the runtimes run); each held to ``policies`` (:func:`run_policies`)."""
    present = set(PARENTS if present is None else present)
    hops = []
    for candidate, parent in PARENTS.items():
        if candidate == reference or (candidate in OPTIONAL_RUNTIMES and candidate not in present):
            continue
        hops.append(hop_spec(parent, candidate, policies))
        if parent != reference:
            hops.append(hop_spec(reference, candidate, policies))
    return hops


def tolerance_table(policies: dict[str, HopPolicy] = POLICIES) -> list[dict]:
    """The tolerance table as data: what docs/parity.md shows and parity.json carries (the run's own policies)."""
    rows = []
    for candidate, policy in policies.items():
        lossy = policy.lossy
        rows.append({
            "candidate": candidate,
            "values": "|Δ| <= 2·B per element" if policy.fp32 else "recorded",
            "against_exact": f"|error| <= B; {SIGN_TEST_RULE}" if policy.fp32 else "recorded",
            "top1": "every decisive example unchanged" if policy.fp32 else
                    f"disagreement <= {lossy.max_disagreement:.2%} (not applied when as accurate as the reference)",
            "max_accuracy_drop_points": None if policy.fp32 or lossy.max_accuracy_drop is None
                                        else 100 * lossy.max_accuracy_drop,
            "confidence": None if policy.fp32 else lossy.confidence,
            "why": policy.values.reason if policy.fp32 else f"{lossy.reason}; {policy.values.reason}",
        })
    rows.append({"candidate": "(every fp32 artifact)", "values": "sign test", "against_exact": SIGN_TEST_RULE,
                 "top1": None, "max_accuracy_drop_points": None, "confidence": None, "why": SIGN_TEST})
    return rows
