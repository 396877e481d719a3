"""The pipeline calibration's disk cache: round trip and what its key distinguishes."""

from types import SimpleNamespace

from nanovllm.pipeline import cache as pc


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    assert pc.load_cached("k") is None
    buckets = {8: {"mode": "pipelined", "sequential_ms": 2.0, "pipelined_ms": 1.5}}
    pc.store_cached("k", ["H100", "8b"], buckets)
    pc.store_cached("other", ["H100", "0.6b"], {2: {"mode": "sequential"}})
    assert pc.load_cached("k") == buckets


def test_cache_key_names_what_changes_the_timings(tiny_model):
    """The key covers the card, software, model shape and the options that change timings
    (``DecodeSetup.identity``), the split, the micro-batch count and the context."""
    from nanovllm import LLM

    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16)
    setup = llm.model_runner._decode_setup()

    def identity(kernel="triton", gemm="triton"):
        config = SimpleNamespace(pipeline_attention_kernel=kernel, pipeline_ffn_gemm=gemm)
        return setup.identity(config)

    key, parts = pc.cache_key(identity(), (40, 92), 2, 1024)
    assert key == pc.cache_key(identity(), (40, 92), 2, 1024)[0]
    assert "sms=40,92" in parts and "attention_kernel=triton" in parts
    assert str(llm.runtime.hf_config.hidden_size) in parts and "graphs=False" in parts
    assert key != pc.cache_key(identity("tma"), (40, 92), 2, 1024)[0]
    assert key != pc.cache_key(identity("triton", "cublas"), (40, 92), 2, 1024)[0]
    assert key != pc.cache_key(identity(), (24, 108), 2, 1024)[0]
    assert key != pc.cache_key(identity(), (40, 92), 3, 1024)[0]
    assert key != pc.cache_key(identity(), (40, 92), 2, 512)[0]
