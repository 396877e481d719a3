"""The pipeline calibration's disk cache: one entry per card, software, model shape and split.

A key hashes everything that changes the timings (``cache_key``); the file is JSON, rewritten
atomically, ``$NANOVLLM_CACHE/nanovllm/pipeline_calibration.json`` (default ``~/.cache``).
Delete it after a driver or code change to re-measure.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch


def cache_key(runner, attention_sms: int, ffn_sms: int, num_microbatches: int, context: int):
    hf, cfg = runner.runtime.hf_config, runner.config
    parts = [
        torch.cuda.get_device_name(runner.device),
        torch.__version__,
        runner.backend.name,
        str(runner.dtype),
        *(
            str(getattr(hf, k, None))
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
            )
        ),
        f"sms={attention_sms},{ffn_sms}",
        f"m={num_microbatches}",
        f"ctx={context}",
        f"graphs={runner.graph_runner is not None}",
        f"max_num_seqs={cfg.max_num_seqs}",
        f"attention_kernel={cfg.pipeline_attention_kernel}",
        f"ffn_gemm={cfg.pipeline_ffn_gemm}",
        # fp8 caches get their own entries; "auto" keeps the keys of earlier calibrations
        *([] if (kv := getattr(cfg, "kv_cache_dtype", "auto")) == "auto" else [f"kv={kv}"]),
    ]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16], parts


def cache_path() -> str:
    root = os.environ.get("NANOVLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(root, "nanovllm", "pipeline_calibration.json")


def load_cached(key: str) -> dict | None:
    try:
        with open(cache_path()) as f:
            entry = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    return {int(b): v for b, v in entry["buckets"].items()} if entry else None


def store_cached(key: str, parts: list[str], buckets: dict[int, dict]) -> None:
    path = cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table[key] = {"describes": parts, "buckets": {str(b): v for b, v in buckets.items()}}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)
