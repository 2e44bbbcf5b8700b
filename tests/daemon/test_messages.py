"""parse_message: valid samples (flat/nested) and every rejection reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from daemon.messages import Rejection, Sample, parse_message
from daemon.metrics import JSON_REJECT_REASONS, REJECT_REASONS

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SHAPE = (1, 2, 3)


def parse(raw: bytes | str | None, shape=SHAPE, num_classes: int = 4, max_bytes: int = 10_000):
    if isinstance(raw, str):
        raw = raw.encode()
    return parse_message(raw, 1, 42, shape, num_classes, max_bytes)


def msg(**fields) -> bytes:
    base = {"features": [0.5] * 6, "label": 1}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_flat_features() -> None:
    s = parse(msg(features=[0, 1, 2.5, 3, 4, 5], id="a/1", timestamp=17.5))
    assert isinstance(s, Sample)
    assert s.features.dtype == np.float32 and s.features.shape == (6,)
    np.testing.assert_array_equal(s.features, [0, 1, 2.5, 3, 4, 5])
    assert (s.label, s.partition, s.offset, s.id, s.timestamp) == (1, 1, 42, "a/1", 17.5)


def test_nested_features_match_shape() -> None:
    s = parse(msg(features=[[[1, 2, 3], [4, 5, 6]]]))
    assert isinstance(s, Sample)
    np.testing.assert_array_equal(s.features, [1, 2, 3, 4, 5, 6])
    assert s.id is None and s.timestamp is None


def test_optional_fields_null_and_extra_keys_ok() -> None:
    s = parse(msg(id=None, timestamp=None, source="cam-3"))
    assert isinstance(s, Sample) and s.id is None


def test_integer_timestamp_and_label_edges() -> None:
    assert isinstance(parse(msg(label=0, timestamp=1718000000)), Sample)
    assert isinstance(parse(msg(label=3)), Sample)


def reason(raw, **kw) -> str:
    r = parse(raw, **kw)
    assert isinstance(r, Rejection), r
    assert r.reason in REJECT_REASONS
    assert (r.partition, r.offset) == (1, 42)
    return r.reason


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"features": [1,', b"\xff\xfe\x00",
                                 None, b"[" * 100_000])
def test_invalid_json(raw) -> None:
    assert reason(raw, max_bytes=1_000_000) == "invalid_json"


@pytest.mark.parametrize("raw", ["[1, 2]", '"text"', "3", "null", "true"])
def test_not_object(raw: str) -> None:
    assert reason(raw) == "not_object"


@pytest.mark.parametrize("drop", ["features", "label"])
def test_missing_field(drop: str) -> None:
    r = parse(msg(**{drop: ...}))
    assert r.reason == "missing_field" and drop in r.detail


@pytest.mark.parametrize("features", [
    [0.5] * 5, [0.5] * 7, [],
    [[1, 2], [3, 4], [5, 6]],                            # (3, 2) is not (1, 2, 3)
    [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]],            # 12 values
    [[[1, 2, 3], [4, 5]]],                               # ragged
    [[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]],    # (2, 2, 3)
])
def test_bad_shape(features) -> None:
    assert reason(msg(features=features)) == "bad_shape"


@pytest.mark.parametrize("features", [
    [1, 2, 3, 4, 5, 6],                                  # flat
    [[[1, 2, 3], [4, 5, 6]]],                            # exactly (1, 2, 3)
    [[1, 2, 3], [4, 5, 6]],                              # (2, 3): what a client naturally sends
    [[[[1, 2, 3], [4, 5, 6]]]],                          # (1, 1, 2, 3)
    [[[1, 2, 3]], [[4, 5, 6]]],                          # (2, 1, 3)
    [[1, 2, 3, 4, 5, 6]],                                # (1, 6): flat once size-1 dims go
    [[1], [2], [3], [4], [5], [6]],                      # (6, 1): flat too
])
def test_any_nesting_equal_to_the_input_shape_without_size_1_dims(features) -> None:
    """Issue 8, item 12: a 28x28 list for input shape [1, 28, 28] was rejected."""
    s = parse(msg(features=features))
    assert isinstance(s, Sample), s
    np.testing.assert_array_equal(s.features, [1, 2, 3, 4, 5, 6])


def test_28x28_for_1x28x28_is_accepted() -> None:
    image = np.arange(784, dtype=np.float64).reshape(28, 28) / 784
    s = parse(msg(features=image.tolist()), shape=(1, 28, 28), max_bytes=100_000)
    assert isinstance(s, Sample), s
    np.testing.assert_array_equal(s.features, image.reshape(-1).astype(np.float32))


def test_bad_shape_message_states_the_rule() -> None:
    r = parse(msg(features=[[1, 2], [3, 4], [5, 6]]), shape=(1, 2, 3))
    assert r.detail == ("features have shape [3, 2], expected [1, 2, 3] (size-1 dimensions "
                        "optional, e.g. [2, 3]) or flat with 6 values")


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e39", "-3.5e38"])
def test_non_finite(text: str) -> None:
    raw = f'{{"features": [0, 0, 0, 0, 0, {text}], "label": 1}}'
    r = parse(raw)
    assert r.reason == "non_finite", r
    assert "feature 5" in r.detail


def test_non_finite_timestamp() -> None:
    assert reason('{"features": [0,0,0,0,0,0], "label": 1, "timestamp": NaN}') == "non_finite"


@pytest.mark.parametrize("label", [4, 100, -1])
def test_bad_label(label: int) -> None:
    assert reason(msg(label=label)) == "bad_label"


def test_too_large_checked_before_parsing() -> None:
    raw = msg(features=[0.123456789] * 6)
    assert reason(raw, max_bytes=len(raw) - 1) == "too_large"
    assert isinstance(parse(raw, max_bytes=len(raw)), Sample)
    assert reason(b"x" * 50, max_bytes=10) == "too_large"  # even when not JSON


@pytest.mark.parametrize("fields", [
    {"label": True}, {"label": False}, {"label": 1.0}, {"label": "1"}, {"label": None},
    {"features": "0.5"}, {"features": 0.5}, {"features": {"a": 1}},
    {"features": [0.5, 0.5, 0.5, 0.5, 0.5, "0.5"]},
    {"features": [0.5, 0.5, 0.5, 0.5, 0.5, None]},
    {"features": [0.5, 0.5, 0.5, 0.5, 0.5, True]},
    {"features": [True] * 6},
    {"features": [[[1, 2, 3], [4, 5, {"x": 1}]]]},
    {"id": 7}, {"timestamp": "now"}, {"timestamp": True},
])
def test_bad_type(fields) -> None:
    assert reason(msg(**fields)) == "bad_type"


@pytest.mark.parametrize("text", [r"\ud800", r"a\udfffb", r"\udc00\ud800"])
def test_id_that_utf8_cannot_encode_is_unstorable(text: str) -> None:
    """JSON allows lone UTF-16 surrogates; the store (Arrow, UTF-8) cannot hold them."""
    r = parse('{"id": "' + text + '", "features": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "label": 1}')
    assert isinstance(r, Rejection) and r.reason == "unstorable", r
    assert "surrogate" in r.detail


def test_valid_unicode_ids_are_kept() -> None:
    s = parse(msg(id="caf\u00e9/\U0001f600/\u0000"))
    assert isinstance(s, Sample) and s.id == "caf\u00e9/\U0001f600/\u0000"


def test_word_true_in_id_does_not_reject() -> None:
    assert isinstance(parse(msg(id="true-false")), Sample)


def test_every_reason_is_covered() -> None:
    seen = {reason(b"{"), reason(b"[]"), reason(b"{}"), reason(msg(features=[1])),
            reason(msg(features=[0, 0, 0, 0, 0, float("nan")])), reason(msg(label=9)),
            reason(b"x" * 20_000), reason(msg(label="x")),
            reason('{"id": "\\ud800", "features": [0, 0, 0, 0, 0, 0], "label": 1}')}
    assert seen == set(JSON_REJECT_REASONS)


def test_rejection_keeps_raw_bytes() -> None:
    r = parse(b"garbage")
    assert r.raw == b"garbage" and r.detail


def test_schema_file_and_example() -> None:
    schema = json.loads((SCHEMAS / "sample.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert set(schema["required"]) == {"features", "label"}
    assert {"features", "label", "id", "timestamp"} <= set(schema["properties"])
    example = (SCHEMAS / "example.json").read_bytes()
    s = parse_message(example, 0, 0, (1, 3, 4), 3, 1_000_000)
    assert isinstance(s, Sample) and s.label == 2 and s.features.shape == (12,)


def test_schema_agrees_with_parser_on_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / "sample.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    lines = (SCHEMAS / "examples.jsonl").read_bytes().splitlines()
    results = [parse_message(line, 0, i, (1, 3, 4), 3, 1_000_000) for i, line in enumerate(lines)]
    assert [getattr(r, "reason", "ok") for r in results] == [
        "ok", "ok", "ok", "bad_shape", "non_finite", "bad_label", "invalid_json"]
    for line, result in zip(lines[:3], results[:3], strict=True):
        assert isinstance(result, Sample)
        validator.validate(json.loads(line))
    validator.validate(json.loads((SCHEMAS / "example.json").read_text()))
    assert not validator.is_valid({"features": [1.0], "label": True})
    assert not validator.is_valid({"features": [1.0]})
