"""Attention backends behind one small interface, in a registry, chosen once at start-up.

Order on a GPU: flash-attn if importable, else our Triton kernels, else the torch reference.
``Config.attention_backend`` or the environment variable ``NANOVLLM_ATTENTION_BACKEND`` forces
one. A new backend is one module (a subclass of ``AttentionBackend``) and one ``register_backend``
line; modules are imported only when chosen, so the package imports on any machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from nanovllm.attention.backend import AttentionBackend, DecodeMetadataBuffers
from nanovllm.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "DecodeMetadataBuffers",
    "backend_names",
    "register_backend",
    "select_attention_backend",
]


@dataclass(frozen=True)
class BackendSpec:
    """``requires``: the importable package the backend needs (None: torch alone), and
    ``install`` the command that provides it. ``gpu_only``: needs a CUDA device (or, for Triton,
    the interpreter: ``TRITON_INTERPRET=1``)."""

    name: str
    target: str  # "module:Class"
    requires: str | None = None
    install: str = ""
    gpu_only: bool = True

    def missing(self) -> str | None:
        """Why the backend cannot load here, or None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"the {self.name} backend needs {self.requires}: {self.install}"
        return None

    def load(self) -> AttentionBackend:
        why = self.missing()
        if why:
            raise ImportError(why)
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)()


_REGISTRY: dict[str, BackendSpec] = {}  # in order of preference for "auto" on a GPU


def register_backend(spec: BackendSpec) -> None:
    _REGISTRY[spec.name] = spec


register_backend(
    BackendSpec(
        "flash_attn",
        "nanovllm.attention.flash_attn_backend:FlashAttnBackend",
        requires="flash_attn",
        install="pip install 'nanovllm-pipeline[flash]'",
    )
)
register_backend(
    BackendSpec(
        "triton",
        "nanovllm.attention.triton_backend:TritonAttentionBackend",
        requires="triton",
        install="pip install 'nanovllm-pipeline[gpu]'",
    )
)
register_backend(
    BackendSpec("torch", "nanovllm.attention.torch_backend:TorchAttentionBackend", gpu_only=False)
)


def backend_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _spec(name: str) -> BackendSpec:
    if name not in _REGISTRY:
        raise ValueError(
            f"attention_backend={name!r} is unknown: use 'auto' or one of {backend_names()}"
        )
    return _REGISTRY[name]


def select_attention_backend(requested: str, device: torch.device) -> AttentionBackend:
    forced = os.environ.get("NANOVLLM_ATTENTION_BACKEND") or requested
    if forced != "auto":
        spec = _spec(forced)
        if device.type != "cuda" and spec.gpu_only and not os.environ.get("TRITON_INTERPRET"):
            raise ValueError(
                f"attention_backend={forced!r} needs a CUDA GPU; on {device.type} use 'torch' "
                "(or set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter)"
            )
        backend, why = spec.load(), "forced by configuration"
    elif device.type != "cuda":
        backend, why = _REGISTRY["torch"].load(), f"device is {device.type}"
    else:
        skipped = []
        for spec in _REGISTRY.values():
            missing = spec.missing()
            if missing is None:
                backend = spec.load()
                break
            skipped.append(f"{spec.name} unavailable")
        why = "; ".join(skipped) or "first in the registry"
    logger.info("attention backend: %s (%s)", backend.name, why)
    return backend
