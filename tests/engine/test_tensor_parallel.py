"""Tensor parallelism on CPU: rank 0 in this process, rank 1 a spawned worker, gloo between them.

Two ranks give the same greedy tokens as one rank and as transformers (also under preemption,
chunked prefill and prefix-cache hits, where the ranks must stay in step); a worker failure
surfaces here with its traceback, and nothing is left behind (processes, port, process group),
so the next engine starts; Ctrl-C is rank 0's to handle; bad sizes are clear ValueErrors.
"""

import gc
import multiprocessing
import os
import signal
import socket

import pytest
import torch.distributed as dist

from conftest import hf_greedy, mixed_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.engine.tp_workers import FAIL_ENV, WorkerError

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
    assert tokens(llm, prompts) == expected
    assert llm.scheduler.num_preemptions > 0
    assert tokens(llm, prompts) == expected  # again: prefix-cache hits
    port = llm.model_runner.workers.port
    del llm  # garbage collection stops the workers too
    gc.collect()
    assert not multiprocessing.active_children() and not dist.is_initialized()
    assert port_is_free(port)


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


def test_worker_failure_surfaces_with_traceback_and_cleans_up(tiny_model, reference, monkeypatch):
    prompts, expected = reference
    monkeypatch.setenv(FAIL_ENV, "1:3")  # rank 1 raises at its third step
    llm = llm_of(tiny_model)
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
    monkeypatch.delenv(FAIL_ENV)
    again = llm_of(tiny_model)  # the same process starts a new group
    assert tokens(again, prompts) == expected
    again.exit()
    assert_nothing_left(again)


def test_worker_failure_at_start_up(tiny_model, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1:0")
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
