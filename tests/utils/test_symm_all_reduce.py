"""The symmetric-memory all-reduce's host side on CPU: which messages it takes, that
``all_reduce`` routes them to it, and that an abort plays a stopped peer's part in the barriers
(the kernels and the rendezvous need GPUs: tests/test_gpu_tensor_parallel.py)."""

import threading
import time

import pytest
import torch

from nanovllm.utils import distributed
from nanovllm.utils.symm_all_reduce import SymmetricAllReduce, refusal, unavailable_reason

WORLD, BLOCKS = 2, 6


class FakeHandle:
    """A rendezvous handle's signal pads: one int32 slot per (block, source rank) per rank."""

    def __init__(self, rank: int):
        self.rank, self.world_size = rank, WORLD
        self.signal_pad_size = BLOCKS * WORLD * 4
        self.pads = [torch.full((BLOCKS * WORLD,), 7, dtype=torch.int32) for _ in range(WORLD)]

    def get_signal_pad(self, rank, sizes, dtype):
        assert dtype == torch.int32
        return self.pads[rank].view(sizes)


def fake_symmetric(rank: int = 0, numel: int = 64, dtype=torch.bfloat16) -> SymmetricAllReduce:
    ar = object.__new__(SymmetricAllReduce)  # no rendezvous: it needs GPUs
    ar.handle, ar.dtype, ar.max_numel = FakeHandle(rank), dtype, numel
    ar.buffer = torch.zeros(numel, dtype=dtype)
    return ar


def test_it_takes_messages_of_its_dtype_that_fit_whole_vectors():
    ar = fake_symmetric(numel=64)
    assert ar.accepts(torch.zeros(8, 8, dtype=torch.bfloat16))
    assert not ar.accepts(torch.zeros(8, 9, dtype=torch.bfloat16))  # more than the buffer
    assert not ar.accepts(torch.zeros(8, 8, dtype=torch.float32))  # another dtype
    assert not ar.accepts(torch.zeros(3, dtype=torch.bfloat16))  # 6 bytes: not 16-byte vectors


def test_all_reduce_routes_what_it_takes_and_leaves_the_rest_to_the_process_group(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda x: calls.append("group"))
    ar = fake_symmetric(numel=64)
    monkeypatch.setattr(SymmetricAllReduce, "__call__", lambda self, x: x * 2)
    monkeypatch.setattr(distributed, "_symmetric", ar)
    small = torch.ones(8, 8, dtype=torch.bfloat16)
    assert torch.equal(distributed.all_reduce(small), small * 2) and calls == []
    large = torch.ones(16, 8, dtype=torch.bfloat16)
    assert distributed.all_reduce(large) is large and calls == ["group"]


@pytest.mark.parametrize("rank", [0, 1])
def test_release_marks_every_peer_arrived_and_every_own_signal_consumed(rank):
    ar = fake_symmetric(rank)
    stop = threading.Event()
    worker = threading.Thread(target=ar.release_waiters, args=(stop, 5.0))
    worker.start()
    time.sleep(0.05)
    stop.set()
    worker.join(5)
    assert not worker.is_alive()
    me, peer = rank, 1 - rank
    own = ar.handle.pads[me].view(BLOCKS, WORLD)
    theirs = ar.handle.pads[peer].view(BLOCKS, WORLD)
    assert (own[:, peer] == 1).all()  # the peer "arrived" at every block's barrier
    assert (theirs[:, me] == 0).all()  # and "consumed" every signal this rank sent it
    assert (own[:, me] == 7).all() and (theirs[:, peer] == 7).all()  # the rest untouched


def test_release_stops_at_its_deadline():
    start = time.monotonic()
    rounds = fake_symmetric().release_waiters(threading.Event(), 0.05)
    assert rounds >= 1 and time.monotonic() - start < 2


@pytest.mark.parametrize("abort", [True, False])
def test_leaving_releases_the_barriers_only_when_it_aborts(monkeypatch, abort):
    released, closed = [], []
    ar = fake_symmetric()
    monkeypatch.setattr(
        SymmetricAllReduce, "release_waiters", lambda self, stop, t: released.append(stop.wait(t))
    )
    monkeypatch.setattr(SymmetricAllReduce, "close", lambda self: closed.append(True))
    monkeypatch.setattr(distributed, "_symmetric", ar)
    assert distributed.leave_process_group(abort=abort)  # no process group: nothing to leave
    assert released == ([True] if abort else [])  # the releaser ran until told to stop
    assert closed == [True] and distributed._symmetric is None


def test_without_gpus_it_says_why_and_what_to_use():
    reason = unavailable_reason(torch.device("cpu"), 2)
    assert "needs CUDA GPUs" in reason
    assert refusal(reason).endswith("use tensor_parallel_all_reduce='nccl'")


def test_after_one_engine_a_process_gets_no_second_symmetric_memory_engine(monkeypatch):
    from nanovllm.utils import symm_all_reduce

    monkeypatch.setattr(symm_all_reduce, "_used_in_process", True)
    reason = unavailable_reason(torch.device("cuda", 0), 2)
    assert "an earlier tensor-parallel engine of this process" in reason
    assert "start a new process" in reason


def test_within_all_reduce_through_every_all_reduce_goes_to_the_given_function(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda x: calls.append("group"))
    x = torch.ones(4)
    with distributed.all_reduce_through(lambda t: t * 3):
        assert torch.equal(distributed.all_reduce(x), x * 3)
        with distributed.all_reduce_through(None):  # back to the default inside
            assert distributed.all_reduce(x) is x
    assert distributed.all_reduce(x) is x and calls == ["group", "group"]
