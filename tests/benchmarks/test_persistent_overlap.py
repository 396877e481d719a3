"""benchmarks/persistent_overlap.py: the dual-role persistent kernel through the Triton
interpreter on tiny shapes (both roles' outputs against torch, every work item done exactly once,
in each scheduling mode), and the benchmark's flow end to end on CPU (the timing itself runs on a
GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the persistent overlap kernel is a Triton kernel")

from benchmarks import persistent_overlap as po  # noqa: E402

interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test (the script's --check covers the GPU)"
)


def tiny(lens=(1, 33, 70, 0, 64), layers=2):
    c = po.CHECK_ATTN
    tile = po.TileConfig(32, 32, 32, 1)
    gemm = po.GemmWork(torch.device("cpu"), torch.float16, 64, po.CHECK_GEMMS, layers, tile)
    attn = po.AttentionWork(
        torch.device("cpu"), torch.float16, list(lens), layers, c["heads"], c["kv_heads"],
        c["head_dim"], c["block"],
    )  # fmt: skip
    return gemm, attn, po.Launcher(gemm, attn, tile, 16, 1, torch.device("cpu"))


@interpreter
@pytest.mark.parametrize(
    ("grid", "roles", "steal"),
    [
        (2, [0, 1], False),  # variant b: one program per role, each drains its own queue
        (3, [1, 1, 1], True),  # every program starts on attention, then takes GEMM tiles
        (3, [0, 0, 0], True),  # ... and the other way round
    ],
)
def test_both_roles_match_torch(grid, roles, steal):
    gemm, attn, run = tiny()
    gemm.c.fill_(float("nan"))
    attn.o.fill_(float("nan"))
    zero, launch = run.prepare(grid, roles, steal=steal)
    zero()
    launch()
    stats = po.summarize_stats(launch.stats, gemm.num_tiles, attn.num_items)
    assert stats["items_ok"], stats
    assert stats["gemm_items"] == gemm.num_tiles == 2 * (2 * (3 + 2 + 4 + 2))
    assert stats["attention_items"] == attn.num_items == 2 * 5 * 2
    gemm.check(atol=2e-2, rtol=2e-2)  # every layer's four GEMMs
    attn.check(atol=2e-2, rtol=2e-2)  # every layer, partial tiles and a ctx-0 row
    assert torch.equal(attn.o[:, 3], torch.zeros_like(attn.o[:, 3]))


@interpreter
def test_one_role_only_leaves_the_other_untouched():
    gemm, attn, run = tiny(lens=(5, 40), layers=1)
    gemm.c.fill_(float("nan"))
    attn.o.fill_(float("nan"))
    zero, launch = run.prepare(2, [0, 1], steal=True, gemm_only=True)
    zero()
    launch()
    assert po.summarize_stats(launch.stats, gemm.num_tiles, 0)["items_ok"]
    gemm.check(atol=2e-2, rtol=2e-2)
    assert attn.o.isnan().all()


@interpreter
def test_benchmark_flow_runs_on_cpu():
    """bench_point at tiny shapes: baselines, the per-config check, every variant's row."""
    args = po.parse_args(
        ["--batch", "3", "--layers", "1", "--reps", "1", "--warmup", "0", "--configs",
         "32,32,32,1", "32,64,32,1", "--attention-configs", "default", "--attn-fractions", "0.5",
         "--attn-block-n", "16", "--attn-stages", "1"]
    )  # fmt: skip
    c = po.CHECK_ATTN
    shapes = po.Shapes(
        po.CHECK_GEMMS[1:3], c["heads"], c["kv_heads"], c["head_dim"], c["block"], torch.float16
    )
    row = po.bench_point(args, torch.device("cpu"), 1, 32, 20, shapes)
    names = {v["variant"] for v in row["variants"]}
    assert names == {"a f=0.5", "b", "b+steal", "c:a f=0.5", "c:b", "c:b+steal"}
    assert all(v["items_ok"] and v["speedup"] > 0 for v in row["variants"])
    assert row["serial_ms"] == row["best_gemm_ms"] + row["best_attention_ms"]


def test_gate_and_roles():
    assert po.gate(1.31) == "go on"
    assert po.gate(1.25) == "go on only if step 2 keeps >= 1.15x"
    assert po.gate(1.19) == "stop"
    assert po.spread_roles(8, 0.25) == [0, 0, 0, 1, 0, 0, 0, 1]
    assert sum(po.spread_roles(132, 0.125)) == 16
    assert po.parity_roles(4) == [0, 1, 0, 1]


def test_options_are_checked():
    with pytest.raises(SystemExit):
        po.parse_args(["--attn-fractions", "1.5"])
    with pytest.raises(SystemExit):
        po.parse_args(["--configs", "128,128"])
    quick = po.parse_args(["--quick"])
    assert quick.m == [512] and quick.ctx == [256] and len(quick.configs) == 2
    with pytest.raises(ValueError, match="multiples"):
        po.GemmWork(torch.device("cpu"), torch.float16, 48, po.CHECK_GEMMS, 1,
                    po.TileConfig(32, 32, 32, 1))  # fmt: skip
