"""Load Hugging Face safetensors checkpoints (one file or several shards) into our modules.

Packed modules (q/k/v -> qkv_proj, gate/up -> gate_up_proj) are filled shard by shard through
each parameter's ``weight_loader``. A missing, unexpected or mis-shaped tensor is an error that
names it. Only safetensors are read: no pickle.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
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
    for file in files:
        with safe_open(file, "pt", "cpu") as f:
            for hf_name in f.keys():
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
                loader(param, f.get_tensor(hf_name), hf_name, shard)
                loaded[name].add(shard)
    if unexpected:
        raise ValueError(
            f"unexpected tensors in the checkpoint at {path!r}: {sorted(unexpected)[:8]} "
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
            f"tensors missing from the checkpoint at {path!r}: {missing[:8]} ({len(missing)} in "
            "all): the checkpoint is incomplete or does not match config.json"
        )


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights (``load_format="dummy"``) for benchmarks at real shapes without files."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = gens.setdefault(param.device, torch.Generator(param.device).manual_seed(seed))
        param.normal_(0, std, generator=gen)
