"""load_model on edited copies of the tiny checkpoint: missing, unexpected and mis-shaped
tensors are ValueErrors naming the tensor; no safetensors is FileNotFoundError; a tied checkpoint
that still carries lm_head.weight loads."""

import glob
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.loader import load_model

LAYER0 = "model.layers.0"


def copy_checkpoint(src: str, dst) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    return dst


def edit(path: str, fn) -> None:
    """Apply ``fn(state_dict)`` to the shard(s) of the checkpoint at ``path``."""
    for file in glob.glob(os.path.join(path, "*.safetensors")):
        sd = load_file(file)
        fn(sd)
        save_file(sd, file, metadata={"format": "pt"})


def build(path: str) -> Qwen3ForCausalLM:
    config = AutoConfig.from_pretrained(path)
    with torch.device("cpu"):
        return Qwen3ForCausalLM(config).float()


def load(path: str) -> Qwen3ForCausalLM:
    model = build(path)
    load_model(model, path)
    return model


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_file(os.path.join(tiny_model, "model.safetensors"))


def test_intact_checkpoint_loads_every_tensor(tiny_model, reference):
    model = load(tiny_model)
    params = dict(model.named_parameters())
    attn = f"{LAYER0}.self_attn"
    qkv = torch.cat([reference[f"{attn}.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(params[f"{attn}.qkv_proj.weight"], qkv)
    gate_up = torch.cat([reference[f"{LAYER0}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(params[f"{LAYER0}.mlp.gate_up_proj.weight"], gate_up)
    emb = reference["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


@pytest.mark.parametrize(
    "tensor",
    [
        f"{LAYER0}.mlp.down_proj.weight",
        f"{LAYER0}.self_attn.k_proj.weight",  # one shard of the packed qkv_proj
        f"{LAYER0}.mlp.up_proj.weight",  # one shard of the packed gate_up_proj
        "model.norm.weight",
        "model.embed_tokens.weight",
    ],
)
def test_missing_tensor_is_named(tiny_model, tmp_path, tensor):
    path = copy_checkpoint(tiny_model, tmp_path / "ckpt")
    edit(path, lambda sd: sd.pop(tensor))
    with pytest.raises(ValueError, match="missing") as info:
        load(path)
    assert repr(tensor) in str(info.value)  # the checkpoint's own name, not ours


def test_unexpected_tensor_is_named(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path / "ckpt")
    name = f"{LAYER0}.self_attn.rotary_emb.inv_freq_extra"
    edit(path, lambda sd: sd.__setitem__(name, torch.zeros(4)))
    with pytest.raises(ValueError, match="unexpected") as info:
        load(path)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "tensor,shape",
    [
        (f"{LAYER0}.mlp.down_proj.weight", (128, 383)),
        (f"{LAYER0}.self_attn.q_proj.weight", (96, 128)),
        (f"{LAYER0}.mlp.gate_proj.weight", (384, 127)),
        (f"{LAYER0}.input_layernorm.weight", (64,)),
        ("model.embed_tokens.weight", (433, 128)),
    ],
)
def test_misshaped_tensor_is_named(tiny_model, tmp_path, tensor, shape):
    path = copy_checkpoint(tiny_model, tmp_path / "ckpt")
    edit(path, lambda sd: sd.__setitem__(tensor, torch.zeros(shape)))
    with pytest.raises(ValueError) as info:
        load(path)
    msg = str(info.value)
    assert repr(tensor) in msg and str(tuple(shape)) in msg and "config.json" in msg


def test_folder_without_safetensors(tiny_model, tmp_path):
    path = copy_checkpoint(tiny_model, tmp_path / "ckpt")
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        os.rename(f, f.replace(".safetensors", ".bin"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load(path)


def test_tied_checkpoint_with_lm_head_copy_loads(tiny_model, tmp_path, reference):
    path = copy_checkpoint(tiny_model, tmp_path / "ckpt")
    emb = reference["model.embed_tokens.weight"]
    edit(path, lambda sd: sd.__setitem__("lm_head.weight", emb.clone()))
    assert "lm_head.weight" in load_file(os.path.join(path, "model.safetensors"))
    model = load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, emb)


def test_untied_checkpoint_needs_lm_head(tiny_model_variants, tmp_path):
    path = copy_checkpoint(tiny_model_variants["sharded"], tmp_path / "ckpt")
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) > 1
    model = load(path)  # intact: loads across shards
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    edit(path, lambda sd: sd.pop("lm_head.weight", None))
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        load(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "empty"])
def test_corrupted_safetensors_names_the_file(tiny_model, tmp_path, damage):
    path = copy_checkpoint(tiny_model, tmp_path / "ckpt")
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    damaged = {
        "truncated": data[: len(data) // 2],
        "garbage_header": b"\xff" * 8 + data[8:],
        "empty": b"",
    }[damage]
    with open(file, "wb") as f:
        f.write(damaged)
    with pytest.raises(ValueError) as info:
        load(path)
    msg = str(info.value)
    assert repr(file) in msg and "truncated or corrupted" in msg and "download it again" in msg
