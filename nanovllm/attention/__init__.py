"""Attention backends behind one small interface, chosen once at start-up.

Order on a GPU: flash-attn if importable, else our Triton kernels, else the torch reference.
``Config.attention_backend`` or the environment variable ``NANOVLLM_ATTENTION_BACKEND`` forces
one. Backend modules are imported lazily, so the package imports on any machine.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

__all__ = ["AttentionBackend", "AttentionMetadata", "select_attention_backend"]

# Backends that CUDA graphs can capture (no host synchronisation in decode).
GRAPH_SAFE = {"triton", "flash_attn"}


def _load(name: str) -> AttentionBackend:
    if name == "torch":
        from nanovllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ImportError(
                "the triton backend needs Triton: pip install 'nanovllm-pipeline[gpu]'"
            )
        from nanovllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flash_attn":
        from nanovllm.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}: use auto, torch, triton or flash_attn")


def select_attention_backend(requested: str, device: torch.device) -> AttentionBackend:
    forced = os.environ.get("NANOVLLM_ATTENTION_BACKEND") or requested
    if forced != "auto":
        if device.type != "cuda" and forced != "torch" and not os.environ.get("TRITON_INTERPRET"):
            raise ValueError(
                f"attention_backend={forced!r} needs a CUDA GPU; on {device.type} use 'torch' "
                "(or set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter)"
            )
        backend, why = _load(forced), "forced by configuration"
    elif device.type != "cuda":
        backend, why = _load("torch"), f"device is {device.type}"
    elif importlib.util.find_spec("flash_attn") is not None:
        backend, why = _load("flash_attn"), "flash-attn is installed"
    elif importlib.util.find_spec("triton") is not None:
        backend, why = _load("triton"), "flash-attn is not installed; Triton is"
    else:
        backend, why = _load("torch"), "neither flash-attn nor Triton is installed"
    logger.info("attention backend: %s (%s)", backend.name, why)
    return backend
