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
  sentinels and records the first failure. In a step rank 0 never blocks on the GPU unwatched:
  it waits for a step's tokens (or logprobs) by polling the step's event and the failure
  (``wait``), so it raises a ``WorkerError`` with the worker's traceback and shuts down itself,
  from its own thread. The monitor aborts an NCCL process group only where rank 0 cannot watch:
  during the build (warm-up, KV sizing and graph capture block on the device in many places), or
  in a step whose failure rank 0 has not seen within ``ABORT_GRACE_S`` (blocked elsewhere, say a
  full launch queue behind a collective that never ends). An idle rank 0 learns of the failure
  at its next step; an abort then would only sit in the monitor thread until rank 0 drops its
  CUDA graphs (torch kills a process whose abort sits for minutes). An abort from the monitor
  while rank 0 issues collectives (eager NCCL calls, graph launches) can leave both threads
  waiting on each other: the abort waits for rank 0 to drop its graphs, rank 0 waits for the
  aborted communicator. gloo collectives fail by themselves when the worker's sockets close.
- Shut-down (``LLM.exit()``, garbage collection, an error, Ctrl-C). A healthy group gets a
  ``None`` plan: every rank then destroys its CUDA graphs *before* it leaves the process group,
  because NCCL's finalize (``destroy_process_group``) and abort wait, with no time limit, until
  every graph that captured a collective on the communicator is gone (rank 0 used to leave
  first and free its graphs after: it hung there, every time). Rank 0 also checks that its GPU
  is idle; if not (a peer stopped mid-step), or the group was stopped mid-step, it aborts the
  group instead and terminates the workers. Every blocking step has a deadline (below) and what
  had to be forced is logged; the workers are joined, then SIGTERM, then SIGKILL; the store (and
  its port) is released, so a new engine can start in this process. Worst case for ``close()``:
  SYNC_TIMEOUT_S + LEAVE_TIMEOUT_S + EXIT_TIMEOUT_S + 2 * SIGNAL_TIMEOUT_S + MONITOR_TIMEOUT_S
  (70 s), all of it only when every step is stuck; a healthy shut-down takes a second or two.
  Workers ignore SIGINT (Ctrl-C reaches rank 0, which stops them) and exit by themselves when
  rank 0's process is gone, so a killed rank 0 leaves no process holding a GPU.
"""

from __future__ import annotations

import logging
import multiprocessing
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
    synchronize_within,
)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600  # spawn + imports of every worker
# A healthy worker frees its graphs and memory (SYNC_TIMEOUT_S at most), leaves the group
# (LEAVE_TIMEOUT_S at most) and exits: it is done before rank 0 stops waiting for it.
EXIT_TIMEOUT_S = 30
SIGNAL_TIMEOUT_S = 5  # how long rank 0 waits for a worker after SIGTERM, and again after SIGKILL
MONITOR_TIMEOUT_S = 5  # the monitor thread may be inside an NCCL abort: it is a daemon
FAILURE_GRACE_S = 3  # how long rank 0 waits for a worker's traceback after its own error
ABORT_GRACE_S = 10  # a failure rank 0 has not seen by then: the monitor aborts (NCCL)


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
        # While rank 0 builds, it blocks on the device in places that do not watch for failures:
        # a worker failure then needs an NCCL abort at once. In steps rank 0 watches (wait()).
        self._building = True
        self._in_step = False  # from send() until rank 0 collected every step it launched
        self._seen = threading.Event()  # rank 0 raised the failure (or is shutting down)
        # Set by rank 0's ModelRunner: drops its CUDA graphs, which hold the collectives captured
        # in them; called before rank 0 leaves the group (see the module's docstring).
        self.before_leave = None
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
                    # The module's ``_worker_main`` as it is now, at start: a picklable function
                    # set in its place (one that spawn can import by name) runs in the worker
                    # instead, e.g. to wrap it.
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
        self._failure = text  # before reading the flags: their writers check it after writing
        self._failed.set()
        if self.backend != "nccl" or not (self._building or self._in_step):
            return  # gloo fails by itself; an idle rank 0 raises it at its next send()
        if not self._building and self._seen.wait(ABORT_GRACE_S):
            return  # rank 0 raised it from a watched wait and shuts the group down itself
        if self._closed or not (self._building or self._in_step) or not dist.is_initialized():
            return
        logger.warning("a tensor-parallel worker failed while rank 0 was not watching: abort")
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
            self._seen.set()
            raise WorkerError(self._failure)

    def failure_for(self, exc: BaseException) -> BaseException:
        """Rank 0 was interrupted mid-step or mid-build by ``exc``: the ranks are out of step,
        so shut the group down. Returns what to raise: the worker's failure if one caused it."""
        if self._closed:
            return exc
        self._seen.set()  # the monitor leaves the shut-down to this thread
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
    def end_build(self) -> None:
        """Rank 0 built its runner (collectives included): raise if a worker failed."""
        self._building = False
        self.check()

    def end_step(self) -> None:
        """Rank 0 collected every step it launched: raise if a worker failed meanwhile."""
        self._in_step = False
        self.check()

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Block until ``event`` (recorded on rank 0's stream) completes, or raise as soon as a
        worker failed: a peer that is gone leaves rank 0's collectives, hence the event, waiting
        forever. Polls like a spinning ``event.synchronize()`` would; gloo (``None``) returns."""
        if event is None:
            return
        while not event.query():
            if self._failure is not None:
                self.check()
            time.sleep(0)  # lets the monitor thread run

    def send(self, plan: StepPlan) -> None:
        """Give every worker this step (pickled once); rank 0 then runs it, and end_step()."""
        self._in_step = True  # before check(): a failure recorded meanwhile is seen here or later
        self.check()
        data = ForkingPickler.dumps(plan)
        for conn in self.conns:
            conn.send_bytes(data)

    # ------------------------------------------------------------------ shut-down
    def close(self) -> None:
        """Stop the workers and leave the process group; returns within the worst case of the
        module's docstring whatever the workers, NCCL or the GPU do, and logs what it forced."""
        if self._closed:
            return
        healthy = self._failure is None and not self._broken
        self._closed = True
        self._seen.set()
        start = time.monotonic()
        if healthy:
            for conn in self.conns:
                try:
                    conn.send(None)  # idle workers leave their loop (a few bytes: never blocks)
                except OSError:
                    pass
        # 1. Rank 0's CUDA graphs hold NCCL collectives: finalize and abort wait until they die.
        release, self.before_leave = self.before_leave, None
        if release is not None:
            try:
                release()
            except Exception:  # noqa: BLE001 - shut-down goes on
                logger.exception("releasing rank 0's CUDA graphs failed")
        # 2. A graceful finalize also waits for rank 0's pending collectives: if the GPU does not
        # go idle, a peer stopped mid-step and only an abort ends them.
        if healthy and self.backend == "nccl" and not synchronize_within(self.device):
            logger.warning("tensor-parallel shut-down forced: rank 0's GPU is not idle: abort")
            healthy = False
        # 3. Leave, concurrently with healthy workers (nothing in it pairs up between ranks); a
        # worker stuck in a collective fails on gloo once we leave, and is terminated below.
        leave_process_group(abort=not healthy)
        # 4. Workers: a healthy one exits by itself; then SIGTERM, then SIGKILL, each bounded.
        self._stop_workers(EXIT_TIMEOUT_S if healthy else 0, healthy)
        try:
            self._wake_w.send(None)
        except OSError:
            pass
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.join(MONITOR_TIMEOUT_S)
            if monitor.is_alive():
                logger.error(
                    "tensor-parallel shut-down forced: the monitor thread did not stop within "
                    "%d s (blocked in an NCCL abort?); left behind as a daemon",
                    MONITOR_TIMEOUT_S,
                )
        for conn in (*self.conns, self._wake_r, self._wake_w):
            conn.close()
        self._store = None  # the last reference: the port is released
        ours, wrapped = getattr(self, "_excepthooks", (None, None))
        if wrapped is not None and sys.excepthook is wrapped:
            sys.excepthook = ours
        torch.set_num_threads(self._saved_threads)
        logger.info("tensor-parallel workers stopped in %.1f s", time.monotonic() - start)

    def _stop_workers(self, grace_s: float, healthy: bool) -> None:
        def wait(deadline: float) -> list:
            for p in self.processes:
                p.join(max(deadline - time.monotonic(), 0))
            return [p for p in self.processes if p.is_alive()]

        alive = wait(time.monotonic() + grace_s)
        for how, timeout in (("terminate", SIGNAL_TIMEOUT_S), ("kill", SIGNAL_TIMEOUT_S)):
            if not alive:
                break
            if healthy or how == "kill":  # a broken group's workers are expected to need SIGTERM
                logger.warning(
                    "tensor-parallel shut-down forced: %s did not exit within %d s: %s",
                    ", ".join(p.name for p in alive),
                    grace_s,
                    how,
                )
            for p in alive:
                getattr(p, how)()
            alive = wait(time.monotonic() + timeout)
            grace_s += timeout
        for p in alive:
            logger.error(
                "tensor-parallel shut-down forced: %s (pid %s) is still alive after SIGKILL "
                "(stuck in the GPU driver?); not waiting for it",
                p.name,
                p.pid,
            )
        if healthy:
            for p in self.processes:
                if p.exitcode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
                    logger.warning("%s exited with code %s", p.name, p.exitcode)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Worker thread: rank 0's process is gone (killed, or it crashed): exit now. A worker inside
    a collective would otherwise wait for rank 0 forever, holding its GPU."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


def _worker_main(rank: int, world_size: int, port: int, config, runtime, conn, log_level) -> None:
    """Rank ``rank``: join the group, build the model, then run every plan rank 0 sends. Never
    returns: the process ends with ``os._exit`` (no interpreter tear-down after NCCL's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle: it stops us
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_when_orphaned, args=(parent.pid,), name="nanovllm-orphan", daemon=True
        ).start()
    fmt = f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    from nanovllm.engine.model_runner import ModelRunner

    try:
        conn.send(("hello", rank))
        if runtime.device.type == "cuda":
            runtime.device = torch.device("cuda", rank)
            torch.cuda.set_device(runtime.device)  # before NCCL: nothing of ours on cuda:0
        else:
            torch.set_num_threads(cpu_threads_per_rank(world_size))
        wait = timedelta(seconds=START_TIMEOUT_S)  # rank 0 joins once every worker said hello
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout=wait)
        init_process_group(rank, world_size, store, runtime.device)
        runner = ModelRunner(config, runtime)
        while (plan := conn.recv()) is not None:
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
    # Shut down: graphs first (runner.close), as on rank 0, then leave; each step is bounded.
    code = 0
    try:
        idle = runner.close()  # False: a stream still waits on a collective, which only aborts end
        if not leave_process_group(abort=not idle):
            code = 2
    except BaseException:  # noqa: BLE001 - exit anyway
        logger.exception("tensor-parallel worker rank %d: shut-down failed", rank)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
