"""Random-weight Qwen3 checkpoints in the real Hugging Face format, made with transformers.

Used as the built-in default model (so examples run with no download), by the tests, and by the
benchmarks at the real Qwen3-0.6B and Qwen3-8B shapes.
"""

from __future__ import annotations

import json
import logging
import os

import torch

logger = logging.getLogger(__name__)

# Real shapes of the released models, and a tiny one for CPU.
SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    ),
    "0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
        vocab_size=151936,
    ),
}

_CORPUS = (
    "Hello world. The quick brown fox jumps over the lazy dog. Large language models generate "
    "text one token at a time; a paged KV cache keeps the keys and values of every token. "
    "Attention reads the cache, the feed-forward network reads the weights. 0123456789 "
    "def main(): return sum(x * x for x in range(10)) # Python code, too. "
)


# Qwen's ChatML format: <|im_start|>role\ncontent<|im_end|>\n per message, then the assistant's
# turn opened when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Bump when the built-in model's files change, so caches of an older one are not reused.
DEFAULT_MODEL_VERSION = 2


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a built-in corpus (no download), with ChatML's
    special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_random_qwen3(
    path: str,
    shape: str = "tiny",
    *,
    config_style: str = "v5",
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    write_weights: bool = True,
    device: str = "cpu",
    **overrides,
) -> str:
    """Save a random-weight Qwen3 (config.json, *.safetensors, tokenizer, generation config).

    ``config_style="hub"`` rewrites config.json the way the released checkpoints ship it
    (``rope_theta``, ``rope_scaling: null``, ``torch_dtype``); ``"v5"`` keeps transformers 5's
    (``rope_parameters``, ``dtype``). ``write_weights=False`` writes everything but the weights,
    for ``load_format="dummy"`` benchmarks.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    params = dict(SHAPES[shape])
    params.setdefault("vocab_size", len(tokenizer))
    params.update(overrides)
    eos = tokenizer.eos_token_id
    config = Qwen3Config(
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        bos_token_id=eos,
        eos_token_id=eos,
        **params,
    )
    config.dtype = dtype
    if write_weights:
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM(config).to(dtype)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, safe_serialization=True, **kwargs)
        del model
    else:
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(eos_token_id=eos, bos_token_id=eos).save_pretrained(path)
    if config_style == "hub":
        _rewrite_hub_style(os.path.join(path, "config.json"))
    return path


def _rewrite_hub_style(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 1000000.0))
    cfg["rope_scaling"] = None
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)


def default_model_path() -> str:
    """The built-in default: a tiny random Qwen3, made on first use and cached on disk."""
    root = os.environ.get("NANOVLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    path = os.path.join(root, "nanovllm", f"tiny-random-qwen3-v{DEFAULT_MODEL_VERSION}")
    if not os.path.exists(os.path.join(path, "config.json")):
        logger.info("no model given: creating a tiny random-weight Qwen3 at %s", path)
        tmp = f"{path}.tmp-{os.getpid()}"
        make_random_qwen3(tmp, "tiny")
        try:
            os.replace(tmp, path)  # atomic: a concurrent first use sees all or nothing
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return path
