"""Faults for the tensor-parallel tests, installed inside a worker process.

Workers are started with multiprocessing's spawn: a fresh interpreter, which a monkeypatch in
the test process does not reach. ``WorkerGroup`` reads ``tp_workers._worker_main`` when it
starts a worker, so a test puts one of the functions below in its place, bound to its fault:

    monkeypatch.setattr(tp_workers, "_worker_main", functools.partial(fail_at_step, 1, 3))

Spawn pickles the partial by name (this module is ``tests.engine.tp_faults``, importable in the
worker because spawn gives it the parent's ``sys.path``); in the worker the function installs
the fault, on that rank only, and runs the real ``_worker_main``.
"""

from __future__ import annotations

import functools
import signal
import time

from nanovllm.engine import tp_workers
from nanovllm.engine.model_runner import ModelRunner

# Taken at import, before any test replaces it (the worker imports this module afresh).
REAL_WORKER_MAIN = tp_workers._worker_main


def fail_at_step(fail_rank: int, step: int, rank: int, *args) -> None:
    """Worker ``fail_rank`` raises at its ``step``-th step; at step 0, when it builds its model
    (after it joined the process group)."""
    if rank == fail_rank:
        if step == 0:

            def failing_init(self, *a, **kw):
                raise RuntimeError(f"injected failure in rank {rank} at start-up")

            ModelRunner.__init__ = failing_init
        else:
            real_execute = ModelRunner.execute
            done = 0

            @functools.wraps(real_execute)
            def failing_execute(self, plan):
                nonlocal done
                done += 1
                if done == step:
                    raise RuntimeError(f"injected failure in rank {rank} at step {step}")
                return real_execute(self, plan)

            ModelRunner.execute = failing_execute
    REAL_WORKER_MAIN(rank, *args)


def hang_at_exit(hang_rank: int, rank: int, *args) -> None:
    """Worker ``hang_rank`` never leaves when told to shut down, and ignores SIGTERM: only
    SIGKILL (or rank 0's death, which a worker watches for) stops it."""
    if rank == hang_rank:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

        def hanging_close(self):
            while True:
                time.sleep(3600)

        ModelRunner.close = hanging_close
    REAL_WORKER_MAIN(rank, *args)


def inject(monkeypatch, fault, *fault_args) -> None:
    """Start this test's workers with ``fault(*fault_args)`` installed (undone with the
    monkeypatch)."""
    monkeypatch.setattr(tp_workers, "_worker_main", functools.partial(fault, *fault_args))
