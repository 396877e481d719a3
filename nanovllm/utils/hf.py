"""Small readers of Hugging Face checkpoint metadata, and device/dtype resolution."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def eos_token_ids(path: str, hf_config) -> set[int]:
    """EOS ids from generation_config.json, else config.json."""
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            ids = _as_set(json.load(f).get("eos_token_id"))
        if ids:
            return ids
    return _as_set(getattr(hf_config, "eos_token_id", None))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info("device: %s (automatic)", device)
    if device == "cuda":  # an explicit index: set_device and memory queries need one
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def resolve_dtype(dtype: str, hf_config, device: torch.device) -> torch.dtype:
    """``auto`` is the checkpoint's dtype on a GPU and float32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(ckpt, str):
        ckpt = _DTYPES.get(ckpt.replace("torch.", ""), torch.bfloat16)
    resolved = ckpt if ckpt in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    logger.info("dtype: %s (from the checkpoint)", resolved)
    return resolved


# ----------------------------------------------------------------- what the checkpoint may ask
def _unsupported(option: str, fix: str) -> ValueError:
    return ValueError(f"config.json sets {option}, which nanovllm does not support: {fix}")


def check_supported_config(hf_config) -> None:
    """Every Qwen3 config field that changes the model's math, against what our Qwen3
    implements: a field we would ignore is an error, never a silently wrong answer.

    Supported: the shapes, ``head_dim``, ``attention_bias``, ``rms_norm_eps``,
    ``tie_word_embeddings``, default RoPE (``rope_theta``). Irrelevant at inference:
    ``attention_dropout``, ``initializer_range``, ``use_cache``.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "qwen3":
        raise _unsupported(
            f"model_type={model_type!r}",
            'nanovllm runs Qwen3 checkpoints only (model_type "qwen3", Qwen3ForCausalLM)',
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise _unsupported(f"hidden_act={act!r}", 'the Qwen3 MLP here is SiLU-gated: use "silu"')
    for key in ("rope_parameters", "rope_scaling"):
        rope = getattr(hf_config, key, None) or {}
        kind = (
            rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        )
        if kind not in (None, "default"):
            raise _unsupported(
                f"{key} of type {kind!r}",
                "only default RoPE is implemented: remove the scaling from config.json (and keep "
                "prompt + output within the trained max_position_embeddings) or use another engine",
            )
    sliding = getattr(hf_config, "use_sliding_window", False)
    layer_types = getattr(hf_config, "layer_types", None) or []
    if sliding or any(t != "full_attention" for t in layer_types):
        window = getattr(hf_config, "sliding_window", None)
        kinds = sorted(set(layer_types) - {"full_attention"})
        raise _unsupported(
            f"use_sliding_window={sliding} (sliding_window={window}, "
            f"layer types {kinds or 'all full'})",
            "nanovllm attends over the full context on every layer: set use_sliding_window to "
            "false (and layer_types to full_attention) if the model was trained that way, or use "
            "an engine with sliding-window attention",
        )
    quant = getattr(hf_config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise _unsupported(
            f"quantization_config (quant_method={method!r})",
            "nanovllm loads unquantized float16/bfloat16/float32 weights only: use the "
            "unquantized checkpoint",
        )


# ----------------------------------------------------------------- files of a model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def check_model_folder(path: str) -> None:
    """A folder without config.json says so (transformers would talk about a model_type key)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{os.path.join(path, 'config.json')} is missing: the model folder must be a Hugging "
            "Face checkpoint (config.json, *.safetensors, tokenizer files); download the whole "
            "repository, e.g. huggingface-cli download Qwen/Qwen3-0.6B --local-dir PATH"
        )


def load_tokenizer(path: str, skip_tokenizer_init: bool = False) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None with ``skip_tokenizer_init`` (token ids only).
    Without tokenizer files transformers returns an empty tokenizer: that is an error here."""
    if skip_tokenizer_init:
        return None
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= set(present):
        raise FileNotFoundError(
            f"no tokenizer in {path!r}: it needs tokenizer.json (or vocab.json and merges.txt) "
            f"with tokenizer_config.json, and has {present or 'none of them'}: copy the "
            "tokenizer files from the original checkpoint, or pass skip_tokenizer_init=True to "
            "use token-id prompts only"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
