"""Triton GPU kernels (paged KV-cache writes, prefill and split-KV decode attention)."""
