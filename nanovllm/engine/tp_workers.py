"""Tensor parallelism: this process is rank 0; ranks 1..N-1 are worker processes it starts.

Who waits for whom:

- Start-up. Rank 0 opens a TCPStore on port 0 (the OS picks a free port: nothing hard-coded,
  no race between choosing and binding), spawns the workers and waits for each one's "hello"
  while watching for early exits; only then does any rank join the process group, so a worker
  that dies while importing is an error, not a hang. Every rank then builds its ModelRunner:
  warm-up, KV sizing (``all_reduce(MIN)`` of the block counts) and CUDA graph capture contain
  collectives, so the ranks build in lockstep.
- A step. Rank 0 schedules, flattens the step into a ``StepPlan`` (plain lists) and sends it to
  every worker *before* running its own forward; all ranks run the same forward, whose
  all-reduces and all-gathers pair up; only rank 0 samples. Workers never reply: the collectives
  are the synchronisation, and the plan fixes prefill/decode and the rows for every rank.
- A failure. A worker that raises sends its traceback and exits at once (a peer may be waiting for
  it inside a collective). A monitor thread in rank 0 waits on the pipes and the processes'
  sentinels, records the first failure and, on NCCL, aborts the process group so that rank 0's
  pending collectives return instead of hanging (gloo ones fail by themselves when the worker's
  sockets close). Rank 0 raises a ``WorkerError`` with the worker's traceback and shuts down.
- Shut-down (``LLM.exit()``, garbage collection, an error, Ctrl-C). A healthy group gets a
  ``None`` plan (the workers leave their loops, free memory and leave the process group while
  rank 0 leaves it too); a group stopped mid-step is aborted and its workers terminated. Workers
  are joined, the store (and its port) released, so a new engine can start in this process.
  Workers ignore SIGINT: Ctrl-C reaches rank 0, which stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing import connection, get_context
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist

from nanovllm.engine.model_inputs import StepPlan
from nanovllm.utils.distributed import (
    cpu_threads_per_rank,
    init_process_group,
    leave_process_group,
)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600  # spawn + imports of every worker
EXIT_TIMEOUT_S = 30  # a healthy worker frees its memory and leaves the group
FAILURE_GRACE_S = 3  # how long rank 0 waits for a worker's traceback after its own error
# Test hook: "RANK:STEP" makes worker RANK raise at its STEP-th step (0: before its model is built).
FAIL_ENV = "NANOVLLM_TP_FAIL_AT"


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed; the message holds its traceback."""


class WorkerGroup:
    """Ranks 1..N-1 of one engine; rank 0 (this process) joins the same process group."""

    def __init__(self, config, runtime):
        n = config.tensor_parallel_size
        self.device = runtime.device
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._failure: str | None = None
        self._failed = threading.Event()
        self._broken = False  # rank 0 stopped mid-step or mid-build: the ranks are out of step
        self._closed = False
        self._saved_threads = torch.get_num_threads()  # rank 0 shares the cores too (restored)
        if self.backend == "gloo":
            torch.set_num_threads(cpu_threads_per_rank(n))
        self._store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        self.port = self._store.port
        ctx = get_context("spawn")  # fork would copy this process's CUDA context and threads
        log_level = logging.getLogger("nanovllm").getEffectiveLevel()
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self.conns, self.processes = [], []
        try:
            for rank in range(1, n):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=_worker_main,
                    args=(rank, n, self.port, config, runtime, child, log_level),
                    name=f"nanovllm-tp{rank}",
                    daemon=True,  # never outlives this interpreter
                )
                p.start()
                child.close()  # ours is closed: the worker's exit gives EOF on ``parent``
                self.conns.append(parent)
                self.processes.append(p)
            self._wait_for_hello()
            self._monitor = threading.Thread(target=self._watch, name="nanovllm-tp-monitor")
            self._monitor.daemon = True
            self._monitor.start()
            # init_process_group wraps sys.excepthook (a "[rank0]:" prefix); undone in close().
            self._excepthooks = sys.excepthook, None
            init_process_group(0, n, self._store, self.device)
            self._excepthooks = self._excepthooks[0], sys.excepthook
        except BaseException:
            self._broken = True  # workers may be waiting for a rendezvous that never comes
            self.close()
            raise
        logger.info("tensor parallel: %d ranks over %s, store port %d", n, self.backend, self.port)

    # ------------------------------------------------------------------ start-up
    def _wait_for_hello(self) -> None:
        pending = {c: r for r, c in enumerate(self.conns, 1)}
        sentinels = {p.sentinel: r for r, p in enumerate(self.processes, 1)}
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            left = deadline - time.monotonic()
            ready = connection.wait([*pending, *sentinels], timeout=max(left, 0))
            if not ready:
                raise TimeoutError(
                    f"tensor-parallel workers {sorted(pending.values())} did not start within "
                    f"{START_TIMEOUT_S} s"
                )
            for obj in ready:
                rank = pending.get(obj) or sentinels.get(obj)
                if rank is None:
                    continue  # the sentinel of a worker whose hello came in this round
                try:
                    if obj not in pending:
                        raise EOFError
                    obj.recv()  # "hello"
                except EOFError:
                    p = self.processes[rank - 1]
                    p.join(5)
                    raise RuntimeError(
                        f"tensor-parallel worker rank {rank} exited with code {p.exitcode} "
                        "while starting (its output is above). Workers are started with "
                        "multiprocessing's spawn, which re-imports your main module: create the "
                        'LLM under `if __name__ == "__main__":`'
                    ) from None
                del pending[obj], sentinels[self.processes[rank - 1].sentinel]

    # ------------------------------------------------------------------ failures
    def _watch(self) -> None:
        """Monitor thread: record the first worker error or unexpected exit."""
        conns = {c: r for r, c in enumerate(self.conns, 1)}
        sentinels = {p.sentinel: r for r, p in enumerate(self.processes, 1)}
        while (conns or sentinels) and not self._closed:
            ready = connection.wait([*conns, *sentinels, self._wake_r])
            if self._wake_r in ready:
                return
            # Messages before exits: a worker sends its traceback, then exits.
            for obj in sorted(ready, key=lambda o: o not in conns):
                if obj in conns:
                    rank = conns[obj]
                    try:
                        kind, text = obj.recv()
                    except (EOFError, OSError):
                        del conns[obj]
                        continue
                    if kind == "error":
                        self._record(f"tensor-parallel worker rank {rank} failed:\n{text}")
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    code = self.processes[rank - 1].exitcode
                    if not self._closed:
                        self._record(f"tensor-parallel worker rank {rank} exited (code {code})")

    def _record(self, text: str) -> None:
        if self._failure is not None or self._closed:
            return  # the first failure is the cause; later ones are its echoes
        self._failure = text
        self._failed.set()
        if self.backend == "nccl" and dist.is_initialized():
            try:  # rank 0 may be blocked on a collective this worker will never join
                dist.group.WORLD.abort()
            except Exception:  # noqa: BLE001
                logger.exception("aborting the NCCL process group failed")

    def check(self) -> None:
        """Raise if the group is shut down or a worker failed."""
        if self._closed:
            why = "a rank failed earlier" if self._failure else "exit() was called"
            raise RuntimeError(
                f"the tensor-parallel workers are shut down ({why}): create a new LLM"
            )
        if self._failure is not None:
            raise WorkerError(self._failure)

    def failure_for(self, exc: BaseException) -> BaseException:
        """Rank 0 was interrupted mid-step or mid-build by ``exc``: the ranks are out of step,
        so shut the group down. Returns what to raise: the worker's failure if one caused it."""
        if self._closed:
            return exc
        if isinstance(exc, Exception) and not isinstance(exc, WorkerError):
            # A worker's error may arrive just after rank 0's collective broke on it.
            self._failed.wait(FAILURE_GRACE_S)
        failure = self._failure
        self._broken = True
        # The frames of a broken collective hold the process group, hence the store and its
        # port, for as long as the exception lives: drop their locals (line numbers stay).
        traceback.clear_frames(exc.__traceback__)
        self.close()
        if failure is None or isinstance(exc, WorkerError):
            return exc
        err = WorkerError(failure)
        err.__cause__ = exc
        return err

    # ------------------------------------------------------------------ steps
    def send(self, plan: StepPlan) -> None:
        """Give every worker this step (pickled once)."""
        self.check()
        data = ForkingPickler.dumps(plan)
        for conn in self.conns:
            conn.send_bytes(data)

    # ------------------------------------------------------------------ shut-down
    def close(self) -> None:
        if self._closed:
            return
        healthy = self._failure is None and not self._broken
        self._closed = True
        if healthy:
            for conn in self.conns:
                try:
                    conn.send(None)  # idle workers leave their loop
                except OSError:
                    pass
        # Rank 0 leaves concurrently with healthy workers (NCCL tear-down may pair up); a worker
        # stuck in a collective fails on gloo once we leave, and is terminated below anyway.
        leave_process_group(abort=not healthy)
        deadline = time.monotonic() + (EXIT_TIMEOUT_S if healthy else 0)
        for p in self.processes:
            p.join(max(deadline - time.monotonic(), 0))
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        self._wake_w.send(None)
        if getattr(self, "_monitor", None) is not None:
            self._monitor.join()
        for conn in (*self.conns, self._wake_r, self._wake_w):
            conn.close()
        self._store = None  # the last reference: the port is released
        ours, wrapped = getattr(self, "_excepthooks", (None, None))
        if wrapped is not None and sys.excepthook is wrapped:
            sys.excepthook = ours
        torch.set_num_threads(self._saved_threads)
        logger.info("tensor-parallel workers stopped")


def _injected_failure(rank: int) -> int | None:
    spec = os.environ.get(FAIL_ENV, "")
    if not spec:
        return None
    fail_rank, step = (int(v) for v in spec.split(":"))
    return step if fail_rank == rank else None


def _worker_main(rank: int, world_size: int, port: int, config, runtime, conn, log_level) -> None:
    """Rank ``rank``: join the group, build the model, then run every plan rank 0 sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops us
    fmt = f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    from nanovllm.engine.model_runner import ModelRunner

    try:
        conn.send(("hello", rank))
        if runtime.device.type == "cuda":
            runtime.device = torch.device("cuda", rank)
        else:
            torch.set_num_threads(cpu_threads_per_rank(world_size))
        wait = timedelta(seconds=START_TIMEOUT_S)  # rank 0 joins once every worker said hello
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=wait)
        init_process_group(rank, world_size, store, runtime.device)
        fail_at = _injected_failure(rank)
        if fail_at == 0:
            raise RuntimeError(f"injected failure in rank {rank} at start-up ({FAIL_ENV})")
        runner = ModelRunner(config, runtime)
        step = 0
        while (plan := conn.recv()) is not None:
            step += 1
            if step == fail_at:
                raise RuntimeError(f"injected failure in rank {rank} at step {step} ({FAIL_ENV})")
            runner.execute(plan)
    except EOFError:
        os._exit(0)  # rank 0 is gone
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        sys.stderr.flush()
        # No clean-up: peers may be inside a collective with us, and exiting closes our sockets.
        os._exit(1)
    runner.close()
    dist.destroy_process_group()
