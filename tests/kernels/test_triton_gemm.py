"""The bounded-grid persistent GEMM (nanovllm/kernels/triton_gemm.py) against torch.

CPU: the kernel through the Triton interpreter (fp16: the interpreter's tensor descriptors do
not round-trip bf16) and the qualification rules. GPU: bf16 at the Qwen3 projection shapes,
with grids smaller and larger than the tile count.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from nanovllm.kernels import triton_gemm  # noqa: E402

interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test: the gpu-marked tests cover the device"
)


@interpreter
@pytest.mark.parametrize(
    ("m", "n", "programs", "splits"),
    [(200, 256, 1, 1), (200, 384, 2, 1), (130, 256, 64, 1), (200, 256, 3, 2), (130, 384, 7, 4)],
)
def test_interpreted_kernel_matches_torch(m, n, programs, splits):
    """Rows past the last full tile, both tile widths (256 and 128 columns), grids smaller and
    larger than the number of work items, and K cut into slices summed afterwards."""
    torch.manual_seed(0)
    x = torch.randn(m, 256, dtype=torch.float16)
    w = torch.randn(n, 256, dtype=torch.float16)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    triton_gemm.prepare(x, w, out, programs, splits=splits)()
    torch.testing.assert_close(out.float(), x.float() @ w.float().T, rtol=1e-2, atol=1e-1)


def test_plan_cuts_long_k_only_where_tiles_are_too_few():
    # one micro-batch of 512 rows at the Qwen3-8B shapes on a 108-SM partition
    down = triton_gemm.plan(512, 4096, 12288, 108)
    assert down[1] > 1 and down[0] == triton_gemm.SPLIT_TILE  # 64 wide tiles of 192 k-steps
    assert triton_gemm.plan(512, 24576, 4096, 108) == ((128, 256, 8, 3), 1)  # gate/up: 384 tiles
    assert triton_gemm.plan(512, 4096, 4096, 108)[1] == 1  # o: the partial sums cost more
    assert triton_gemm.plan(512, 4096, 12288, 8)[1] == 1  # more tiles than programs
    with pytest.raises(ValueError, match="slices"):
        triton_gemm.prepare(torch.zeros(4, 192), torch.zeros(128, 192), torch.zeros(4, 128), 1,
                            splits=2)  # fmt: skip


def test_supported_names_the_reason_on_cpu():
    assert "CUDA GPU" in triton_gemm.supported(torch.zeros(4, 64), torch.zeros(128, 64))


def test_supported_rules_on_a_faked_sm90(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    class Fake:
        """Just what ``supported`` reads of a CUDA tensor."""

        def __init__(self, shape, dtype=torch.bfloat16, strides=None, ptr=0):
            self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda")
            self._strides = strides or (shape[1], 1)
            self._ptr = ptr

        def dim(self):
            return len(self.shape)

        def stride(self, i):
            return self._strides[i]

        def element_size(self):
            return 2

        def data_ptr(self):
            return self._ptr

    x, w = Fake((512, 4096)), Fake((6144, 4096))
    assert triton_gemm.supported(x, w) is None
    assert "dtypes" in triton_gemm.supported(Fake((512, 4096), torch.float32), w)
    assert "shapes" in triton_gemm.supported(Fake((512, 1024)), w)
    assert "multiple of 128" in triton_gemm.supported(x, Fake((6100, 4096)))
    assert "contiguous" in triton_gemm.supported(Fake((512, 4096), strides=(4096, 2)), w)
    assert "aligned" in triton_gemm.supported(Fake((512, 4096), ptr=8), w)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "sm_90" in triton_gemm.supported(x, w)


def test_tile_config_takes_wide_tiles_where_n_allows():
    assert triton_gemm.tile_config(24576) == (128, 256, 8, 3)
    assert triton_gemm.tile_config(384) == (128, 128, 4, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [256, 300, 512, 1000])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 12288), (24576, 4096), (1152, 1024)])
@pytest.mark.parametrize("num_sms", [8, 108, 1000])
def test_gpu_linear_matches_cublas(m, n, k, num_sms):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA tensor descriptors need an sm_90 GPU")
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5
    assert triton_gemm.supported(x, w) is None
    out = triton_gemm.linear(x, w, num_sms)
    cublas = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(out, cublas, rtol=2e-2, atol=2e-2)
    # as close to the fp32 product as cuBLAS's bf16 result is
    ref = x.float() @ w.float().T

    def err(y):
        return ((y.float() - ref).norm() / ref.norm()).item()

    assert err(out) <= 1.5 * err(cublas) + 1e-4, (err(out), err(cublas))


@pytest.mark.gpu
def test_gpu_linear_of_a_row_slice():
    """The pipeline hands micro-batch slices (row offsets into a larger buffer) to the GEMM."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA tensor descriptors need an sm_90 GPU")
    x = torch.randn(1024, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda") * 4096**-0.5
    part = x[264:776]
    assert triton_gemm.supported(part, w) is None
    torch.testing.assert_close(
        triton_gemm.linear(part, w, 100), torch.nn.functional.linear(part, w), rtol=2e-2, atol=2e-2
    )


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_gpu_split_k_is_exact_to_rounding_and_deterministic(splits):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA tensor descriptors need an sm_90 GPU")
    torch.manual_seed(0)
    x = torch.randn(300, 12288, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, 12288, dtype=torch.bfloat16, device="cuda") * 12288**-0.5
    outs = [torch.empty(300, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    for out in outs:
        triton_gemm.prepare(x, w, out, 108, splits=splits)()
    assert torch.equal(outs[0], outs[1])
    ref = x.float() @ w.float().T
    torch.testing.assert_close(outs[0].float(), ref, rtol=2e-2, atol=2e-2)
