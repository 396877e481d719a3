"""StopStringChecker: a stop string is found the step its last character arrives, from a short
decoded tail (not the whole output), and the final text is cut before it."""

import pytest

from nanovllm.engine.sequence import Sequence
from nanovllm.engine.stop_strings import StopStringChecker
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.default_model import build_tokenizer


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def feed(tok, text, stop, prompt=(5, 6, 7), **params):
    """Feed ``text``'s tokens one at a time; the step index at which the checker fires."""
    counting = CountingTokenizer(tok)
    checker = StopStringChecker(counting)
    seq = Sequence(list(prompt), SamplingParams(stop=stop, max_tokens=500, **params), 16)
    for i, t in enumerate(tok.encode(text)):
        seq.token_ids.append(t)
        found = checker(seq)
        if found is not None:
            seq.stop_reason = found
            return i, seq, checker, counting
    return None, seq, checker, counting


def test_fires_on_the_token_that_completes_the_stop(tok):
    text = "Hello world. The quick brown fox jumps over the lazy dog. " * 3
    i, seq, checker, _ = feed(tok, text, ["brown fox"])
    ids = tok.encode(text)
    assert i is not None and "brown fox" in tok.decode(ids[: i + 1])
    assert "brown fox" not in tok.decode(ids[:i])
    out = checker.truncate(seq, tok.decode(seq.completion_token_ids))
    assert out == "Hello world. The quick "


def test_decodes_a_short_tail_only(tok):
    text = "Attention reads the cache, the feed-forward network reads the weights. " * 6
    i, _, _, counting = feed(tok, text, ["never there"])
    assert i is None
    assert max(counting.lengths) <= 4 * len("never there") + 4  # not the whole output


def test_min_tokens_ignores_an_early_occurrence(tok):
    text = "def main(): return sum(x * x for x in range(10)) # Python code, too. main again"
    ids = tok.encode(text)
    first, _, _, _ = feed(tok, text, ["main"])
    later, seq, checker, _ = feed(tok, text, ["main"], min_tokens=first + 3)
    assert first is not None and later is not None and later > first + 1
    assert tok.decode(ids[: later + 1]).count("main") == 2
    out = checker.truncate(seq, tok.decode(seq.completion_token_ids))
    assert out.endswith("too. ") and out.count("main") == 1


def test_include_stop_str_and_several_stops(tok):
    text = "0123456789 Hello world."
    i, seq, checker, _ = feed(tok, text, ["zzz", "Hello"], include_stop_str_in_output=True)
    assert seq.stop_reason == "Hello"
    assert checker.truncate(seq, tok.decode(seq.completion_token_ids)) == "0123456789 Hello"
