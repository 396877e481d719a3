"""benchmarks/tp_decode_step.py on CPU (two gloo ranks): the plan it times (benchmarks.common's
synthetic decode step) and its report."""

from __future__ import annotations

import pytest

from benchmarks import tp_decode_step
from benchmarks.common import BLOCK_SIZE, synthetic_decode_plan


def test_decode_plan_gives_each_sequence_its_own_blocks():
    plan = synthetic_decode_plan(batch=3, ctx=BLOCK_SIZE + 5, num_blocks=8, vocab=100)
    flat = [b for row in plan.block_tables for b in row]
    assert len(flat) == 6 and len(set(flat)) == 6  # two blocks per sequence, none shared
    for table, slot in zip(plan.block_tables, plan.slot_mapping):
        assert slot == table[1] * BLOCK_SIZE + 4  # position ctx - 1 in the second block
    assert plan.context_lens == [BLOCK_SIZE + 5] * 3 and not plan.is_prefill
    with pytest.raises(ValueError, match="needs 6 > 5 blocks"):
        synthetic_decode_plan(batch=3, ctx=BLOCK_SIZE + 5, num_blocks=5, vocab=100)


def test_quick_run_times_every_size_with_and_without_all_reduces(tmp_path):
    payload = tp_decode_step.main(
        ["--quick", "--device", "cpu", "--batches", "2", "--json", str(tmp_path / "r.json")]
    )
    rows = {r["tp"]: r for r in payload["rows"]}
    assert set(rows) == {1, 2} and (tmp_path / "r.json").exists()
    assert "no_comm_ms" not in rows[1] and rows[1]["scaling"] == 1.0
    two = rows[2]
    assert two["ms"] > 0 and two["no_comm_ms"] > 0
    assert two["comm_ms"] == pytest.approx(two["ms"] - two["no_comm_ms"])
    assert two["overlap_ceiling"] == pytest.approx(two["ms"] / two["no_comm_ms"])
    assert tp_decode_step.tp_workers._worker_main is tp_decode_step.REAL_WORKER_MAIN
    from nanovllm.layers import linear

    assert linear.all_reduce is not tp_decode_step._identity  # restored
