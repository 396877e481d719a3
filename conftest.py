import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen3 in real Hugging Face format (transformers 5 config style), float32."""
    from nanovllm.utils.default_model import make_random_qwen3

    return make_random_qwen3(str(tmp_path_factory.mktemp("tiny-qwen3")), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_variants(tmp_path_factory) -> dict[str, str]:
    """The same weights saved as hub-style config.json, and as several safetensors shards with
    untied embeddings."""
    from nanovllm.utils.default_model import make_random_qwen3

    root = tmp_path_factory.mktemp("variants")
    return {
        "hub": make_random_qwen3(str(root / "hub"), "tiny", config_style="hub", seed=1),
        "sharded": make_random_qwen3(
            str(root / "sharded"),
            "tiny",
            max_shard_size="200KB",
            seed=2,
            tie_word_embeddings=False,
        ),
    }


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers' generate(do_sample=False), one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        y = model.generate(
            x,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
        out.append(y[0, len(ids) :].tolist())
    return out


@pytest.fixture(scope="session")
def gpu_model_06b(tmp_path_factory) -> str:
    """A bf16 random-weight model of Qwen3-0.6B shape, saved by transformers (GPU tests only)."""
    if not HAS_GPU:
        pytest.skip("needs an NVIDIA GPU")
    from nanovllm.utils.default_model import make_random_qwen3

    path = str(tmp_path_factory.mktemp("qwen3-0.6b-random"))
    return make_random_qwen3(path, "0.6b", dtype=torch.bfloat16, device="cuda", seed=0)


def mixed_prompts(n: int, seed: int = 0, vocab: int = 400, lo: int = 3, hi: int = 300):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def random_engine_options(rng, batched_tokens=(48, 256)) -> dict:
    """Few slots, admission in ones or twos, a small or larger cache, a small or larger budget."""
    kw = dict(max_num_seqs=rng.choice([3, 5]), prefill_admission_batch=rng.choice([1, 2]))
    kw.update(
        num_kvcache_blocks=rng.choice([12, 40]), max_num_batched_tokens=rng.choice(batched_tokens)
    )
    return kw


def random_workload(rng, num_prompts: int = 11, max_suffix: int = 30):
    """Prompts (about half share a 20-token prefix: prefix-cache hits) and their params: greedy
    with 150 stop ids (some get sampled mid-way) or seeded sampling at temperature 0.9."""
    from nanovllm import SamplingParams

    shared = [rng.randrange(3, 400) for _ in range(20)]
    prompts = [
        (shared if rng.random() < 0.5 else [])
        + [rng.randrange(3, 400) for _ in range(rng.randrange(2, max_suffix))]
        for _ in range(num_prompts)
    ]
    params = []
    for _ in prompts:
        stop = [rng.randrange(3, 400) for _ in range(150)]
        if rng.random() < 0.5:
            n = rng.randrange(1, 40)
            params.append(SamplingParams(temperature=0, max_tokens=n, stop_token_ids=stop))
        else:
            seed, n = rng.randrange(1000), rng.randrange(1, 40)
            params.append(SamplingParams(temperature=0.9, seed=seed, max_tokens=n))
    return prompts, params
