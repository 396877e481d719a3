"""bench.py's control flow (the timing itself runs on a GPU: benchmarks/results/RUNS.md)."""

import pytest
import torch

import bench


def test_compare_rounds_alternate_the_order():
    args = bench.parse_args(["--compare-pipeline", "--rounds", "3"])
    assert bench.variant_order(args) == [False, True, True, False, False, True]


def test_single_variant_without_compare():
    assert bench.variant_order(bench.parse_args([])) == [False]
    assert bench.variant_order(bench.parse_args(["--pipeline"])) == [True]


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds=0"):
        bench.variant_order(bench.parse_args(["--compare-pipeline", "--rounds", "0"]))


def test_medians_per_variant():
    results = [
        {"variant": "sequential", "throughput_tok_s": 100.0},
        {"variant": "pipelined", "throughput_tok_s": 90.0},
        {"variant": "pipelined", "throughput_tok_s": 110.0},
        {"variant": "sequential", "throughput_tok_s": 104.0},
    ]
    assert bench.median_throughput(results, "sequential") == 102.0
    assert bench.median_throughput(results, "pipelined") == 100.0


def test_kernel_compiles_collects_and_restores_the_hook():
    knobs = pytest.importorskip("triton").knobs
    before = knobs.runtime.jit_post_compile_hook
    with bench.kernel_compiles() as compiled:
        knobs.runtime.jit_post_compile_hook(key=None, repr="_kernel[num_warps=4](x: i32)")
    assert compiled == ["_kernel[num_warps=4](x: i32)"]
    assert knobs.runtime.jit_post_compile_hook is before


def test_kernel_compiles_counts_torch_compile_graphs():
    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=True)
    fn(torch.ones(3))  # compiled before the block: not counted
    with bench.kernel_compiles() as compiled:
        fn(torch.ones(5))  # same graph (dynamic sizes)
    assert not any(c.startswith("torch.compile") for c in compiled)
    with bench.kernel_compiles() as compiled:
        fn(torch.ones(1))  # size 1 is specialised: a recompile
    assert compiled[-1] == "torch.compile: 1 graphs"


def test_gc_pauses_counts_passes_per_generation_and_unhooks():
    import gc

    from benchmarks.common import format_gc_pauses, gc_pauses

    hooks = len(gc.callbacks)
    with gc_pauses() as stats:
        gc.collect()
        gc.collect(0)
    assert stats["gen2"]["passes"] == 1 and stats["gen0"]["passes"] == 1
    assert stats["gen2"]["seconds"] > 0
    assert len(gc.callbacks) == hooks
    assert format_gc_pauses(stats).startswith("gen0 1 passes")


def test_profile_e2e_profiles_each_engine(capsys):
    from transformers import AutoConfig

    from benchmarks import profile_e2e
    from benchmarks.common import model_path

    payload = profile_e2e.main(["--quick", "--device", "cpu", "--engines", "2"])
    args = bench.parse_args(["--quick"])
    vocab = AutoConfig.from_pretrained(model_path(args.shape)).vocab_size
    _, params = bench.workload(args, vocab)
    assert len(payload["engines"]) == 2
    for summary in payload["engines"]:
        # every sampled token is one decode row or the last chunk of one prefill
        assert summary["decode"]["tokens"] + args.num_seqs == payload["tokens"]
    assert payload["tokens"] == sum(sp.max_tokens for sp in params)
    prefill = payload["summary"]["prefill"]
    peak = payload["card"]["peak_tflops"]
    assert prefill["of_peak"] == pytest.approx(prefill["gemm_tflops"] / peak)
    out = capsys.readouterr().out
    assert "engine 1: total" in out and "of the matmul peak" in out
    with pytest.raises(ValueError, match="--engines 0"):
        profile_e2e.main(["--quick", "--device", "cpu", "--engines", "0"])


def test_compare_prints_a_ratio_only_when_pipelined_steps_ran(capsys):
    def result(variant, tok_s, steps=0):
        out = {"variant": variant, "throughput_tok_s": tok_s}
        if variant == "pipelined":
            out["pipeline"] = {"steps": steps, "mode": "sequential", "reason": "on cpu"}
        return out

    none_ran = [result("sequential", 100.0), result("pipelined", 120.0)]
    assert bench.compare_line(none_ran, 1) is None
    out = capsys.readouterr().out
    assert "no pipelined decode step ran" in out and "on cpu" in out and "1.2" not in out
    ran = [result("sequential", 100.0), result("pipelined", 120.0, steps=5)]
    assert bench.compare_line(ran, 1) == 1.2
    assert "1.200 (5 pipelined decode steps)" in capsys.readouterr().out


def test_profile_e2e_counts_mixed_steps_apart(capsys):
    from benchmarks import profile_e2e

    argv = ["--quick", "--device", "cpu", "--enable-mixed-steps", "1", "--max-num-seqs", "2"]
    payload = profile_e2e.main(argv)
    s = payload["summary"]
    assert s["mixed"]["steps"] > 0 and s["recomputed_tokens"] == 0
    # every sampled token: a decode row (of a decode or a mixed step) or a prompt's last chunk
    num_seqs = bench.parse_args(["--quick"]).num_seqs
    assert s["decode"]["tokens"] + s["mixed"]["decode_rows"] + num_seqs == payload["tokens"]
    assert "mixed " in capsys.readouterr().out


def test_profile_e2e_counts_the_decoder_layers_gemm_weights():
    # The embedding is a lookup and the LM head runs on sampled rows only: neither counts.
    from transformers import AutoConfig

    from benchmarks import profile_e2e
    from benchmarks.common import ModelCost, model_path
    from nanovllm.models.qwen3 import Qwen3ForCausalLM

    config = AutoConfig.from_pretrained(model_path("8b"))
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    expected = ModelCost.from_config(config, 2).matmul_params
    assert profile_e2e.gemm_params(model) == expected
    embed = config.vocab_size * config.hidden_size
    assert sum(p.numel() for p in model.parameters()) - expected > 2 * embed - 1


def test_profile_e2e_refuses_options_it_cannot_act_on():
    from benchmarks import profile_e2e

    for flag in (["--compare-pipeline"], ["--hf-baseline", "4"], ["--rounds", "2"]):
        with pytest.raises(ValueError, match=flag[0]):
            profile_e2e.main(["--quick", "--device", "cpu", *flag])


def test_profile_e2e_times_every_rank_with_tensor_parallelism(capsys):
    from benchmarks import profile_e2e, tp_profile

    payload = profile_e2e.main(["--quick", "--device", "cpu", "--tensor-parallel-size", "2"])
    summary = payload["summary"]
    report = summary["tensor_parallel"]
    # both ranks sent back one record per execute (warm-up included), the same number
    assert len(report["records_per_rank"]) == 2
    assert report["records_per_rank"][0] == report["records_per_rank"][1] > summary["steps"]
    steps = report["steps"]
    assert len(steps) == summary["steps"] == sum(g["steps"] for g in report["groups"].values())
    assert steps[0]["kind"] == "prefill" and {s["kind"] for s in steps} == {"prefill", "decode"}
    common = (*tp_profile.HOST_PHASES, *tp_profile.COLLECTIVES, "wait", "lag", "step")
    for row in steps:
        assert row["rows"] > 0 and row["kv_blocks"] > 0 and row["kv_used"] > 0
        assert not row["graph"]  # no CUDA graphs on CPU: every collective is timed
        for rank, cells in enumerate(row["ranks"]):
            own = tp_profile.RANK0_PHASES if rank == 0 else tp_profile.WORKER_PHASES
            for phase in (*common, *own):
                assert cells[phase] is not None and cells[phase] >= 0, (rank, phase)
            assert cells["gpu"] is None  # no device timers on CPU: said in the notes
            assert cells["n_all_reduce"] > 0 and cells["n_all_gather"] == 1
            assert cells["n_all_reduce"] == row["ranks"][0]["n_all_reduce"]
        assert min(cells["lag"] for cells in row["ranks"]) == 0
    for group in report["groups"].values():
        assert len(group["ranks_ms"]) == 2 and group["mean_kv_blocks"] > 0
    out = capsys.readouterr().out
    assert "rank 0: mean ms per step" in out and "rank 1: mean ms per step" in out
    assert "gpu: not measured on cpu" in out


def test_tp_profile_wait_is_each_calls_excess_over_the_fastest_rank():
    from benchmarks import tp_profile

    def rec(t0, reduces, **phases):
        out = dict(prefill=False, graph=False, rows=2, tokens=2, kv_blocks=3, t0=t0)
        out.update(all_reduce=reduces, all_gather=[0.001], recv_wait=0.0, unpickle=0.0, send=0.0)
        return {**out, "inputs": 0.1, "forward": 0.2, "execute": 0.3, **phases}

    engine = [dict(kind="decode", wall=0.5, kv_used=3)]
    ranks = [[rec(10.0, [0.004, 0.001], send=0.01)], [rec(10.002, [0.001, 0.003])]]
    (row,) = tp_profile.merge_steps(engine, ranks)
    r0, r1 = row["ranks"]
    assert (round(r0["wait"], 6), round(r1["wait"], 6)) == (0.003, 0.002)
    assert (r0["lag"], round(r1["lag"], 6)) == (0.0, 0.002)
    assert r0["step"] == 0.5 and r1["step"] == 0.3  # rank 0: the engine step; a worker: its own
    with pytest.raises(RuntimeError, match="step counts differ"):
        tp_profile.merge_steps(engine, [ranks[0], []])
    graph = tp_profile.aggregate([{**row, "graph": True}], lambda n: str(n))
    assert graph["decode-graph 2"]["ranks_ms"][0]["all_reduce"] is None
