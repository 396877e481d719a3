"""The model registry: Hugging Face architecture name -> our implementation.

Adding a model is one module that implements ``StagedDecoder`` (``nanovllm/models/staged.py``)
and one line here. Modules are imported only when their architecture is asked for.
"""

from __future__ import annotations

import importlib

from nanovllm.models.staged import AttentionShape, StagedDecoder

__all__ = ["AttentionShape", "StagedDecoder", "model_class", "supported_architectures"]

# architecture (config.json "architectures") -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("nanovllm.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(hf_config) -> type:
    """The class for ``hf_config``'s architecture; a ValueError naming the supported ones."""
    names = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type == "qwen3":
        names = ["Qwen3ForCausalLM"]  # configs written without "architectures"
    for name in names:
        if name in _REGISTRY:
            module, cls = _REGISTRY[name]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"config.json architectures={names} (model_type={model_type!r}) is not supported: "
        f"use a checkpoint of one of {supported_architectures()}"
    )
