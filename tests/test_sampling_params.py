"""SamplingParams: defaults, and every invalid value is a ValueError naming field and value."""

import dataclasses
import math

import pytest

from nanovllm import SamplingParams


def test_defaults():
    sp = SamplingParams()
    assert sp.temperature == 1.0 and isinstance(sp.temperature, float)
    assert sp.top_k == 0 and sp.top_p == 1.0
    assert sp.max_tokens == 64
    assert sp.ignore_eos is False
    assert sp.stop_token_ids == () and sp.stop == ()
    assert sp.min_tokens == 0 and sp.seed is None and sp.logprobs is None
    assert sp.include_stop_str_in_output is False


def test_temperature_zero_is_allowed_and_ints_are_coerced():
    sp = SamplingParams(temperature=0, top_p=1, top_k=-1)
    assert sp.temperature == 0.0 and isinstance(sp.temperature, float)
    assert isinstance(sp.top_p, float) and sp.top_k == -1


def test_valid_values():
    sp = SamplingParams(
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        max_tokens=1,
        ignore_eos=True,
        stop_token_ids=(3, 5),
    )
    assert sp.stop_token_ids == (3, 5)  # stored as a tuple: the params are immutable
    assert sp.top_k == 50 and sp.top_p == 0.9 and sp.max_tokens == 1 and sp.ignore_eos
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()  # as in vLLM
    assert SamplingParams(stop_token_ids=[3]).stop_token_ids == (3,)
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "bc"], seed=7, logprobs=2).stop == ("a", "bc")
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


@pytest.mark.parametrize(
    "field,value", [("max_tokens", 0), ("temperature", -1.0), ("stop_token_ids", (1,))]
)
def test_frozen_after_validation(field, value):
    sp = SamplingParams(max_tokens=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(sp, field, value)
    assert sp.max_tokens == 5 and sp.temperature == 1.0 and sp.stop_token_ids == ()
    # the way to change one: a new, validated copy
    assert dataclasses.replace(sp, max_tokens=2).max_tokens == 2
    with pytest.raises(ValueError, match="max_tokens=0"):
        dataclasses.replace(sp, max_tokens=0)


INVALID = [
    ("temperature", -0.1),
    ("temperature", -1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.5"),
    ("temperature", None),
    ("temperature", True),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", "5"),
    ("top_k", True),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", "0.9"),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.0),
    ("max_tokens", None),
    ("max_tokens", True),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, "2"]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    ("stop_token_ids", "12"),
    ("ignore_eos", "no"),
    ("ignore_eos", None),
    ("min_tokens", -1),
    ("min_tokens", 65),  # more than max_tokens (64)
    ("min_tokens", 1.0),
    ("stop", [""]),
    ("stop", [1]),
    ("stop", 5),
    ("include_stop_str_in_output", 1),
    ("seed", 1.5),
    ("seed", "1"),
    ("seed", True),
    ("logprobs", -1),
    ("logprobs", 2.0),
    ("logprobs", True),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert field in msg
    assert repr(value) in msg
    assert ":" in msg.split(repr(value), 1)[1]  # followed by what to do instead
