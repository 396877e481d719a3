"""The pipeline calibration's disk cache: round trip and what its key distinguishes."""

from types import SimpleNamespace

import torch

from nanovllm.engine import pipeline_cache as pc


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    assert pc.load_cached("k") is None
    buckets = {8: {"mode": "pipelined", "sequential_ms": 2.0, "pipelined_ms": 1.5}}
    pc.store_cached("k", ["H100", "8b"], buckets)
    pc.store_cached("other", ["H100", "0.6b"], {2: {"mode": "sequential"}})
    assert pc.load_cached("k") == buckets


def test_cache_key_names_what_changes_the_timings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    from nanovllm.utils.default_model import SHAPES

    hf = SimpleNamespace(**SHAPES["8b"])

    def runner(kernel, gemm="triton"):
        return SimpleNamespace(
            runtime=SimpleNamespace(hf_config=hf),
            config=SimpleNamespace(
                max_num_seqs=256, pipeline_attention_kernel=kernel, pipeline_ffn_gemm=gemm
            ),
            backend=SimpleNamespace(name="triton"),
            dtype=torch.bfloat16,
            device=torch.device("cpu"),
            graph_runner=object(),
        )

    key, parts = pc.cache_key(runner("triton"), 40, 92, 2, 1024)
    assert key == pc.cache_key(runner("triton"), 40, 92, 2, 1024)[0]
    assert "sms=40,92" in parts and "attention_kernel=triton" in parts
    assert key != pc.cache_key(runner("tma"), 40, 92, 2, 1024)[0]
    assert key != pc.cache_key(runner("triton", "cublas"), 40, 92, 2, 1024)[0]
    assert key != pc.cache_key(runner("triton"), 24, 108, 2, 1024)[0]
    assert key != pc.cache_key(runner("triton"), 40, 92, 3, 1024)[0]
