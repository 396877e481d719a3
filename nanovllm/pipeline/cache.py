"""The pipeline calibration's disk cache: one entry per card, software, model shape and split.

A key hashes everything that changes the timings (``cache_key``); the file is JSON, rewritten
atomically, ``$NANOVLLM_CACHE/nanovllm/pipeline_calibration.json`` (default ``~/.cache``).
Delete it after a driver or code change to re-measure.
"""

from __future__ import annotations

import hashlib
import json
import os


def cache_key(identity: list[str], split: tuple[int, int], num_microbatches: int, context: int):
    """(key, parts) of one split's calibration: ``identity`` names the card, software, model
    shape and options that change the timings (``PipelineSetup.identity``)."""
    parts = [
        *identity,
        f"sms={split[0]},{split[1]}",
        f"m={num_microbatches}",
        f"ctx={context}",
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
