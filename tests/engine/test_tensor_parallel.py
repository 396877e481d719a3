"""Tensor parallelism on CPU: rank 0 in this process, rank 1 a spawned worker, gloo between them.

Two ranks give the same greedy tokens as one rank and as transformers (also under preemption,
chunked prefill and prefix-cache hits, where the ranks must stay in step); a worker failure
surfaces here with its traceback, and nothing is left behind (processes, port, process group),
so the next engine starts; Ctrl-C is rank 0's to handle; bad sizes are clear ValueErrors.
Shut-down is bounded: a worker that never leaves is killed, a process-group exit that blocks is
left behind (logged), rank 0 drops its CUDA graphs before it leaves the group (on NCCL the
finalize waits for them forever), and a worker whose rank 0 was killed exits by itself.
Faults are installed inside a worker by tests/engine/tp_faults.py.
"""

import gc
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import hf_greedy, mixed_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine import tp_workers
from nanovllm.engine.tp_workers import WorkerError
from nanovllm.utils import distributed
from tests.engine.tp_faults import fail_at_step, hang_at_exit, inject

ROOT = Path(__file__).resolve().parents[2]

MAX_NEW = 10


def llm_of(path, tp=2, **kw):
    return LLM(path, device="cpu", kvcache_block_size=16, tensor_parallel_size=tp, **kw)


def greedy():
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def tokens(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, greedy(), use_tqdm=False)]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def assert_nothing_left(llm):
    assert not multiprocessing.active_children()
    assert not dist.is_initialized()
    assert port_is_free(llm.model_runner.workers.port)


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts = mixed_prompts(6, seed=1, lo=20, hi=60)  # 20..52 tokens: several blocks
    return prompts, hf_greedy(tiny_model, prompts, MAX_NEW)


def test_two_ranks_match_one_rank_and_transformers(tiny_model, reference):
    prompts, expected = reference
    llm = llm_of(tiny_model, enable_pipeline=True)
    assert tokens(llm, prompts) == expected
    stats = llm.model_runner.get_pipeline_statistics()  # the fallback, with its reason
    assert not stats["enabled"] and stats["mode"] == "sequential"
    assert "tensor_parallel_size=2" in stats["reason"] and "every rank" in stats["reason"]
    # A single-rank engine built while the group is alive must not shard itself.
    one = llm_of(tiny_model, tp=1)
    assert tokens(one, prompts) == expected
    one.exit()
    assert tokens(llm, prompts) == expected  # still in step after the other engine
    llm.exit()
    assert_nothing_left(llm)


def test_ranks_stay_in_step_under_preemption_chunking_and_prefix_hits(tiny_model, reference):
    prompts, expected = reference
    # 8 blocks of 16 tokens cannot hold all six sequences: decode preempts and re-prefills.
    llm = llm_of(tiny_model, num_kvcache_blocks=8, max_num_batched_tokens=32)
    assert llm.runtime.num_kvcache_blocks == 8
    llm.scheduler.headroom_steps = 0  # admit greedily, so that decode must preempt
    assert tokens(llm, prompts) == expected
    assert llm.scheduler.num_preemptions > 0
    assert tokens(llm, prompts) == expected  # again: prefix-cache hits
    port = llm.model_runner.workers.port
    del llm  # garbage collection stops the workers too
    gc.collect()
    assert not multiprocessing.active_children() and not dist.is_initialized()
    assert port_is_free(port)


def test_async_scheduling_keeps_the_ranks_in_step(tiny_model, reference):
    # Steps issued ahead read their input tokens from rank 0's samples of the step before,
    # broadcast to every rank; preemption and chunking fall back to synchronous steps.
    prompts, expected = reference
    llm = llm_of(tiny_model, async_scheduling=True, num_kvcache_blocks=8, max_num_batched_tokens=32)
    llm.scheduler.headroom_steps = 0
    calls = []
    real = llm.scheduler.schedule_ahead
    llm.scheduler.schedule_ahead = lambda prev: calls.append(real(prev)) or calls[-1]
    assert tokens(llm, prompts) == expected
    assert any(c is not None for c in calls) and llm.scheduler.num_preemptions > 0
    llm.exit()
    assert_nothing_left(llm)


def test_mixed_steps_keep_the_ranks_in_step(tiny_model, reference):
    # A mixed step's plan (decode rows, then prefill chunks) goes to every rank as one plan.
    prompts, expected = reference
    llm = llm_of(tiny_model, enable_mixed_steps=True, max_num_seqs=2, max_num_batched_tokens=32)
    real = llm.scheduler.schedule
    batches = []
    llm.scheduler.schedule = lambda: batches.append(real()) or batches[-1]
    assert tokens(llm, prompts) == expected
    assert any(b.num_decode_rows for b in batches)
    llm.exit()
    assert_nothing_left(llm)


def test_dummy_weights_are_one_model_for_any_tensor_parallel_size(tiny_model, reference):
    # The GPU test compares TP=2 with TP=1 on dummy weights: each rank must keep its shard of
    # the same full tensors.
    prompts, _ = reference
    one = llm_of(tiny_model, tp=1, load_format="dummy")
    expected = tokens(one, prompts)
    one.exit()
    llm = llm_of(tiny_model, load_format="dummy")
    assert tokens(llm, prompts) == expected
    llm.exit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_worker_failure_surfaces_with_traceback_and_cleans_up(
    tiny_model, reference, monkeypatch, async_scheduling
):
    prompts, expected = reference
    inject(monkeypatch, fail_at_step, 1, 3)  # rank 1 raises at its third step
    llm = llm_of(tiny_model, async_scheduling=async_scheduling)  # True: a step issued ahead
    with pytest.raises(WorkerError) as info:
        llm.generate(prompts, greedy(), use_tqdm=False)
    message = str(info.value)
    assert "worker rank 1 failed" in message
    assert "Traceback (most recent call last)" in message and "_worker_main" in message
    assert "injected failure in rank 1 at step 3" in message
    assert_nothing_left(llm)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(prompts, greedy(), use_tqdm=False)
    llm.exit()  # a second close is a no-op
    monkeypatch.undo()  # healthy workers again
    again = llm_of(tiny_model)  # the same process starts a new group
    assert tokens(again, prompts) == expected
    again.exit()
    assert_nothing_left(again)


def test_worker_failure_at_start_up(tiny_model, monkeypatch):
    inject(monkeypatch, fail_at_step, 1, 0)  # rank 1 raises while it builds its model
    with pytest.raises(WorkerError, match="(?s)worker rank 1 failed.*at start-up"):
        llm_of(tiny_model)
    assert not multiprocessing.active_children()
    assert not dist.is_initialized()


def test_interrupt_on_rank_0_mid_step_stops_the_workers(tiny_model, reference):
    prompts, expected = reference
    llm = llm_of(tiny_model)
    runner = llm.model_runner
    # Ctrl-C in a terminal reaches every process of the group: the workers ignore it.
    for p in multiprocessing.active_children():
        os.kill(p.pid, signal.SIGINT)
    assert tokens(llm, prompts) == expected

    def interrupted(plan):  # rank 0 stops after the workers got the step: they wait for it
        raise KeyboardInterrupt

    runner.execute = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, greedy(), use_tqdm=False)
    assert not llm.scheduler.running and not llm.scheduler.waiting
    assert_nothing_left(llm)
    llm.exit()


@pytest.mark.parametrize("tp", [3, 4])
def test_sizes_that_do_not_divide_the_heads_are_value_errors(tiny_model, tp):
    # tiny: 4 attention heads, 2 KV heads
    with pytest.raises(ValueError) as info:
        llm_of(tiny_model, tp=tp)
    message = str(info.value)
    assert f"tensor_parallel_size={tp}" in message
    assert "4 attention heads" in message and "2 KV heads" in message
    assert "[1, 2]" in message
    assert not multiprocessing.active_children()


def test_symm_mem_all_reduce_without_gpus_is_a_value_error_and_the_next_engine_starts(
    tiny_model, reference
):
    with pytest.raises(ValueError) as info:
        llm_of(tiny_model, tensor_parallel_all_reduce="symm_mem")
    message = str(info.value)
    assert "tensor_parallel_all_reduce='symm_mem'" in message and "needs CUDA GPUs" in message
    assert "tensor_parallel_all_reduce='nccl'" in message  # the fix
    assert not multiprocessing.active_children() and not dist.is_initialized()
    assert distributed._symmetric is None
    prompts, expected = reference
    # The default, "auto": NCCL (here gloo) where symmetric memory is unavailable, the ranks
    # agreeing.
    assert Config.__dataclass_fields__["tensor_parallel_all_reduce"].default == "auto"
    llm = llm_of(tiny_model)
    assert llm.runtime.tensor_parallel_all_reduce == "nccl"
    assert tokens(llm, prompts[:2]) == expected[:2]
    llm.exit()
    assert_nothing_left(llm)


def test_close_is_bounded_when_a_worker_never_leaves(tiny_model, reference, monkeypatch, caplog):
    prompts, expected = reference
    inject(monkeypatch, hang_at_exit, 1)  # rank 1 ignores None and SIGTERM: only SIGKILL stops it
    monkeypatch.setattr(tp_workers, "EXIT_TIMEOUT_S", 1)
    monkeypatch.setattr(tp_workers, "SIGNAL_TIMEOUT_S", 2)
    llm = llm_of(tiny_model)
    assert tokens(llm, prompts[:2]) == expected[:2]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="nanovllm"):
        llm.exit()
    elapsed = time.monotonic() - start
    bound = 1 + 2 * 2 + tp_workers.MONITOR_TIMEOUT_S  # grace, SIGTERM, SIGKILL, monitor
    assert elapsed < bound, f"close() took {elapsed:.1f} s, bound {bound} s"
    assert "did not exit within 1 s: terminate" in caplog.text
    assert "did not exit within 3 s: kill" in caplog.text  # SIGTERM was ignored
    assert_nothing_left(llm)


def test_a_process_group_exit_that_blocks_is_left_behind(
    tiny_model, reference, monkeypatch, caplog
):
    # As NCCL's finalize does while a CUDA graph holds one of its collectives.
    prompts, expected = reference
    gate = threading.Event()
    real_destroy = dist.destroy_process_group

    def blocking_destroy(*args, **kwargs):
        gate.wait()
        return real_destroy(*args, **kwargs)

    monkeypatch.setattr(distributed, "LEAVE_TIMEOUT_S", 1.0)
    llm = llm_of(tiny_model)
    assert tokens(llm, prompts[:2]) == expected[:2]
    monkeypatch.setattr(dist, "destroy_process_group", blocking_destroy)
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="nanovllm"):
            llm.exit()
        elapsed = time.monotonic() - start
        assert elapsed < 1 + tp_workers.EXIT_TIMEOUT_S, f"close() took {elapsed:.1f} s"
        assert "shut-down forced: destroying the gloo process group did not finish" in caplog.text
        assert not multiprocessing.active_children()  # the worker left on its own
        # The group stays registered until the blocked call ends: a new engine says so.
        assert dist.is_initialized()
        with pytest.raises(ValueError, match="already initialised"):
            llm_of(tiny_model)
    finally:
        gate.set()
    deadline = time.monotonic() + 10
    while dist.is_initialized() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_left(llm)
    again = llm_of(tiny_model)
    assert tokens(again, prompts[:2]) == expected[:2]
    again.exit()


class FakeGraphs:
    """Stands for rank 0's DecodeGraphRunner: on NCCL its graphs hold captured all-reduces."""

    def __init__(self, events):
        self.events = events

    def reset(self):
        self.events.append("graphs destroyed")


@pytest.mark.parametrize("how", ["exit", "worker failure"])
def test_rank_0_drops_its_graphs_before_it_leaves_the_group(
    tiny_model, reference, monkeypatch, how
):
    prompts, _ = reference
    events = []
    real_leave = tp_workers.leave_process_group

    def leave(abort=False, timeout_s=None):
        events.append("left (abort)" if abort else "left")
        return real_leave(abort, timeout_s)

    monkeypatch.setattr(tp_workers, "leave_process_group", leave)
    if how == "worker failure":
        inject(monkeypatch, fail_at_step, 1, 2)
    llm = llm_of(tiny_model)
    llm.model_runner.decode.sequential.graphs = FakeGraphs(events)
    if how == "exit":
        llm.exit()
        assert events == ["graphs destroyed", "left"]
    else:
        with pytest.raises(WorkerError):
            llm.generate(prompts, greedy(), use_tqdm=False)  # closes the group itself
        assert events == ["graphs destroyed", "left (abort)"]
        llm.exit()
    assert_nothing_left(llm)


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import functools, multiprocessing, os, sys
    from nanovllm import LLM
    from nanovllm.engine import tp_workers
    from tests.engine.tp_faults import hang_at_exit

    if __name__ == "__main__":
        path, pid_file = sys.argv[1], sys.argv[2]
        tp_workers._worker_main = functools.partial(hang_at_exit, 1)
        tp_workers.EXIT_TIMEOUT_S = 600
        llm = LLM(path, device="cpu", tensor_parallel_size=2)
        (worker,) = multiprocessing.active_children()
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(worker.pid))
        os.replace(pid_file + ".tmp", pid_file)
        llm.exit()  # waits for the hung worker: killed meanwhile
    """
)


def process_is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split() == ["State:", "Z", "(zombie)"] for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_exits_when_rank_0_is_killed(tiny_model, tmp_path):
    script, pid_file = tmp_path / "orphan.py", tmp_path / "worker.pid"
    script.write_text(ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rank0 = subprocess.Popen(
        [sys.executable, str(script), tiny_model, str(pid_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert rank0.poll() is None, rank0.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "rank 0 did not start its worker"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        time.sleep(1)  # rank 0 is in exit(), the worker hangs (ignoring SIGTERM)
        assert not process_is_gone(worker)
        rank0.kill()
        rank0.wait(10)
        deadline = time.monotonic() + 5
        while not process_is_gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_is_gone(worker), "the orphaned worker is still running"
    finally:
        if rank0.poll() is None:
            os.killpg(rank0.pid, signal.SIGKILL)
        rank0.wait()
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("when", ["building", "idle", "rank 0 watches", "rank 0 does not watch"])
def test_nccl_abort_on_a_worker_failure_only_where_rank_0_cannot_watch(
    tiny_model, reference, monkeypatch, when
):
    # On NCCL the abort waits until rank 0's CUDA graphs are gone, and one issued while rank 0
    # launches collectives can leave both threads waiting: in steps rank 0 raises the failure
    # from its watched wait and shuts down itself; the monitor aborts during the build, or in a
    # step whose failure rank 0 has not seen within the grace period; never while rank 0 is idle
    # (it learns of it at its next step; torch would kill a process whose abort sits for 8 min).
    prompts, expected = reference
    llm = llm_of(tiny_model)
    assert tokens(llm, prompts[:2]) == expected[:2]
    workers = llm.model_runner.workers
    aborts = []

    class World:
        @staticmethod
        def abort():
            aborts.append(True)

    monkeypatch.setattr(dist, "group", type("group", (), {"WORLD": World}))
    monkeypatch.setattr(tp_workers, "ABORT_GRACE_S", 0.5 if when != "rank 0 watches" else 30)
    workers.backend = "nccl"  # only the monitor thread reads it before we restore it
    workers._building = when == "building"
    workers._in_step = when in ("rank 0 watches", "rank 0 does not watch")
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGKILL)
    assert workers._failed.wait(10)
    if when == "rank 0 watches":
        with pytest.raises(WorkerError, match="worker rank 1 exited"):
            workers.wait(_NeverDone())
    deadline = time.monotonic() + 3  # _record() sets _failed before it aborts
    while not aborts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aborts == ([True] if when in ("building", "rank 0 does not watch") else [])
    workers.backend = "gloo"
    monkeypatch.undo()
    with pytest.raises(WorkerError, match="worker rank 1 exited"):
        llm.generate(prompts, greedy(), use_tqdm=False)
    assert_nothing_left(llm)


class _NeverDone:
    """A CUDA event of a step stuck behind a collective whose peer is gone."""

    @staticmethod
    def query() -> bool:
        return False
