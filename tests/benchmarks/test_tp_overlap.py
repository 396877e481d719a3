"""benchmarks/tp_overlap.py on CPU (two gloo ranks, eager): every variant runs and the report's
ratios are the ones it names (the timings are GPU runs)."""

import pytest

from benchmarks import tp_overlap


def test_quick_run_times_every_variant_and_reports_their_ratios(tmp_path):
    payload = tp_overlap.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    (row,) = payload["rows"]
    assert (row["batch"], row["ctx"]) == (4, 40) and (tmp_path / "r.json").exists()
    assert all(row[f"{v}_ms"] > 0 for v in tp_overlap.VARIANTS)
    assert row["speedup"] == pytest.approx(row["seq_ms"] / row["overlap_ms"])
    assert row["ceiling"] == pytest.approx(row["seq_ms"] / row["seq_nocomm_ms"])
    assert row["split_cost"] == pytest.approx(row["overlap_nocomm_ms"] / row["seq_nocomm_ms"])
    assert row["bound"] == pytest.approx(row["seq_ms"] / row["overlap_nocomm_ms"])
    assert payload["args"]["all_reduce"] == "nccl" and payload["attention_backend"] == "torch"
    # The halves, each with its own process group, give the whole batch's hidden states.
    assert row["overlap_max_diff"] < 1e-4


def test_prefill_halves_are_prompts_planned_as_steps_of_their_own():
    payload = tp_overlap.main(["--quick", "--device", "cpu", "--prefill", "4x24"])
    (row,) = payload["rows"]
    assert (row["kind"], row["batch"], row["ctx"]) == ("prefill", 4, 24)
    assert all(row[f"{v}_ms"] > 0 for v in tp_overlap.VARIANTS)
    assert payload["args"]["all_reduce"] == "nccl" and payload["args"]["reps"] == 2
    # Two prompts each, on their own process groups: the four prompts' hidden states.
    assert row["overlap_max_diff"] < 1e-4


@pytest.mark.parametrize(
    "argv",
    [
        ["--prefill", "3x64"],  # odd: no two halves
        ["--prefill", "4x64", "--batches", "8"],  # decode's sizes do not apply
        ["--prefill", "4x64", "--all-reduce", "symm_mem"],  # the engine's prefill uses NCCL
        ["--prefill", "4by64"],
        ["--batches", "3"],  # odd: no two halves
        ["--all-reduce", "symm_mem"],  # needs GPUs
        ["--world-size", "1"],
        ["--ctxs", "0"],
    ],
)
def test_it_refuses_what_it_cannot_act_on(argv):
    with pytest.raises(SystemExit):
        tp_overlap.parse_args(["--quick", "--device", "cpu", *argv])
