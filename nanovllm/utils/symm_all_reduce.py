"""All-reduce over NVLink through PyTorch's symmetric memory, for the small messages of decode
steps (``Config.tensor_parallel_all_reduce``: "symm_mem", or "auto", the default, where the
GPUs allow it).

A decode step makes two all-reduces per layer of ``[num_tokens, hidden_size]``, a few MB each.
NCCL's ring pays a fixed cost per call that dominates messages that small. With symmetric
memory every rank maps its peers' copy of one buffer: a *one-shot* all-reduce copies the local
input into this rank's buffer, meets the peers at a barrier (signal pads in the same mapping)
and sums every rank's buffer itself, in one kernel and one pass over NVLink. A *two-shot*
all-reduce has each rank reduce and broadcast a 1/world_size slice: less traffic per rank,
two barriers, for the larger messages. Messages above the buffer (prefill) stay on NCCL.

Only peer loads and stores are used, never the ``multimem`` operations (NVLink multicast).

The barrier kernels have no abort flag, unlike NCCL's: should a peer stop in a step, this
rank's GPU would wait in a barrier for good. ``release_waiters`` then plays the stopped peers'
part (``leave_process_group`` runs it when it aborts), so the step runs out, with garbage, and
the GPU goes idle.

One engine per process uses it: torch keeps symmetric-memory state per process-group name for
the life of the process (the store a rendezvous goes through, each allocation's mappings), and
every new default group is named "0" again; a second engine's rendezvous in one process never
returned. A later engine is refused ("symm_mem") or takes NCCL ("auto").
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# One-shot reads every peer's whole message, two-shot a slice of each plus one more barrier:
# one-shot up to this many bytes, two-shot above.
ONE_SHOT_MAX_BYTES = 1 << 20
# The symmetric buffer, hence the largest message taken off NCCL; larger ones are prefill.
MAX_BUFFER_BYTES = 64 << 20


# Set once an engine of this process has set up symmetric memory (the module docstring says why
# a second one cannot).
_used_in_process = False


def unavailable_reason(device: torch.device, world_size: int) -> str | None:
    """Why this rank cannot use symmetric-memory all-reduces, or None if it can."""
    if _used_in_process:
        return (
            "an earlier tensor-parallel engine of this process set up symmetric memory, whose "
            "state torch keeps per process group for the process's life (one such engine per "
            "process: start a new process for it)"
        )
    if device.type != "cuda":
        return f"it needs CUDA GPUs (device is {device.type})"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return f"this torch build ({torch.__version__}) has no torch.distributed._symmetric_memory"
    ops = getattr(torch.ops, "symm_mem", None)
    for name in ("one_shot_all_reduce_copy_out", "two_shot_all_reduce_out"):
        if ops is None or not hasattr(ops, name):
            return f"this torch build ({torch.__version__}) has no torch.ops.symm_mem.{name}"
    me = device.index if device.index is not None else torch.cuda.current_device()
    peers = [d for d in range(min(world_size, torch.cuda.device_count())) if d != me]
    blocked = [d for d in peers if not torch.cuda.can_device_access_peer(me, d)]
    if blocked:
        return f"GPU {me} cannot access GPU(s) {blocked} directly (no NVLink or PCIe P2P)"
    return None


def refusal(reason: str) -> str:
    return (
        f"Config.tensor_parallel_all_reduce='symm_mem' cannot be used: {reason}; use "
        "tensor_parallel_all_reduce='nccl'"
    )


class SymmetricAllReduce:
    """Owns one rank's symmetric buffer; ``__call__`` sums a tensor over the group when
    ``accepts`` it (same dtype, at most the buffer's bytes). Built by every rank together."""

    def __init__(
        self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int
    ):
        import torch.distributed._symmetric_memory as symm_mem

        global _used_in_process
        _used_in_process = True  # from here on, whatever happens below
        self.group_name = group.group_name
        self.dtype = dtype
        numel = max(1, min(max_bytes, MAX_BUFFER_BYTES) // dtype.itemsize)
        self.buffer = symm_mem.empty(numel, dtype=dtype, device=device)
        # Collective: every rank maps every other rank's buffer and signal pad.
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self.max_numel = numel
        # What release_waiters launches, loaded now: with CUDA's lazy module loading the first
        # launch of a kernel waits for the device, which a stuck barrier never lets go idle.
        self._release_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._release_stream):
            scratch = torch.empty_like(self._signal_pads()[0])  # a pad's layout, not a pad
            for value in (0, 1):
                scratch[:, 0].fill_(value)
        self._release_stream.synchronize()

    def accepts(self, x: torch.Tensor) -> bool:
        # The kernels move 16-byte vectors: an odd size stays on NCCL.
        return (
            x.dtype == self.dtype
            and x.numel() <= self.max_numel
            and (x.numel() * x.element_size()) % 16 == 0
        )

    def __call__(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        """The sum of ``x`` over the group, as a new tensor (``x`` is left as it was).
        ``algorithm``: "one_shot" or "two_shot"; None chooses by size."""
        n = x.numel()
        if algorithm is None:
            algorithm = "one_shot" if n * x.element_size() <= ONE_SHOT_MAX_BYTES else "two_shot"
        flat = x.contiguous().view(-1)
        out = torch.empty_like(flat)
        symm = self.buffer[:n]
        if algorithm == "one_shot":
            # Copies ``flat`` into this rank's buffer inside the kernel, then sums every rank's.
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, flat, "sum", self.group_name, out)
        elif algorithm == "two_shot":
            symm.copy_(flat)
            torch.ops.symm_mem.two_shot_all_reduce_out(symm, "sum", self.group_name, out)
        else:
            raise ValueError(f"algorithm={algorithm!r} is invalid: use 'one_shot' or 'two_shot'")
        return out.view(x.shape)

    def release_waiters(self, stop: threading.Event, timeout_s: float) -> int:
        """Until ``stop`` is set (or ``timeout_s``), mark every peer as arrived at every barrier.

        A barrier slot is one uint32 per (block, source rank) in the waiting rank's signal pad:
        a rank signals a peer by turning the peer's slot for it from 0 to 1 (waiting while it is
        still 1) and waits for its own slot for the peer to turn 1, then back to 0. So this rank
        keeps its slots for the peers at 1 and its slots in the peers' pads at 0, on a stream of
        its own (the stuck kernel holds few SMs); the peers' pads stay mapped after they exit.
        Returns how many rounds it wrote."""
        me, world = self.handle.rank, self.handle.world_size
        pads = self._signal_pads()
        peers = [r for r in range(world) if r != me]
        stream = getattr(self, "_release_stream", None)
        deadline = time.monotonic() + timeout_s
        rounds, pending = 0, None
        while not stop.is_set() and time.monotonic() < deadline:
            # Polled, never waited for: the thread keeps to its deadline whatever the GPU does.
            if pending is None or pending.query():
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    for peer in peers:
                        pads[me][:, peer].fill_(1)
                        pads[peer][:, me].fill_(0)
                    if stream is not None:
                        pending = torch.cuda.Event()
                        pending.record(stream)
                rounds += 1
            time.sleep(0.0005)
        return rounds

    def _signal_pads(self) -> list[torch.Tensor]:
        """Every rank's signal pad as [slots // world_size, world_size] int32 (this mapping)."""
        world = self.handle.world_size
        rows = self.handle.signal_pad_size // 4 // world
        return [self.handle.get_signal_pad(r, [rows, world], torch.int32) for r in range(world)]

    def close(self) -> None:
        self.handle = None
        self.buffer = None
        self.max_numel = 0


def build_symmetric_all_reduce(
    device: torch.device, dtype: torch.dtype, max_bytes: int, required: bool = True
) -> SymmetricAllReduce | None:
    """Every rank of the default group calls this together. The ranks first agree whether all
    can use symmetric memory (so none waits for a rendezvous another skipped); if one cannot,
    raise ValueError on every rank where ``required``, else return None (NCCL, logged)."""
    world_size = dist.get_world_size()
    reason = unavailable_reason(device, world_size)
    can = torch.tensor([0 if reason else 1], dtype=torch.int32, device=device)
    dist.all_reduce(can, op=dist.ReduceOp.MIN)
    if not int(can.item()):
        reason = reason or "another rank cannot use it"
        if required:
            raise ValueError(refusal(reason))
        logger.info("all-reduces over NCCL: symmetric memory is unavailable (%s)", reason)
        return None
    ar = SymmetricAllReduce(dist.group.WORLD, device, dtype, max_bytes)
    logger.info(
        "all-reduces of up to %.1f MiB over symmetric memory (one-shot up to %.1f MiB, "
        "two-shot above), larger ones over NCCL",
        ar.max_numel * dtype.itemsize / 2**20,
        ONE_SHOT_MAX_BYTES / 2**20,
    )
    return ar
