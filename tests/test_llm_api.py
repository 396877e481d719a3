"""What a vLLM user reaches for first, end to end on CPU: per-request seeds, stop strings,
logprobs, min_tokens, chat, get_tokenizer, the documented options, and exit()."""

import dataclasses
import random

import pytest

from nanovllm import LLM as _LLM
from nanovllm import SamplingParams
from nanovllm.config import Config


def LLM(path, **kw):  # noqa: N802 - pinned to the CPU
    return _LLM(path, device="cpu", kvcache_block_size=16, **kw)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model)


def ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


def greedy(**kw):
    kw.setdefault("max_tokens", 16)
    return SamplingParams(temperature=0, ignore_eos=True, **kw)


def test_seed_gives_the_same_tokens_alone_or_batched(llm):
    prompt = ids(9, 1)
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=1234)
    alone = llm.generate([prompt], sp, use_tqdm=False)[0]["token_ids"]
    others = [ids(30, 2), ids(3, 3), ids(17, 4)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batched = llm.generate(
        [others[0], prompt, others[1], others[2]], [unseeded, sp, unseeded, unseeded], False
    )
    assert batched[1]["token_ids"] == alone
    again = llm.generate([prompt, prompt], sp, use_tqdm=False)  # twice in one batch, too
    assert again[0]["token_ids"] == again[1]["token_ids"] == alone
    other_seed = dataclasses.replace(sp, seed=4321)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0]["token_ids"] != alone


def test_stop_strings_end_the_text_before_the_stop(llm):
    prompt = ids(6, 5)
    full = llm.generate([prompt], greedy(max_tokens=24), use_tqdm=False)[0]
    text = full["text"]
    stop = text[8:11]
    cut = text.find(stop)
    out = llm.generate([prompt], greedy(max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["stop_reason"] == stop
    assert out["text"] == text[:cut]
    n = len(out["token_ids"])
    assert n < 24 and out["token_ids"] == full["token_ids"][:n]
    assert stop in llm.get_tokenizer().decode(out["token_ids"])  # the ids keep the stop
    assert stop not in llm.get_tokenizer().decode(out["token_ids"][:-1])  # ended at once
    sp = greedy(max_tokens=24, stop=["never-generated", stop], include_stop_str_in_output=True)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert out["text"] == text[: cut + len(stop)]
    out = llm.generate([prompt], greedy(max_tokens=24, stop=["\x00zz"]), use_tqdm=False)[0]
    assert out["finish_reason"] == "length" and out["text"] == text and "stop_reason" not in out


def test_logprobs_hold_the_sampled_and_top_tokens(llm):
    prompt = ids(11, 6)
    out = llm.generate([prompt], greedy(max_tokens=5, logprobs=3), use_tqdm=False)[0]
    assert len(out["logprobs"]) == 5
    for token, entry in zip(out["token_ids"], out["logprobs"]):
        assert token in entry and 3 <= len(entry) <= 4
        assert all(v <= 0 for v in entry.values())
        assert entry[token] == max(entry.values())  # greedy: the sampled one is the top one
    sampled = SamplingParams(temperature=1.0, max_tokens=5, logprobs=0, seed=3, ignore_eos=True)
    out = llm.generate([prompt], sampled, use_tqdm=False)[0]
    assert [list(e) for e in out["logprobs"]] == [[t] for t in out["token_ids"]]
    assert "logprobs" not in llm.generate([prompt], greedy(max_tokens=2), use_tqdm=False)[0]


def test_min_tokens_keeps_stop_ids_from_ending_early(llm):
    prompt = ids(7, 7)
    first = llm.generate([prompt], greedy(max_tokens=6), use_tqdm=False)[0]["token_ids"][0]
    sp = SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[first])
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert out["token_ids"] == [first] and out["finish_reason"] == "stop"
    sp = dataclasses.replace(sp, min_tokens=3, logprobs=1)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert first not in out["token_ids"][:3] and len(out["token_ids"]) >= 4
    # the masked token is still the model's favourite in the raw logprobs
    assert max(out["logprobs"][0], key=out["logprobs"][0].get) == first


def test_chat_applies_the_template(llm):
    conv = [{"role": "user", "content": "Hello world"}]
    tok = llm.get_tokenizer()
    templated = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert templated.endswith("<|im_start|>assistant\n")
    out = llm.chat(conv, greedy(max_tokens=4), use_tqdm=False)
    assert out == llm.generate([templated], greedy(max_tokens=4), use_tqdm=False)
    two = llm.chat([conv, conv + [{"role": "assistant", "content": "Hi"}]], greedy(), False)
    assert len(two) == 2 and two[0]["token_ids"] != []
    with pytest.raises(ValueError, match=r"messages\[0\].*role"):
        llm.chat([{"content": "no role"}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        llm.chat([conv, "not a conversation"], use_tqdm=False)


def test_chat_without_a_template_is_a_clear_error(tiny_model, tmp_path):
    import shutil

    path = shutil.copytree(tiny_model, tmp_path / "m")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    llm = LLM(str(path))
    assert not llm.get_tokenizer().chat_template
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


def test_every_option_is_documented():
    doc = _LLM.__doc__
    for name in Config.field_names() - {"model"}:
        assert f"``{name}" in doc, name
    assert "max_tokens" in SamplingParams.__doc__
    for f in dataclasses.fields(SamplingParams):
        assert f"``{f.name}``" in SamplingParams.__doc__, f.name


def test_generate_after_exit_is_a_clear_error(tiny_model):
    llm = LLM(tiny_model)
    llm.exit()
    for call in (lambda: llm.generate([[1, 2]], use_tqdm=False), lambda: llm.chat([])):
        with pytest.raises(RuntimeError, match=r"shut down by exit\(\).*create a new LLM"):
            call()
