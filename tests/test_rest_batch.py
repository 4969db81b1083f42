"""The REST fast path (``serving.rest.read_batch``): a predict batch read by simdjson is the same float64 array the
checked path reads, bit for bit, and every body of another shape is left to the checked path."""

import json

import numpy as np
import pytest

from serving.rest import parse_json, read_batch
from serving.serverless_handler import parse_json as parse_checked


def checked_rows(body: bytes, key: str) -> np.ndarray:
    value = parse_checked(body, 4)[key]
    return np.asarray(value["images"] if isinstance(value, dict) else value, dtype=np.float64)


def numbers_text(rng: np.random.Generator, count: int) -> list[str]:
    """Numbers as clients write them: float32 pixels widened to float64 (json.dumps of .tolist()), float64 over
    many magnitudes, exponent forms, integers up to uint64's range, and signed zeros."""
    pixels = [repr(float(v)) for v in rng.random(count, dtype=np.float32)]
    wide = [repr(float(v)) for v in rng.standard_normal(count) * 10.0 ** rng.integers(-300, 300, count)]
    exponents = [f"{m:.{d}e}" for m, d in zip(rng.standard_normal(count), rng.integers(0, 18, count), strict=True)]
    integers = [str(int(v)) for v in rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)]
    extremes = ["0", "-0", "0.0", "-0.0", "18446744073709551615", "9007199254740993", "1e-400", "4.9e-324",
                "1.7976931348623157e308", "2.2250738585072011e-308", "0.1", "1E5", "-1.5e+3"]
    return pixels + wide + exponents + integers + extremes


@pytest.mark.parametrize("layout", ["instances", "inputs", "inputs-named", "signature"])
def test_the_fast_path_reads_the_same_float64_values_as_the_checked_path(layout):
    rng = np.random.default_rng(0)
    texts = numbers_text(rng, 400)
    width = 13
    texts = texts[: len(texts) // width * width]
    rows = ",".join("[" + ",".join(texts[i : i + width]) + "]" for i in range(0, len(texts), width))
    batch = f"[{rows}]"
    key = "instances" if layout in ("instances", "signature") else "inputs"
    member = f'{{"images": {batch}}}' if layout == "inputs-named" else batch
    extra = '"signature_name": "serving_default", ' if layout == "signature" else ""
    body = f'{{{extra}"{key}": {member}}}'.encode()

    fast = read_batch(body)
    assert fast is not None, "a rectangular batch of numbers must take the fast path"
    expected = checked_rows(body, key)
    assert fast[key].shape == expected.shape == (len(texts) // width, width)
    # bit for bit, so -0.0 and every last digit count
    np.testing.assert_array_equal(fast[key].view(np.int64), expected.view(np.int64))
    assert fast.get("signature_name") == (json.loads(body).get("signature_name"))
    assert parse_json(body)[key].shape == expected.shape


ROW = "[" + ", ".join(["0.5"] * 3) + "]"
OTHER_SHAPES = {
    "row-of-objects": '{"instances": [{"images": [0.5, 0.5]}]}',
    "nested-row": '{"instances": [[0.5, [0.5]]]}',
    "deeper-image": '{"instances": [[[0.5, 0.5]], [[0.5, 0.5]]]}',
    "bracket-in-a-string": f'{{"signature_name": "[", "instances": [{ROW}]}}',
    "boolean": '{"instances": [[true, 0.5]]}',
    "null": '{"instances": [[null, 0.5]]}',
    "string": '{"instances": [["0.5", 0.5]]}',
    "object-in-row": '{"instances": [[{"a": 1}, 0.5]]}',
    "ragged": '{"instances": [[0.5, 0.5], [0.5]]}',
    "number-among-rows": '{"instances": [[0.5], 0.5]}',
    "flat": '{"instances": [0.5, 0.5]}',
    "empty": '{"instances": []}',
    "empty-row": '{"instances": [[]]}',
    "duplicate-key": f'{{"instances": [{ROW}], "instances": [{ROW}]}}',
    "both": f'{{"instances": [{ROW}], "inputs": [{ROW}]}}',
    "neither": '{"signature_name": "serving_default"}',
    "unknown-key": f'{{"instances": [{ROW}], "extra": 1}}',
    "signature-not-a-string": f'{{"signature_name": 1, "instances": [{ROW}]}}',
    "inputs-other-name": f'{{"inputs": {{"pixels": [{ROW}]}}}}',
    "not-an-object": f"[{ROW}]",
    "nan": '{"instances": [[NaN, 0.5]]}',
    "overflow": '{"instances": [[1e999, 0.5]]}',
    "big-integer": '{"instances": [[123456789012345678901234567890, 0.5]]}',
    "leading-zero": '{"instances": [[01, 0.5]]}',
    "trailing-comma": '{"instances": [[0.5, 0.5,]]}',
    "trailing-garbage": f'{{"instances": [{ROW}]}} x',
    "invalid-utf8": b'{"signature_name": "\xff", "instances": [[0.5]]}',
    "nested-deep": '{"instances": ' + "[" * 5000 + "]" * 5000 + "}",
}


@pytest.mark.parametrize("body", list(OTHER_SHAPES.values()), ids=list(OTHER_SHAPES))
def test_every_other_body_is_left_to_the_checked_path(body):
    """None here means parse_json reads the body the checked way: its answer (or its 400) is the one it always gave."""
    assert read_batch(body if isinstance(body, bytes) else body.encode()) is None


def test_the_fast_path_keeps_no_document_alive_between_requests():
    """simdjson refuses to parse into a parser whose last document is still referenced: every call must let go."""
    body = f'{{"instances": [{ROW}, {ROW}]}}'.encode()
    first, second = read_batch(body), read_batch(body)
    np.testing.assert_array_equal(first["instances"], second["instances"])
    assert read_batch(b'{"instances": [[true]]}') is None
    assert read_batch(body) is not None


def test_scores_are_written_as_the_same_bytes_as_their_python_floats(monkeypatch):
    """The answer's scores go to orjson as a float64 array (no Python float each): byte for byte what the list of
    Python floats gave; without orjson, json writes the same numbers."""
    import sys

    import orjson

    from serving.rest import as_json_numbers
    from serving.serve import encode_json

    rng = np.random.default_rng(1)
    wide = rng.standard_normal((64, 62)) * 10.0 ** rng.integers(-40, 38, (64, 62))
    scores = np.concatenate([rng.random((64, 62), dtype=np.float32), wide.astype(np.float32)])
    scores[0, :4] = [0.0, 1.0, np.float32(1e-45), np.finfo(np.float32).max]
    answer = {"predictions": as_json_numbers(scores[::-1])}  # reversed: a view that is not C-contiguous
    assert encode_json(answer) == orjson.dumps({"predictions": scores[::-1].tolist()})
    monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson now raises ImportError
    assert encode_json(answer) == json.dumps({"predictions": scores[::-1].tolist()}).encode()
