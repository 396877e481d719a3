"""The engine-comparison scripts on CPU: option_sweep (one engine option's values, TP sizes
included) and profile_prefill (control flow; the timings are GPU runs)."""

import pytest

from benchmarks import option_sweep, profile_prefill


def test_option_sweep_sets_the_option_on_each_engine(capsys):
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--option", "max_num_seqs", "--values", "2", "8"]
    )
    (sweep,) = payload["sweeps"]
    assert [r["max_num_seqs"] for r in sweep["results"]] == [2, 8]
    assert sweep["ratio"][2] == 1.0 and set(sweep["median_tok_s"]) == {2, 8}
    # Every request came back whole from both engines.
    assert len({r["tokens"] for r in sweep["results"]}) == 1
    assert "max_num_seqs 8 / 2" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["async_scheduling", "enable_mixed_steps"])
def test_option_sweep_of_a_flag(flag):
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--option", flag, "--values", "0", "1"]
    )
    (sweep,) = payload["sweeps"]
    assert [r[flag] for r in sweep["results"]] == [False, True]
    assert len({r["tokens"] for r in sweep["results"]}) == 1
    with pytest.raises(SystemExit):
        option_sweep.parse_args(["--option", flag, "--values", "2"])


def test_option_sweep_rounds_reverse_the_order():
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--values", "1", "2", "--rounds", "2", "--num-seqs", "4"]
    )
    (sweep,) = payload["sweeps"]
    assert [r["prefill_admission_batch"] for r in sweep["results"]] == [1, 2, 2, 1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--option", "max_num_seqs", "--max-num-seqs", "4"],
        ["--compare-pipeline"],
        ["--values", "0"],
        ["--rounds", "0"],
        ["--values", "1", "x"],
        ["--option", "tensor_parallel_all_reduce", "--values", "nccl", "gloo"],
    ],
)
def test_option_sweep_refuses_what_it_cannot_act_on(argv):
    with pytest.raises(SystemExit):
        option_sweep.parse_args(["--quick", *argv])


def test_tensor_parallel_sizes_over_several_request_counts():
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--option", "tensor_parallel_size", "--values", "1", "2"]
        + ["--num-seqs", "3", "5"]
    )
    assert [s["num_seqs"] for s in payload["sweeps"]] == [3, 5]
    for sweep in payload["sweeps"]:
        assert [r["tensor_parallel_size"] for r in sweep["results"]] == [1, 2]
        assert sweep["results"][0]["tokens"] == sweep["results"][1]["tokens"] > 0
        assert sweep["ratio"][1] == 1.0 and sweep["ratio"][2] > 0
    with pytest.raises(SystemExit):
        option_sweep.parse_args(["--option", "tensor_parallel_size", "--tensor-parallel-size", "2"])
    with pytest.raises(SystemExit):
        option_sweep.parse_args(["--num-seqs", "0"])


def test_sweeps_count_the_engines_that_would_use_symmetric_memory():
    """On GPUs a sweep building more than one is refused: a process serves one."""

    def count(argv, option, values, repeats=1):
        args, *_ = option_sweep.parse_args(["--quick", "--device", "cpu", *argv])
        return option_sweep.symmetric_memory_engines(args, option, values, repeats)

    # TP 1 and 2 at two request counts: the second TP=2 engine would fall back to NCCL.
    assert count([], "tensor_parallel_size", [1, 2], repeats=2) == 2
    assert count([], "tensor_parallel_size", [1, 2]) == 1
    tp2 = ["--tensor-parallel-size", "2"]
    assert count([*tp2, "--tensor-parallel-all-reduce", "nccl"], "max_num_seqs", [4, 8]) == 0
    assert count(tp2, "tensor_parallel_all_reduce", ["nccl", "symm_mem"]) == 1
    assert count(tp2, "tensor_parallel_all_reduce", ["symm_mem", "auto"]) == 2


def test_profile_prefill_points_and_host_phases():
    payload = profile_prefill.main(["--quick", "--device", "cpu"])
    (row,) = payload["results"]
    assert (row["num_seqs"], row["length"], row["tokens"]) == (2, 32, 64)
    assert row["forward_ms"] > 0 and row["host_plan_ms"] > 0
    assert "kernel_ms" not in row  # the kernel breakdown needs the CUDA profiler


def test_profile_prefill_batch_is_a_fresh_prefill_on_its_own_blocks():
    batch = profile_prefill.prefill_batch(3, 40, vocab=100, block_size=16)
    assert [s.block_table for s in batch.seqs] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert all(batch.samples(i) for i in range(3)) and batch.num_tokens == 120
    assert max(max(s.token_ids) for s in batch.seqs) < 100


def test_kernel_categories():
    from benchmarks.common import kernel_category

    assert kernel_category("_prefill_kernel") == "attention"
    assert kernel_category("_decode_split_kernel") == "attention"
    assert kernel_category("nvjet_tst_128x256_h_bz_coopA_NNT") == "gemm"
    assert kernel_category("_persistent_mm") == "gemm"
    assert kernel_category("triton_red_fused_add_mean_mul_pow_rsqrt_0") == "fused element-wise"
    assert kernel_category("_store_kvcache_kernel") == "kv store"
    assert kernel_category("void at::native::elementwise_kernel") == "other"


def test_host_step_times_every_phase_of_a_decode_step():
    from benchmarks import host_step

    payload = host_step.main(["--batch", "6", "--ctx", "40", "--block-size", "16", "--steps", "30"])
    ms = payload["median_ms"]
    assert set(ms) == {*host_step.PHASES, "total"} and ms["total"] > 0
    with pytest.raises(SystemExit):
        host_step.main(["--batch", "0"])


def test_host_step_scheduler_decodes_every_sequence_and_grows_blocks():
    from benchmarks import host_step

    sched = host_step.running_scheduler(batch=4, ctx=15, block_size=16)
    host_step.time_steps(sched, 16, steps=3)  # crosses a block boundary at token 17
    assert all(len(s) == 19 and len(s.block_table) == 2 for s in sched.running)
