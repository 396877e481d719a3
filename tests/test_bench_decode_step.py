"""benchmarks/decode_step.py's cost columns (the timing itself runs on a GPU)."""

import pytest

from benchmarks import decode_step
from benchmarks.common import ModelCost

CARD = {"copy_gbs": 1000.0, "peak_tflops": 500.0}


def cost(kv_itemsize=2):
    return ModelCost(
        total_params=10**9, layer_params=8 * 10**8, matmul_params=7 * 10**8, hidden=1024,
        layers=28, heads=16, kv_heads=8, head_dim=128, itemsize=2, kv_itemsize=kv_itemsize,
    )  # fmt: skip


def test_serial_bound_adds_both_rooflines_and_the_floor_takes_the_larger():
    c = cost()
    for batch, ctx in [(1, 512), (64, 2048), (512, 512)]:
        mem = c.step_bytes(batch, ctx) / 1e12 * 1e3
        comp = c.step_flops(batch, ctx) / 5e14 * 1e3
        floor, bound = c.floor(batch, ctx, CARD)
        assert floor == pytest.approx(max(mem, comp))
        assert bound == ("memory" if mem >= comp else "compute")
        assert c.serial(batch, ctx, CARD) == pytest.approx(mem + comp)
        assert floor <= c.serial(batch, ctx, CARD) <= 2 * floor


def test_an_fp8_cache_halves_the_kv_bytes_only():
    bf16, fp8 = cost(), cost(kv_itemsize=1)
    assert fp8.kv_bytes(64, 512) * 2 == bf16.kv_bytes(64, 512)
    assert bf16.step_bytes(64, 512) - fp8.step_bytes(64, 512) == fp8.kv_bytes(64, 512)
    assert fp8.step_flops(64, 512) == bf16.step_flops(64, 512)


def test_quick_run_reports_serial_and_step_over_serial():
    payload = decode_step.main(["--quick", "--device", "cpu", "--batches", "2", "--ctxs", "40"])
    (row,) = payload["models"][0]["rows"]
    assert row["floor_ms"] <= row["serial_ms"]
    assert row["step_over_serial"] == pytest.approx(row["ms"] / row["serial_ms"])
    headers = [h for _, h, _ in decode_step.COLUMNS]
    assert "serial ms" in headers and "step/serial" in headers


def test_quick_run_on_an_fp8_cache_counts_its_bytes():
    argv = ["--quick", "--device", "cpu", "--batches", "2", "--ctxs", "40"]
    auto = decode_step.main(argv)["models"][0]
    fp8 = decode_step.main([*argv, "--kv-cache-dtype", "fp8"])["models"][0]
    assert fp8["kv_cache_dtype"] == "torch.float8_e4m3fn" != auto["kv_cache_dtype"]
    (row,), (ref,) = fp8["rows"], auto["rows"]
    # The tiny model runs in float32 on CPU: an fp8 cache reads a quarter of its KV bytes.
    from transformers import AutoConfig

    from benchmarks.common import model_path

    kv_fp8 = ModelCost.from_config(AutoConfig.from_pretrained(model_path("tiny")), 4, 1)
    assert ref["bytes"] - row["bytes"] == 3 * kv_fp8.kv_bytes(2, 40) > 0


def test_model_and_shape_are_exclusive():
    with pytest.raises(SystemExit):
        decode_step.parse_args(["--model", "/x", "--shape", "8b"])
