"""Checkpoint folders and configs we cannot run faithfully are errors at load that name the
option or the missing file and the fix, never a silently wrong answer."""

import json
import os
import shutil

import pytest
from transformers import Qwen3Config

from nanovllm import LLM, SamplingParams
from nanovllm.utils.hf import check_supported_config


def copy_model(src: str, dst, **config_changes) -> str:
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(config_changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return str(dst)


# (config.json changes, fragments of the message: the option and the fix)
UNSUPPORTED = {
    "sliding_window": (
        dict(use_sliding_window=True, sliding_window=16),
        ["use_sliding_window=True", "sliding_window=16", "set use_sliding_window to false"],
    ),
    "sliding_layer_types": (
        dict(layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=16),
        ["sliding_attention", "full context"],
    ),
    "hidden_act": (dict(hidden_act="gelu"), ["hidden_act='gelu'", "silu"]),
    "rope_yarn": (
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
        ["'yarn'", "only default RoPE", "remove the scaling"],
    ),
    "rope_linear_hub_style": (
        dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e6),
        ["'linear'", "only default RoPE"],
    ),
    "quantized": (
        dict(quantization_config={"quant_method": "awq", "bits": 4}),
        ["quantization_config", "'awq'", "unquantized checkpoint"],
    ),
    "other_model": (dict(model_type="llama"), ["model_type='llama'", "Qwen3"]),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_option_is_refused_at_load(tiny_model, tmp_path, case):
    changes, fragments = UNSUPPORTED[case]
    path = copy_model(tiny_model, tmp_path / "m", **changes)
    with pytest.raises(ValueError) as info:
        LLM(path, device="cpu", num_kvcache_blocks=4, kvcache_block_size=16)
    msg = str(info.value)
    assert "config.json sets" in msg and "not support" in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_fields_that_keep_the_math_are_accepted():
    check_supported_config(Qwen3Config(attention_bias=True, attention_dropout=0.1))
    check_supported_config(Qwen3Config(use_sliding_window=False, sliding_window=4096))
    check_supported_config(Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        # transformers leaves these layers full; we refuse anyway rather than guess
        check_supported_config(Qwen3Config(use_sliding_window=True, num_hidden_layers=2))


def test_folder_without_config_json_says_so(tiny_model, tmp_path):
    path = shutil.copytree(tiny_model, tmp_path / "m")
    os.remove(path / "config.json")
    with pytest.raises(FileNotFoundError) as info:
        LLM(str(path), device="cpu")
    msg = str(info.value)
    assert "config.json is missing" in msg and str(path) in msg and "model_type" not in msg


def test_folder_without_tokenizer_files_is_an_error(tiny_model, tmp_path):
    path = shutil.copytree(tiny_model, tmp_path / "m")
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "chat_template", "special_tokens")):
            os.remove(path / name)
    with pytest.raises(FileNotFoundError) as info:
        LLM(str(path), device="cpu")
    msg = str(info.value)
    assert "no tokenizer" in msg and "tokenizer.json" in msg and "skip_tokenizer_init=True" in msg
    # token ids only, on explicit request: text is None, str prompts and stop strings refused
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True, kvcache_block_size=16)
    assert llm.get_tokenizer() is None
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert out[0]["text"] is None and len(out[0]["token_ids"]) == 3
    with pytest.raises(ValueError, match=r"prompts\[1\] is a str.*skip_tokenizer_init"):
        llm.generate([[5], "hello"], use_tqdm=False)
    with pytest.raises(ValueError, match=r"sampling_params\[0\]\.stop.*tokenizer"):
        llm.generate([[5]], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match="chat\\(\\) needs a tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    assert not llm.scheduler.waiting and not llm.scheduler.running
