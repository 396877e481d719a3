"""The engine-comparison scripts on CPU: tp_scaling (TP sizes), option_sweep (one scheduling
option's values) and profile_prefill (control flow; the timings are GPU runs)."""

import pytest

from benchmarks import option_sweep, profile_prefill, tp_scaling


def test_option_sweep_sets_the_option_on_each_engine(capsys):
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--option", "max_num_seqs", "--values", "2", "8"]
    )
    assert [r["max_num_seqs"] for r in payload["results"]] == [2, 8]
    assert payload["ratio"][2] == 1.0 and set(payload["median_tok_s"]) == {2, 8}
    # Every request came back whole from both engines.
    assert len({r["tokens"] for r in payload["results"]}) == 1
    assert "max_num_seqs 8 / 2" in capsys.readouterr().out


def test_option_sweep_of_a_flag():
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--option", "async_scheduling", "--values", "0", "1"]
    )
    assert [r["async_scheduling"] for r in payload["results"]] == [False, True]
    assert len({r["tokens"] for r in payload["results"]}) == 1
    with pytest.raises(SystemExit):
        option_sweep.parse_args(["--option", "async_scheduling", "--values", "2"])


def test_option_sweep_rounds_reverse_the_order():
    payload = option_sweep.main(
        ["--quick", "--device", "cpu", "--values", "1", "2", "--rounds", "2", "--num-seqs", "4"]
    )
    assert [r["prefill_admission_batch"] for r in payload["results"]] == [1, 2, 2, 1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--option", "max_num_seqs", "--max-num-seqs", "4"],
        ["--compare-pipeline"],
        ["--values", "0"],
        ["--rounds", "0"],
    ],
)
def test_option_sweep_refuses_what_it_cannot_act_on(argv):
    with pytest.raises(SystemExit):
        option_sweep.parse_args(["--quick", *argv])


def test_tp_scaling_refuses_a_fixed_tensor_parallel_size():
    with pytest.raises(SystemExit):
        tp_scaling.parse_args(["--tensor-parallel-size", "2"])
    with pytest.raises(SystemExit):
        tp_scaling.parse_args(["--tensor-parallel-sizes", "0", "2"])
    args, counts, sizes = tp_scaling.parse_args(["--shape", "8b"])
    assert counts == [512, 1024] and sizes == [1, 2]


def test_tp_scaling_runs_each_size_on_the_same_requests():
    payload = tp_scaling.main(["--quick", "--device", "cpu", "--tensor-parallel-sizes", "1", "2"])
    (row,) = payload["scaling"]
    assert [r["tensor_parallel_size"] for r in row["results"]] == [1, 2]
    assert row["results"][0]["tokens"] == row["results"][1]["tokens"] > 0
    assert row["ratio"][1] == 1.0 and row["ratio"][2] > 0


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


def test_profile_prefill_categories():
    assert profile_prefill.category("_prefill_kernel") == "attention"
    assert profile_prefill.category("nvjet_tst_128x256_h_bz_coopA_NNT") == "gemm"
    assert profile_prefill.category("triton_red_fused_add_mean_mul_pow_rsqrt_0") == (
        "fused element-wise"
    )
    assert profile_prefill.category("_store_kvcache_kernel") == "kv store"
