"""Sampler time per call on the GPU: the unfiltered path (Gumbel-max; the fused Triton kernel on
CUDA) against the sorting path that top-k / top-p need, at Qwen3's 152k vocabulary.

    python benchmarks/sampler_bench.py
"""

import time

import torch

from nanovllm.layers.sampler import Sampler, SamplingTensors

dev = torch.device("cuda")
s = Sampler()
g = torch.Generator(dev).manual_seed(0)
for n in (64, 256, 512):
    logits = torch.randn(n, 151936, device=dev, dtype=torch.bfloat16)
    res = {}
    for name, top_p in (("gumbel (no filter)", 1.0), ("sort (top_p=0.95)", 0.95)):
        st = SamplingTensors.build([0.6] * n, [0] * n, [top_p] * n, dev)
        for _ in range(3):
            s(logits, st, g)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            s(logits, st, g)
        torch.cuda.synchronize()
        res[name] = (time.perf_counter() - t) / 20 * 1e3
    print(f"batch {n}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()))
