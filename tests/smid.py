"""A probe kernel that records which SM each of its programs ran on (``%smid``), used by the
tests to check that work launched on a green-context stream stays on its partition."""

import torch
import triton
import triton.language as tl


@triton.jit
def _smid_kernel(out_ptr, iters):
    pid = tl.program_id(0)
    smid = tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1
    )
    acc = pid.to(tl.float32)
    for _ in range(iters):  # keep each program busy so the launch spreads over the partition
        acc = acc * 1.0000001 + 0.5
    tl.store(out_ptr + pid, smid + (acc < -1.0).to(tl.int32))


def smid_probe(out: torch.Tensor, iters: int = 2000) -> None:
    """Launch ``out.numel()`` programs on the current stream; program i writes its SM id to
    ``out[i]`` (int32, CUDA)."""
    _smid_kernel[(out.numel(),)](out, iters)
