"""A mixed step's attention (issue 15): one varlen launch where decode rows are sequences of
query length 1 over their paged keys, beside prefill chunks (with and without a cached prefix).

The torch reference's varlen path must give each decode row what its decode path gives; the
Triton varlen kernel must match the torch reference (CPU: Triton interpreter, tiny float32
shapes; GPU: bf16/fp16 at real shapes)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from nanovllm.attention.metadata import AttentionMetadata  # noqa: E402
from tests.helpers import load_test_module  # noqa: E402

tb = load_test_module("attention/test_triton_backend.py")
TORCH, TRITON, CPU, GPU = tb.TORCH, tb.TRITON, tb.CPU, tb.GPU

# (query length, cached keys before it) per row: decode rows (1, context - 1) first, as the
# scheduler orders them, then prefill chunks: a chunk after a cached prefix, a new prompt, the
# continuation of a chunked prefill, and a one-token prompt.
MIXED_CPU = ([1, 1, 1, 7, 18, 16, 1], [36, 4, 16, 20, 0, 16, 0])


def decode_rows_meta(meta: AttentionMetadata, rows: list[int]) -> AttentionMetadata:
    """The decode metadata of ``rows`` of a mixed step (each a query of length 1)."""
    cu_k = meta.cu_seqlens_k.tolist()
    return AttentionMetadata(
        is_prefill=False,
        slot_mapping=meta.slot_mapping[rows],
        context_lens=torch.tensor([cu_k[i + 1] - cu_k[i] for i in rows], dtype=torch.int32),
        block_tables=meta.block_tables[rows],
    )


def mixed_case(len_q, prefix, group, head_dim, block_size, dtype, device):
    return tb.prefill_case(len_q, prefix, 2, group, head_dim, block_size, dtype, device, True)


@pytest.mark.parametrize("group", [1, 4])
def test_torch_varlen_decode_rows_equal_torch_decode(group):
    q, k, v, k_cache, v_cache, meta = mixed_case(*MIXED_CPU, group, 16, 16, torch.float32, CPU)
    out = TORCH.prefill(q, k, v, k_cache, v_cache, meta, scale=0.25)  # [num_tokens, H, D]
    rows = [0, 1, 2]  # the decode rows; their queries are tokens 0, 1, 2
    ref = TORCH.decode(q[rows], k_cache, v_cache, decode_rows_meta(meta, rows), scale=0.25)
    tb.assert_close(out[rows], ref, atol=1e-6)


@tb.interpreter
@pytest.mark.parametrize("group", [1, 4])
def test_triton_mixed_step_matches_torch_cpu(group):
    args = mixed_case(*MIXED_CPU, group, 16, 16, torch.float32, CPU)
    ref = TORCH.prefill(*args, scale=0.25)
    out = TRITON.prefill(*args, scale=0.25)
    tb.assert_close(out, ref, atol=1e-5)


@tb.interpreter
def test_triton_mixed_step_of_decode_rows_only_matches_its_decode_kernel_cpu():
    """Decode rows alone through the varlen kernel (as a mixed step runs them) give what the
    decode kernel gives them."""
    q, k, v, k_cache, v_cache, meta = mixed_case(
        [1, 1, 1], [40, 0, 15], 2, 16, 16, torch.float32, CPU
    )
    out = TRITON.prefill(q, k, v, k_cache, v_cache, meta, scale=0.25)
    ref = TRITON.decode(q, k_cache, v_cache, decode_rows_meta(meta, [0, 1, 2]), scale=0.25)
    tb.assert_close(out, ref, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 256])
def test_triton_mixed_step_matches_torch_gpu(dtype, group, block_size):
    decodes = [1] * 40
    contexts = torch.randint(0, 3000, (40,), generator=torch.Generator().manual_seed(0))
    len_q = [*decodes, 512, 77, 1030, 1]
    prefix = [*contexts.tolist(), 0, 300, 17, 0]
    args = mixed_case(len_q, prefix, group, 128, block_size, dtype, GPU)
    ref = TORCH.prefill(*args, scale=128**-0.5)
    out = TRITON.prefill(*args, scale=128**-0.5)
    tb.assert_close(out, ref, atol=tb.ATOL)
