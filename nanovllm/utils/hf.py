"""Small readers of Hugging Face checkpoint metadata, and device/dtype resolution."""

from __future__ import annotations

import json
import logging
import os

import torch

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
