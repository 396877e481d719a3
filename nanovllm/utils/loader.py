"""Load Hugging Face safetensors checkpoints (one file or several shards) into our modules.

Packed modules (q/k/v -> qkv_proj, gate/up -> gate_up_proj) are filled shard by shard through
each parameter's ``weight_loader``. A missing, unexpected or mis-shaped tensor is an error that
names it. Only safetensors are read: no pickle.
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn


def _default_loader(param, loaded, name, shard_id=None):
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the model expects "
            f"{tuple(param.shape)}: the checkpoint does not match its config.json"
        )
    param.data.copy_(loaded)


def load_model(model: nn.Module, path: str) -> None:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors files in {path!r}: nanovllm loads weights only from safetensors "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            try:
                with safe_open(file, "pt", "cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (OSError, RuntimeError, SafetensorError) as e:
                raise ValueError(
                    f"cannot read {file!r} ({type(e).__name__}: {e}): the file is truncated or "
                    "corrupted; download it again (compare its size and checksum with the "
                    "original)"
                ) from e

    load_weights(model, tensors(), f"the checkpoint at {path!r}")


def load_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str
) -> None:
    """Copy full (unsharded) tensors named as in a Hugging Face checkpoint into ``model``; each
    parameter's ``weight_loader`` keeps its rank's shard."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    # A packed parameter counts as loaded once every one of its shards has arrived.
    needed: dict[str, set] = {name: {None} for name in params}
    for target, shard in packed.values():
        for name in params:
            if f".{target}." in name:
                needed[name] = needed[name] - {None} | {shard}
    if tied:
        needed.pop("lm_head.weight", None)
    loaded: dict[str, set] = {name: set() for name in params}
    unexpected = []
    for hf_name, tensor in weights:
        if tied and hf_name == "lm_head.weight":
            continue  # tied checkpoints may still carry a copy of the embedding
        name, shard = hf_name, None
        for fragment, (target, shard_id) in packed.items():
            if f".{fragment}." in hf_name:
                name, shard = hf_name.replace(fragment, target), shard_id
                break
        param = params.get(name)
        if param is None:
            unexpected.append(hf_name)
            continue
        loader = getattr(param, "weight_loader", _default_loader)
        loader(param, tensor, hf_name, shard)
        loaded[name].add(shard)
    if unexpected:
        raise ValueError(
            f"unexpected tensors in {source}: {sorted(unexpected)[:8]} "
            f"({len(unexpected)} in all): the checkpoint is not a Qwen3 model matching config.json"
        )
    # Name missing tensors as the checkpoint would (k_proj, not our packed qkv_proj).
    missing = []
    for n, shards in needed.items():
        for shard in shards - loaded[n]:
            hf = [n.replace(t, f) for f, (t, s) in packed.items() if s == shard and f".{t}." in n]
            missing.append(hf[0] if shard is not None and hf else n)
    missing.sort()
    if missing:
        raise ValueError(
            f"tensors missing from {source}: {missing[:8]} ({len(missing)} in "
            "all): the checkpoint is incomplete or does not match config.json"
        )


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights (``load_format="dummy"``) for benchmarks at real shapes without files.

    Every tensor of the would-be checkpoint is drawn whole, from a generator seeded by ``seed``
    and its name, then loaded like a real one: each tensor-parallel rank keeps its shard of the
    same full tensor, so any ``tensor_parallel_size`` builds the same model.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # names and full shapes only; no memory
        reference = AutoModelForCausalLM.from_config(model.config)
    shapes = [(n, p.shape) for n, p in reference.named_parameters()]
    del reference
    first = next(model.parameters())
    dtype, device = first.dtype, first.device

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in shapes:
            t = torch.empty(shape, dtype=dtype, device=device)
            if name.endswith("norm.weight"):
                yield name, t.fill_(1.0)
                continue
            gen = torch.Generator(device).manual_seed(seed + zlib.crc32(name.encode()))
            yield name, t.normal_(0, std, generator=gen)

    load_weights(model, tensors(), "the dummy weights")
