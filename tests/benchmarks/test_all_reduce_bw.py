"""benchmarks/all_reduce_bw.py on CPU (two gloo ranks): the process group's sum is timed per
call and the GPU-only kernels are said to be absent, not left out silently."""

import pytest

from benchmarks import all_reduce_bw


def test_quick_run_times_the_process_group_and_says_why_the_kernels_are_missing(tmp_path):
    payload = all_reduce_bw.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert [r["rows"] for r in payload["rows"]] == [2, 8] and (tmp_path / "r.json").exists()
    assert all(r["nccl_us"] > 0 and "one_shot_us" not in r for r in payload["rows"])
    assert "needs CUDA GPUs" in payload["note"]


@pytest.mark.parametrize("argv", [["--world-size", "1"], ["--rows", "0"], ["--calls", "0"]])
def test_it_refuses_what_it_cannot_act_on(argv):
    with pytest.raises(SystemExit):
        all_reduce_bw.parse_args(argv)
