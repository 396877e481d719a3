"""Helpers shared by the benchmarks (``bench.py``, ``bench_pipeline.py``, ``benchmarks/*.py``).

- random-weight Qwen3 folders at the real shapes (config + tokenizer; ``load_format="dummy"``),
- engines and how to free one completely,
- synthetic decode inputs (fake sequences whose block tables cover ``ctx`` tokens),
- timing (CUDA events, interleaved variants, medians),
- the card's copy bandwidth and bf16 matmul peak, measured in the same run,
- the bytes/flops model of one decode step and its ``max(bytes / bw, flops / peak)`` floor.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ("tiny", "0.6b", "8b")
BLOCK_SIZE = 256  # KV block size of the decode microbenchmarks (the engine's default)
# (name, N, K) of one Qwen3-8B decoder layer's GEMMs, C [M, N] = X [M, K] @ W[N, K].T: 32 query
# + 2 x 8 KV heads of 128, FFN 12288
LAYER_GEMMS_8B = (
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 24576, 4096),
    ("down", 4096, 12288),
)


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    return torch.device(name)


def model_path(shape: str, root: str | None = None) -> str:
    """A random-weight Qwen3 folder at ``shape`` (config + tokenizer, no weights, bf16), cached
    under ``$NANOVLLM_BENCH_CACHE`` (default ``~/.cache/nanovllm/bench``); rebuilt if its
    config no longer matches ``SHAPES``."""
    import shutil

    from nanovllm.utils.default_model import SHAPES as SPECS
    from nanovllm.utils.default_model import make_random_qwen3

    root = root or os.environ.get("NANOVLLM_BENCH_CACHE")
    root = root or os.path.join(os.path.expanduser("~"), ".cache", "nanovllm", "bench")
    path = os.path.join(root, f"qwen3-{shape}-dummy")
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        fresh = cfg.get("dtype") == "bfloat16" and all(
            cfg.get(k) == v for k, v in SPECS[shape].items()
        )
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        tmp = f"{path}.tmp-{os.getpid()}"
        make_random_qwen3(tmp, shape, write_weights=False, dtype=torch.bfloat16)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return path


def add_common_args(p) -> None:
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny shape, tiny workload")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--json", metavar="OUT", help="write the results (and the command) here")
    p.add_argument("--verbose", action="store_true", help="engine INFO logs")


def environment(device: torch.device) -> dict:
    """The card, the software versions and the exact command line."""

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception:
            return None

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True)
            return out.stdout.strip() if out.returncode == 0 else None
        except OSError:
            return None

    info = {
        "argv": list(sys.argv),
        "command": shlex.join(["python", *sys.argv]),
        "cwd": os.getcwd(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "device": str(device),
        "card": platform.processor() or "cpu",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            card=props.name,
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    return info


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- engines
def build_engine(path: str, device: torch.device, dummy: bool = True, **options):
    from nanovllm import LLM

    return LLM(path, load_format="dummy" if dummy else "auto", device=device.type, **options)


def timed_generate(llm, prompts, params, device) -> tuple[float, int]:
    """Seconds and output tokens of one ``generate`` over the whole workload."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, sum(len(o["token_ids"]) for o in outs)


def release_engine(llm) -> None:
    """Close ``llm`` now: its GPU memory and, with tensor parallelism, its worker processes (the
    engine's ``weakref.finalize`` runs once, holding no reference to it). The caller then drops
    its own references and calls ``free_memory()``."""
    llm.exit()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def only_graph_buckets(sizes: Sequence[int]) -> Iterator[None]:
    """Engines built inside capture decode graphs only for ``sizes`` (the batches timed), not
    every bucket up to ``max_num_seqs``: capture time would dominate the start-up of 8B."""
    from nanovllm.engine import cuda_graph

    original = cuda_graph.graph_buckets
    cuda_graph.graph_buckets = lambda n: sorted({s for s in sizes if s <= n} | {n})
    try:
        yield
    finally:
        cuda_graph.graph_buckets = original


def fill_kv_random(runner, seed: int = 0) -> None:
    """Random K/V values instead of zeros (timing should not depend on it; realism is cheap)."""
    cache = getattr(runner, "kv_cache", None)
    if cache is None:
        return
    gen = torch.Generator(cache.device).manual_seed(seed)
    if cache.element_size() > 1:
        cache.normal_(generator=gen)
        return
    for layer in cache.unbind(1):  # fp8 has no normal_: draw in bf16 a layer at a time
        layer.copy_(torch.randn(layer.shape, generator=gen, device=cache.device).to(cache.dtype))


def synthetic_decode_plan(
    batch: int, ctx: int, num_blocks: int, vocab: int, seed: int = 0, block_size=BLOCK_SIZE
):
    """A decode ``StepPlan`` (plain lists, as rank 0 sends it) for ``batch`` sequences of ``ctx``
    tokens (the new one included), each on its own shuffled KV blocks."""
    from nanovllm.engine.model_inputs import StepPlan

    per_seq = math.ceil(ctx / block_size)
    if batch * per_seq > num_blocks:
        raise ValueError(f"batch {batch} x ctx {ctx} needs {batch * per_seq} > {num_blocks} blocks")
    gen = torch.Generator().manual_seed(seed)
    tables = torch.randperm(num_blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    pos = ctx - 1
    slots = tables[:, pos // block_size] * block_size + pos % block_size
    return StepPlan(
        is_prefill=False,
        input_ids=torch.randint(0, vocab, (batch,), generator=gen).tolist(),
        positions=[pos] * batch,
        slot_mapping=slots.tolist(),
        sampling_rows=list(range(batch)),
        context_lens=[ctx] * batch,
        block_tables=tables.tolist(),
    )


def synthetic_decode_inputs(
    batch: int, ctx: int, num_blocks: int, vocab: int, device, seed: int = 0, block_size=BLOCK_SIZE
):
    """``synthetic_decode_plan``'s ``ModelInputs`` on ``device``."""
    from nanovllm.engine.model_inputs import to_model_inputs

    plan = synthetic_decode_plan(batch, ctx, num_blocks, vocab, seed, block_size)
    return to_model_inputs(plan, device)


def decode_step_fn(runner, inputs, pipelined: bool = False) -> Callable[[], object]:
    """One decode step as the engine runs it: CUDA-graph replay (inputs copied into the static
    buffers, then the graph), or the eager forward where there are no graphs."""
    if pipelined:
        pipe = runner.decode
        if pipe.graph_runner is not None:
            return lambda: pipe.graph_runner.run(inputs)
        return lambda: pipe.step(inputs.input_ids, inputs.positions, inputs.meta)
    if runner.graph_runner is not None:
        return lambda: runner.graph_runner.run(inputs)
    return lambda: runner.model(inputs.input_ids, inputs.positions, inputs.meta)


# ----------------------------------------------------------------------------- kernel profiles
# (category, substrings of kernel names), the first match wins: our attention kernels
# (decode split/merge, varlen prefill) and flash-attn's, the KV store, torch.compile's fused
# element-wise kernels, then cuBLAS / CUTLASS / our Triton GEMMs.
KERNEL_CATEGORIES = (
    ("attention", ("_decode_split", "_decode_merge", "_prefill_kernel", "flash")),
    ("kv store", ("_store_kvcache",)),
    ("fused element-wise", ("triton_",)),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90", "cublas", "xmma", "_persistent_mm")),
)


def kernel_category(kernel: str) -> str:
    name = kernel.lower()
    for label, keys in KERNEL_CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other"


@torch.inference_mode()
def kernel_breakdown(fn: Callable[[], object], steps: int = 5) -> dict[str, float]:
    """Mean device milliseconds per call of ``fn``, by kernel category (CUDA; one call first,
    outside the profile)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us:
            key = kernel_category(event.key)
            totals[key] = totals.get(key, 0.0) + us / 1e3 / steps
    return totals


# ----------------------------------------------------------------------------- timing
@contextlib.contextmanager
def kernel_compiles() -> Iterator[list[str]]:
    """The kernels compiled inside the block: each Triton JIT compile as Triton describes it
    (name, launch options, argument types and specialisations), then one entry
    ``"torch.compile: N graphs"`` if Dynamo compiled (or recompiled) graphs. A compile inside a
    timed run is counted as run time. Triton's part stays empty where it has no compile hook."""
    compiled: list[str] = []
    graphs_before = _dynamo_graphs()
    try:
        from triton import knobs

        previous = knobs.runtime.jit_post_compile_hook
    except (ImportError, AttributeError):
        knobs = None

    def hook(*args, **kwargs) -> None:
        compiled.append(str(kwargs.get("repr", args)))

    if knobs is not None:
        knobs.runtime.jit_post_compile_hook = hook
    try:
        yield compiled
    finally:
        if knobs is not None:
            knobs.runtime.jit_post_compile_hook = previous
        graphs = _dynamo_graphs() - graphs_before
        if graphs:
            compiled.append(f"torch.compile: {graphs} graphs")


@contextlib.contextmanager
def gc_pauses() -> Iterator[dict[str, dict]]:
    """The garbage collector's passes inside the block, per generation: ``{"gen2": {"passes":
    n, "seconds": s}, ...}`` (a pass stops every Python thread, so it is host time of the step
    loop)."""
    stats = {f"gen{g}": {"passes": 0, "seconds": 0.0} for g in range(3)}
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        entry = stats[f"gen{info['generation']}"]
        entry["passes"] += 1
        entry["seconds"] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    try:
        yield stats
    finally:
        gc.callbacks.remove(callback)


def format_gc_pauses(stats: dict[str, dict]) -> str:
    return ", ".join(f"{g} {e['passes']} passes {e['seconds']:.3f} s" for g, e in stats.items())


def _dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (recompiles included)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return counters["stats"]["unique_graphs"]


def time_fns(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median milliseconds of each function. Variants are interleaved (every rep times each
    once, in turn) so that they see the same clocks and temperature."""
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times[name].append(start.elapsed_time(stop))
            else:
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def graph_replay_ms(
    fn: Callable[[], object], device: torch.device, reps: int, trials: int, capture: bool = True
) -> float:
    """Median over ``trials`` of milliseconds per run of ``fn``, captured once as a CUDA graph
    after an eager warm-up on a side stream (eager on CPU, or with ``capture=False``: as the
    engine runs prefill), ``reps`` runs a trial after one untimed trial. Every rank of a process
    group calls it together: a barrier starts each trial, so ranks whose graphs hold collectives
    replay side by side."""
    if device.type == "cuda" and capture:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # warm-up outside the capture: compiles, connects communicators
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    else:
        run = fn
    times = []
    for _ in range(trials + 1):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) * 1e3 / reps)
    return statistics.median(times[1:])


def _rank_entry(
    rank: int, target: Callable, world_size: int, device_name: str, port: int, queue, args: tuple
) -> None:
    """A spawned rank: join the process group (NCCL on ``cuda:rank``, else gloo), run
    ``target(rank, device, *args)``, leave; rank 0 hands back what it returned."""
    from nanovllm.utils.distributed import cpu_threads_per_rank, init_process_group

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads_per_rank(world_size))
    store = torch.distributed.TCPStore("127.0.0.1", port, world_size, rank == 0)
    init_process_group(rank, world_size, store, device)
    try:
        result = target(rank, device, *args)
    finally:
        torch.distributed.destroy_process_group()
    if rank == 0:
        queue.put(result)


def ranks_environment(device_name: str, world_size: int) -> dict:
    """``environment`` of the device rank 0 runs on; exits when fewer than ``world_size`` GPUs
    are visible for ``run_ranks``."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        if torch.cuda.device_count() < world_size:
            sys.exit(f"--world-size {world_size}: only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", 0)
    return environment(device)


def run_ranks(target: Callable, world_size: int, device_name: str, *args) -> object:
    """Run ``target(rank, device, *args)`` (a module-level function: spawn pickles it by name)
    on ``world_size`` spawned ranks of one process group; returns rank 0's result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # the ranks' TCPStore
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _rank_entry,
        args=(target, world_size, device_name, port, queue, args),
        nprocs=world_size,
        start_method="spawn",
    )
    return queue.get()


def concurrent_ms(fn_by_stream: dict, reps: int) -> tuple[float, dict]:
    """``{name: (stream, fn)}`` issued together, each on its stream: the median wall ms until
    every stream's work is done, and the median ms per stream. The first repetition compiles
    and warms up and is not counted."""
    total, per = [], {name: [] for name in fn_by_stream}
    for _ in range(reps + 1):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        ends = {}
        for name, (stream, fn) in fn_by_stream.items():
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                fn()
                ends[name] = torch.cuda.Event(enable_timing=True)
                ends[name].record()
        torch.cuda.synchronize()
        per_rep = {name: start.elapsed_time(e) for name, e in ends.items()}
        total.append(max(per_rep.values()))
        for name, ms in per_rep.items():
            per[name].append(ms)
    return statistics.median(total[1:]), {k: statistics.median(v[1:]) for k, v in per.items()}


class PagedDecodeCase:
    """Decode-attention inputs at the Qwen3-8B shape (32 heads, 8 KV heads, head_dim 128, KV
    blocks of 256, bf16): ``calls`` batches of ``batch`` sequences of ``ctx`` tokens, each call
    on its own randomly placed KV blocks, with at least ``min_bytes`` of K+V in all (enough to
    defeat L2). ``layout`` "hnd" stores the cache [blocks, kv_heads, block_size, head_dim] and
    passes the logical [blocks, block_size, kv_heads, head_dim] view, as "nhd" is stored."""

    HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 256

    def __init__(self, device, batch: int, ctx: int, min_bytes: int, layout: str = "nhd"):
        d, kv_heads, bs, dtype = self.HEAD_DIM, self.KV_HEADS, self.BLOCK, torch.bfloat16
        self.batch, self.ctx = batch, ctx
        kv_bytes = 2 * batch * ctx * kv_heads * d * 2
        self.calls = max(1, math.ceil(min_bytes / kv_bytes))
        self.nbytes = self.calls * kv_bytes
        num_blocks = self.calls * batch * math.ceil(ctx / bs)
        shape, perm = {
            "nhd": ((num_blocks, bs, kv_heads, d), (0, 1, 2, 3)),
            "hnd": ((num_blocks, kv_heads, bs, d), (0, 2, 1, 3)),
        }[layout]
        self.k = torch.randn(shape, dtype=dtype, device=device).permute(*perm)
        self.v = torch.randn(shape, dtype=dtype, device=device).permute(*perm)
        self.tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(
            self.calls, batch, -1
        )
        self.lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, self.HEADS, d, dtype=dtype, device=device)

    def run(self, config=None, num_sms: int | None = None) -> None:
        """Every call's decode attention (``config``: a ``DecodeConfig``, or the default)."""
        from nanovllm.kernels.triton_attention import paged_decode_attention

        scale = self.HEAD_DIM**-0.5
        for i in range(self.calls):
            paged_decode_attention(
                self.q, self.k, self.v, self.tables[i], self.lens, scale,
                num_sms=num_sms, config=config,
            )  # fmt: skip


def _copy_ms(device: torch.device, nbytes: int, reps: int) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return time_fns({"copy": x.clone}, reps, 3, device)["copy"]


def _matmul_ms(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    a, b, c = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(3))
    return time_fns({"mm": lambda: torch.mm(a, b, out=c)}, reps, 3, device)["mm"]


def measure_card(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """Copy bandwidth (clone of a 1 GiB tensor: read + written bytes / time) and dense matmul
    peak (an n^3 matmul in ``dtype``, n = 8192), medians of 20 runs each."""
    nbytes, n, reps = ((64 << 20), 512, 5) if quick else ((1 << 30), 8192, 20)
    copy_ms, mm_ms = _copy_ms(device, nbytes, reps), _matmul_ms(device, n, dtype, reps)
    free_memory()
    return {
        "copy_bytes": 2 * nbytes,
        "copy_ms": copy_ms,
        "copy_gbs": 2 * nbytes / (copy_ms * 1e-3) / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(dtype),
        "matmul_ms": mm_ms,
        "peak_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
    }


# ----------------------------------------------------------------------------- cost model
@dataclass
class ModelCost:
    """What one decode step must read and compute. Weights: every decoder-layer parameter once
    (the embedding contributes only the batch's rows; lm_head is outside the step, since logits
    are computed after it). KV: ``2 * layers * kv_heads * head_dim * ctx * batch * itemsize``.
    Flops: ``2 * matmul params * batch`` + attention ``4 * layers * heads * head_dim * ctx *
    batch``. Activations are not counted, so the floor is a lower bound."""

    total_params: int
    layer_params: int
    matmul_params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    kv_itemsize: int

    @classmethod
    def from_config(cls, hf_config, itemsize: int, kv_itemsize: int | None = None) -> ModelCost:
        from nanovllm.models.qwen3 import Qwen3ForCausalLM

        with torch.device("meta"):
            model = Qwen3ForCausalLM(hf_config)
        step = [
            (n, p)
            for n, p in model.named_parameters()
            if "embed_tokens" not in n and "lm_head" not in n
        ]
        attn = model.model.layers[0].self_attn
        return cls(
            total_params=sum(p.numel() for p in model.parameters()),
            layer_params=sum(p.numel() for _, p in step),
            matmul_params=sum(p.numel() for _, p in step if p.dim() == 2),
            hidden=hf_config.hidden_size,
            layers=hf_config.num_hidden_layers,
            heads=attn.num_heads,
            kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            itemsize=itemsize,
            kv_itemsize=kv_itemsize or itemsize,
        )

    def kv_bytes(self, batch: int, ctx: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * ctx * batch * self.kv_itemsize

    def step_bytes(self, batch: int, ctx: int, weight_reads: int = 1) -> int:
        weights = self.layer_params * self.itemsize * weight_reads
        return weights + batch * self.hidden * self.itemsize + self.kv_bytes(batch, ctx)

    def step_flops(self, batch: int, ctx: int) -> int:
        attention = 4 * self.layers * self.heads * self.head_dim * ctx * batch
        return 2 * self.matmul_params * batch + attention

    def memory_ms(self, batch: int, ctx: int, card: dict, weight_reads: int = 1) -> float:
        """The step's bytes at the copy bandwidth."""
        return self.step_bytes(batch, ctx, weight_reads) / (card["copy_gbs"] * 1e9) * 1e3

    def compute_ms(self, batch: int, ctx: int, card: dict) -> float:
        """The step's flops at the matmul peak."""
        return self.step_flops(batch, ctx) / (card["peak_tflops"] * 1e12) * 1e3

    def floor(self, batch: int, ctx: int, card: dict, weight_reads: int = 1) -> tuple[float, str]:
        """(floor ms, "memory" or "compute"): max(bytes / copy bandwidth, flops / peak), the
        step if its reads and its math overlapped perfectly."""
        mem = self.memory_ms(batch, ctx, card, weight_reads)
        comp = self.compute_ms(batch, ctx, card)
        return (mem, "memory") if mem >= comp else (comp, "compute")

    def serial(self, batch: int, ctx: int, card: dict, weight_reads: int = 1) -> float:
        """Serial bound in ms: bytes / copy bandwidth + flops / peak, each at its own roofline
        one after the other (no overlap of reads and math). A step slower than this overlaps
        nothing and also misses both rooflines; between the floor and this it is where any
        overlap would pay."""
        return self.memory_ms(batch, ctx, card, weight_reads) + self.compute_ms(batch, ctx, card)

    def block_bytes(self, block_size: int) -> int:
        return self.kv_bytes(1, block_size)


def blocks_needed(batch: int, ctx: int, block_size: int = BLOCK_SIZE) -> int:
    return batch * math.ceil(ctx / block_size)


def kv_blocks_that_fit(cost: ModelCost, device: torch.device, args) -> int | None:
    """KV blocks that fit next to the weights and ``args.reserve_gib`` (activations, graphs)
    within ``args.gpu_memory_utilization`` of the card; None (no limit) off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    budget = total * args.gpu_memory_utilization - (total - free)
    budget -= cost.total_params * cost.itemsize + args.reserve_gib * 2**30
    return max(0, int(budget // cost.block_bytes(BLOCK_SIZE)))


def add_decode_sweep_args(p, reps: int, warmup: int, reserve_gib: float) -> None:
    """The options decode_step.py and bench_pipeline.py share: models, repetitions, memory."""
    p.add_argument("--shape", nargs="+", choices=SHAPES, help="default: 0.6b 8b (quick: tiny)")
    p.add_argument("--model", help="a checkpoint folder instead of --shape (weights loaded)")
    p.add_argument("--reps", type=int, help=f"timed steps per point, median (default {reps})")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument(
        "--reserve-gib", type=float, default=reserve_gib, help="memory kept off the KV cache"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="engine max_model_len (raised to the largest ctx); it sets the width of the "
        "captured block tables, from which the decode kernel picks its split count",
    )
    add_common_args(p)


def sweep_models(args) -> list[tuple[str, str, bool]]:
    """(name, path, dummy weights) per model to sweep: ``--model`` or every ``--shape``."""
    if args.model:
        return [(os.path.basename(os.path.normpath(args.model)), args.model, False)]
    return [(s, model_path(s), True) for s in args.shape]


def measure_and_print_card(device: torch.device, env: dict, quick: bool) -> dict:
    """``measure_card`` in the sweep dtype (bf16 on CUDA), printed in one line."""
    card = measure_card(device, torch.bfloat16 if device.type == "cuda" else torch.float32, quick)
    print(
        f"card: {env['card']}  copy {card['copy_gbs']:.0f} GB/s  "
        f"{card['matmul_dtype']} matmul {card['peak_tflops']:.1f} TFLOP/s"
    )
    return card


def plan_decode(name: str, hf_config, device: torch.device, args):
    """(cost model, (batch, ctx) points that fit in memory, points skipped); prints the skips."""
    from nanovllm.utils.hf import resolve_dtype

    kv_itemsize = 1 if getattr(args, "kv_cache_dtype", "auto") != "auto" else None  # fp8
    cost = ModelCost.from_config(
        hf_config, resolve_dtype("auto", hf_config, device).itemsize, kv_itemsize
    )
    limit = kv_blocks_that_fit(cost, device, args)
    fit, skipped = [], []
    for point in [(b, c) for c in args.ctxs for b in args.batches]:
        need = blocks_needed(*point)
        (fit if limit is None or need <= limit else skipped).append(point)
        if point in skipped:
            print(f"skip {name} batch {point[0]} ctx {point[1]}: {need} KV blocks, {limit} fit")
    return cost, fit, skipped


def build_decode_engine(path: str, dummy: bool, device, points, args, **options):
    """An engine sized for ``points``: max_num_seqs = the largest batch, exactly the KV blocks
    the largest point needs (random values), decode graphs only for the batches timed."""
    batches = sorted({b for b, _ in points})
    with only_graph_buckets(batches):
        llm = build_engine(
            path,
            device,
            dummy,
            max_num_seqs=batches[-1],
            max_model_len=max(args.max_model_len, max(c for _, c in points)),
            kvcache_block_size=BLOCK_SIZE,
            num_kvcache_blocks=max(blocks_needed(*p) for p in points),
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
            kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
            **options,
        )
    fill_kv_random(llm.model_runner)
    return llm


# ----------------------------------------------------------------------------- output
def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec); missing values print as '-'. Columns are at least
    8 wide, so that a header printed alone lines up with rows printed one at a time."""

    def cell(row: dict, key: str, spec: str) -> str:
        v = row.get(key)
        return "-" if v is None else format(v, spec)

    body = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max(8, len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
