"""Per-rank step timers for a tensor-parallel engine (``profile_e2e.py --tensor-parallel-size N``).

Installed from outside the library, as the tensor-parallel tests install faults
(``tests/engine/tp_faults.py``): rank 0 (this process) gets ``RankTimers.install``; each worker
is started with ``tp_workers._worker_main`` replaced by ``functools.partial(profiled_worker_main,
out_dir)``, which spawn pickles by name: in the worker it installs the same timers, wraps the
worker's pipe to time the plan's arrival, runs the real ``_worker_main``, and writes its records
to ``out_dir/rank{r}.json`` when rank 0 sends the shut-down (``None``) plan.

Per ``ModelRunner.execute`` (one per engine step, on every rank) a record holds:

- ``recv_wait`` (workers): time blocked on the pipe until the plan's bytes arrive (the worker is
  idle: rank 0 schedules, samples, post-processes), and ``unpickle``: decoding the plan;
- ``send`` (rank 0): pickling the plan and writing it to every worker's pipe;
- ``inputs``: ``to_model_inputs`` (host: lists -> tensors, attention metadata);
- ``forward``: the rest of ``execute`` (forward, logits), until the device is done (a CUDA
  synchronisation ends every profiled ``execute`` on every rank);
- ``all_reduce`` / ``all_gather``: the seconds of each such collective the forward called from
  Python (CUDA events around each call on CUDA, outside graph capture; wall time on CPU/gloo).
  Collectives replayed inside a CUDA graph never reach Python: they have no per-call times;
- ``gpu`` (CUDA): the device span of ``execute`` (CUDA events at entry and exit): kernels,
  collectives and any gaps where the GPU waited for the host to launch;
- ``t0``/``t1``: ``time.perf_counter()`` at entry and exit. On one host (CLOCK_MONOTONIC) these
  are comparable across processes: the start lag between ranks is how long the earlier rank
  waits for the later one in its first collective (every rank's device is idle at ``t0``).
"""

from __future__ import annotations

import json
import os
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist

from nanovllm.engine import model_runner as model_runner_module
from nanovllm.engine import tp_workers
from nanovllm.layers import embed_head, linear

# Taken at import, before profile_e2e replaces it (the worker imports this module afresh).
REAL_WORKER_MAIN = tp_workers._worker_main

HOST_PHASES = ("inputs", "forward", "execute")  # every rank
COLLECTIVES = ("all_reduce", "all_gather")
WORKER_PHASES = ("recv_wait", "unpickle")  # ranks 1..N-1
RANK0_PHASES = ("send",)


class _TimedDist:
    """``torch.distributed`` as ``embed_head`` sees it, with ``all_gather`` timed (the module is
    not patched for the rest of the process)."""

    def __init__(self, timers: RankTimers):
        self._timers = timers

    def all_gather(self, *args, **kwargs):
        return self._timers.time_collective("all_gather", dist.all_gather, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(dist, name)


class RankTimers:
    """The step records of one rank (see the module's docstring). ``install`` patches the
    library's module globals in this process; ``restore`` undoes it."""

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device
        self.cuda = device.type == "cuda"
        self.records: list[dict] = []
        self.current: dict | None = None  # the record of the execute under way
        self._pending: dict = {}  # recv/send times measured before the execute they belong to
        self._saved: list[tuple[object, str, object]] = []

    # ------------------------------------------------------------------ install
    def _patch(self, obj, name: str, value) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def install(self, workers=None) -> RankTimers:
        real_inputs = model_runner_module.to_model_inputs
        real_execute = model_runner_module.ModelRunner.execute
        timers = self

        def to_model_inputs(plan, device, backend=None):
            t = time.perf_counter()
            out = real_inputs(plan, device, backend)
            if timers.current is not None:
                timers.current["inputs"] += time.perf_counter() - t
            return out

        def execute(runner, plan):
            return timers._execute(real_execute, runner, plan)

        self._patch(model_runner_module, "to_model_inputs", to_model_inputs)
        self._patch(model_runner_module.ModelRunner, "execute", execute)
        timed_reduce = self._timed("all_reduce", linear.all_reduce)
        self._patch(linear, "all_reduce", timed_reduce)
        self._patch(embed_head, "all_reduce", timed_reduce)
        self._patch(embed_head, "dist", _TimedDist(self))
        if workers is not None:  # rank 0: the plan's pickling and sending
            real_send = workers.send

            def send(plan):
                t = time.perf_counter()
                real_send(plan)
                timers._pending["send"] = time.perf_counter() - t

            self._patch(workers, "send", send)
        return self

    def restore(self) -> None:
        while self._saved:
            obj, name, value = self._saved.pop()
            setattr(obj, name, value)

    def _timed(self, kind: str, fn):
        def timed(*args, **kwargs):
            return self.time_collective(kind, fn, *args, **kwargs)

        return timed

    # ------------------------------------------------------------------ timing
    def _event(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def time_collective(self, kind: str, fn, *args, **kwargs):
        rec = self.current
        if rec is None or (self.cuda and torch.cuda.is_current_stream_capturing()):
            return fn(*args, **kwargs)  # outside a step (build, warm-up) or being captured
        if self.cuda:
            start = self._event()
            out = fn(*args, **kwargs)
            rec["_events"].append((kind, start, self._event()))
            return out
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        rec[kind].append(time.perf_counter() - t)
        return out

    def _execute(self, real_execute, runner, plan):
        rows = plan.block_tables or []
        rec = {
            "prefill": plan.is_prefill,
            "rows": len(plan.cu_seqlens_q) - 1 if plan.is_prefill else len(plan.input_ids),
            "tokens": len(plan.input_ids),
            # blocks the step's sequences hold (their block tables), or, for a prefill
            # without tables (no cached prefix), the blocks it writes
            "kv_blocks": sum(b >= 0 for row in rows for b in row)
            if rows
            else len({s // runner.block_size for s in plan.slot_mapping if s >= 0}),
            "inputs": 0.0,
            **{kind: [] for kind in COLLECTIVES},
            "_events": [],
            "graph": bool(not plan.is_prefill and runner.graph_runner is not None),
            **dict.fromkeys((*WORKER_PHASES, *RANK0_PHASES), 0.0),
        }
        rec.update(self._pending)
        self._pending = {}
        self.current = rec
        start = self._event() if self.cuda else None
        rec["t0"] = time.perf_counter()
        try:
            out = real_execute(runner, plan)
            if self.cuda:
                end = self._event()
                torch.cuda.synchronize(self.device)
        finally:
            self.current = None
        rec["t1"] = time.perf_counter()
        rec["execute"] = rec["t1"] - rec["t0"]
        rec["forward"] = rec["execute"] - rec["inputs"]
        events = rec.pop("_events")
        if self.cuda:
            rec["gpu"] = start.elapsed_time(end) / 1e3
            for kind, a, b in events:
                rec[kind].append(a.elapsed_time(b) / 1e3)
        self.records.append(rec)
        return out


class _TimedConn:
    """A worker's pipe to rank 0 with ``recv`` split into waiting for the bytes and unpickling;
    on the shut-down plan (``None``) the records are written first."""

    def __init__(self, conn, timers: RankTimers, path: str):
        self._conn, self._timers, self._path = conn, timers, path

    def recv(self):
        t = time.perf_counter()
        data = self._conn.recv_bytes()
        t1 = time.perf_counter()
        plan = ForkingPickler.loads(data)
        t2 = time.perf_counter()
        if plan is None:
            write_records(self._path, self._timers)
        else:
            self._timers._pending.update(recv_wait=t1 - t, unpickle=t2 - t1)
        return plan

    def __getattr__(self, name):
        return getattr(self._conn, name)


def write_records(path: str, timers: RankTimers) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"rank": timers.rank, "records": timers.records}, f)
    os.replace(tmp, path)


def profiled_worker_main(
    out_dir: str, rank: int, world_size, port, config, runtime, conn, log_level
) -> None:
    """``tp_workers._worker_main`` with this rank's timers installed (the worker's device is
    ``cuda:rank`` on CUDA, as ``_worker_main`` sets it)."""
    device = torch.device("cuda", rank) if runtime.device.type == "cuda" else runtime.device
    timers = RankTimers(rank, device).install()
    path = os.path.join(out_dir, f"rank{rank}.json")
    timed = _TimedConn(conn, timers, path)
    REAL_WORKER_MAIN(rank, world_size, port, config, runtime, timed, log_level)


def read_worker_records(out_dir: str, world_size: int) -> dict[int, list[dict]]:
    """Each worker's records (after the engine is closed); a missing file is an error."""
    out = {}
    for rank in range(1, world_size):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            raise RuntimeError(f"tensor-parallel rank {rank} wrote no step records ({path})")
        with open(path) as f:
            out[rank] = json.load(f)["records"]
    return out


# ----------------------------------------------------------------------------- report
def merge_steps(engine_steps: list[dict], ranks: list[list[dict]]) -> list[dict]:
    """One row per engine step: rank 0's engine-step row (``StepRecorder``) and, per rank, its
    ``execute`` record, with the derived ``coll`` (seconds in timed collectives), ``wait`` (per
    call: this rank's time minus the fastest rank's for the same call, summed) and ``lag``
    (this rank's ``execute`` entry after the earliest rank's)."""
    counts = {len(engine_steps), *map(len, ranks)}
    if len(counts) != 1:
        raise RuntimeError(
            f"step counts differ: engine {len(engine_steps)}, ranks {[len(r) for r in ranks]}"
        )
    rows = []
    for i, step in enumerate(engine_steps):
        recs = [r[i] for r in ranks]
        first = min(rec["t0"] for rec in recs)
        per_rank = []
        for rank, rec in enumerate(recs):
            wait = 0.0
            for kind in COLLECTIVES:
                calls = [other[kind] for other in recs]
                if len({len(c) for c in calls}) != 1:
                    raise RuntimeError(f"step {i}: the ranks timed different {kind} counts")
                wait += sum(t - min(ts) for t, ts in zip(rec[kind], zip(*calls)))
            out = {p: rec[p] for p in (*HOST_PHASES, *WORKER_PHASES, *RANK0_PHASES)}
            out.update({kind: sum(rec[kind]) for kind in COLLECTIVES})
            out.update({f"n_{kind}": len(rec[kind]) for kind in COLLECTIVES})
            out.update(gpu=rec.get("gpu"), wait=wait, lag=rec["t0"] - first)
            # the rank's busy host time in the step: rank 0 the whole engine step; a worker from
            # the plan's arrival to the end of its execute
            out["step"] = step["wall"] if rank == 0 else rec["unpickle"] + rec["execute"]
            per_rank.append(out)
        head = recs[0]
        if any(
            (rec["prefill"], rec["tokens"]) != (head["prefill"], head["tokens"]) for rec in recs
        ):
            raise RuntimeError(f"step {i}: the ranks ran different plans")
        rows.append(
            dict(
                kind=step["kind"],
                graph=head["graph"],
                rows=head["rows"],
                tokens=head["tokens"],
                kv_blocks=head["kv_blocks"],
                kv_used=step.get("kv_used"),
                ranks=per_rank,
            )
        )
    return rows


def group_name(row: dict, bucket) -> str:
    if row["kind"] != "decode":
        return row["kind"]  # prefill or mixed
    return f"decode{'-graph' if row['graph'] else ''} {bucket(row['rows'])}"


RANK_COLUMNS = (  # (key, header): means per step, in ms
    ("step", "step"),
    ("recv_wait", "idle"),
    ("unpickle", "unpickle"),
    ("send", "send"),
    ("inputs", "inputs"),
    ("forward", "forward"),
    ("gpu", "gpu"),
    ("all_reduce", "allreduce"),
    ("all_gather", "allgather"),
    ("wait", "wait"),
    ("lag", "lag"),
)


def aggregate(rows: list[dict], bucket) -> dict:
    """Per step kind (prefill; decode by batch range, graph-replayed apart): steps, mean batch
    rows, tokens and KV blocks, and per rank the mean ms of each column of ``RANK_COLUMNS``
    (None where not measured: ``gpu`` off CUDA, ``allreduce``/``wait`` on graph replays)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_name(row, bucket), []).append(row)

    def order(name: str) -> tuple:
        if name == "prefill":
            return (0, 0, 0)
        kind, rng = name.split(" ")
        return (1, kind.endswith("graph"), int(rng.split("-")[-1]))

    out = {}
    for name in sorted(groups, key=order):
        g = groups[name]
        n = len(g)
        entry = dict(
            steps=n,
            graph=g[0]["graph"],
            mean_rows=sum(r["rows"] for r in g) / n,
            mean_tokens=sum(r["tokens"] for r in g) / n,
            mean_kv_blocks=sum(r["kv_blocks"] for r in g) / n,
            max_kv_blocks=max(r["kv_blocks"] for r in g),
        )
        used = [r["kv_used"] for r in g if r["kv_used"] is not None]
        entry["mean_kv_used"] = sum(used) / len(used) if used else None
        per_rank = []
        for rank in range(len(g[0]["ranks"])):
            cells = {}
            for key, _ in RANK_COLUMNS:
                values = [r["ranks"][rank][key] for r in g]
                cells[key] = None if any(v is None for v in values) else 1e3 * sum(values) / n
            if entry["graph"]:  # the all-reduces ran inside the graph: not timed
                cells["all_reduce"] = cells["wait"] = None
            for kind in COLLECTIVES:
                cells[f"n_{kind}"] = sum(r["ranks"][rank][f"n_{kind}"] for r in g) / n
            per_rank.append(cells)
        entry["ranks_ms"] = per_rank
        out[name] = entry
    return out


def totals(rows: list[dict]) -> list[dict]:
    """Seconds per rank over the whole timed run, per column (None where any step lacks it)."""
    out = []
    for rank in range(len(rows[0]["ranks"]) if rows else 0):
        cells = {}
        for key, _ in RANK_COLUMNS:
            values = [r["ranks"][rank][key] for r in rows]
            cells[key] = None if any(v is None for v in values) else sum(values)
        cells["graph_steps"] = sum(r["graph"] for r in rows)
        out.append(cells)
    return out


def notes(rows: list[dict], device: torch.device) -> list[str]:
    """What the numbers are, and what could not be measured in this run."""
    out = [
        "every profiled execute ends with a device synchronisation on every rank (the ranks "
        "start each step with an idle device; the engine's own overlap is lost)",
        "idle: a worker blocked on its pipe until the plan arrives (rank 0 schedules, samples, "
        "post-processes); unpickle: decoding it; send: rank 0 pickling it and writing it to "
        "every worker; inputs: to_model_inputs; forward: the rest of execute until the device "
        "is done; step: rank 0's whole engine step, a worker's unpickle + execute",
        "wait: per collective call, this rank's time minus the fastest rank's for the same call "
        "(the last rank to arrive waits least), summed: an estimate of waiting for the other "
        "rank(s); lag: this rank's execute entry after the earliest rank's (one host's "
        "monotonic clock)",
    ]
    if device.type == "cuda":
        out.append(
            "gpu: the device span of execute (CUDA events): kernels, collectives and the gaps "
            "where the GPU waited for the host to launch; kernel-busy time needs a kernel "
            "profiler (nsys); collectives: CUDA events around each call"
        )
    else:
        out.append(
            f"gpu: not measured on {device.type} (no device timers); collectives: wall time of "
            "each gloo call"
        )
    graphs = sum(r["graph"] for r in rows)
    if graphs:
        out.append(
            f"not measured: the all-reduces of the {graphs} decode steps replayed from CUDA "
            "graphs (inside a graph no collective reaches Python): their allreduce and wait are "
            "'-', gpu is the whole replay plus the eager LM head; the LM head's all-gather runs "
            "outside the graph and is timed. Run with --enforce-eager for per-collective times "
            "of every step (of the eager engine)"
        )
    return out


def print_report(report: dict) -> None:
    from benchmarks.common import format_table

    print(
        f"\ntensor parallel: {report['world_size']} ranks, "
        f"{report['num_kvcache_blocks']} KV blocks of {report['block_size']} tokens"
    )
    for rank in range(report["world_size"]):
        rows = []
        for name, g in report["groups"].items():
            cells = {k: v for k, v in g["ranks_ms"][rank].items()}
            cells.update(
                kind=name,
                steps=g["steps"],
                rows=g["mean_rows"],
                tokens=g["mean_tokens"],
                kv=g["mean_kv_blocks"],
                kv_used=g["mean_kv_used"],
            )
            rows.append(cells)
        keys = [k for k, _ in RANK_COLUMNS]
        if rank == 0:
            keys = [k for k in keys if k not in WORKER_PHASES]
        else:
            keys = [k for k in keys if k not in RANK0_PHASES]
        heads = dict(RANK_COLUMNS)
        columns = [
            ("kind", "kind", "s"),
            ("steps", "steps", "d"),
            ("rows", "batch", ".1f"),
            ("tokens", "tokens", ".0f"),
            ("kv", "kv blk", ".0f"),
            ("kv_used", "kv used", ".0f"),
            *((k, heads[k], ".3f") for k in keys),
        ]
        print(f"\nrank {rank}: mean ms per step ('-': not measured)")
        print(format_table(rows, columns))
        tot = report["totals"][rank]
        cells = ", ".join(f"{heads[k]} {tot[k]:.3f}" for k in keys if tot[k] is not None)
        print(f"rank {rank} total s: {cells}")
    for note in report["notes"]:
        print(f"note: {note}")
