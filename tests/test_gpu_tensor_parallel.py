"""Two GPUs: tensor_parallel_size=2 against 1 on a random model of Qwen3-8B shape, bf16.

The weights are ``load_format="dummy"``: every full tensor is drawn from a generator seeded by
its name, and each rank keeps its shard of it, so both engines hold the same model (no 16 GB
checkpoint to write). Rank 0's sampler sees the gathered logits; we record them per step and
compare, with CUDA graphs (NCCL all-reduces inside) as in normal use.

Every engine runs in a subprocess of its own session with a hard time limit: a hang (the first
NCCL run hung in shut-down: rank 0 destroyed the process group while its CUDA graphs, which hold
captured all-reduces, were alive, and NCCL's finalize waits for those graphs forever) fails the
test and kills rank 0 and its workers, instead of blocking the suite. A healthy shut-down must
not need forcing; a worker failure under NCCL must surface.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import mixed_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs 2 CUDA GPUs (tensor_parallel_size=2)",
    ),
]

STEPS = 8
ENGINE = dict(
    dtype="bfloat16",
    load_format="dummy",
    max_num_seqs=16,
    max_model_len=1024,
    max_num_batched_tokens=4096,
    num_kvcache_blocks=64,
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # one engine of 8B shape: start-up, 8 steps and shut-down take about a minute
EXIT_BOUND_S = 60  # a healthy exit() takes seconds; its forced worst case is about 80 s
# The failure script: two 0.6B-shape engines, one failing; about a minute when healthy.
FAILURE_TIMEOUT_S = 180
FORCED = "shut-down forced"  # what nanovllm logs when a shut-down step had to be forced


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory) -> str:
    from nanovllm.utils.default_model import make_random_qwen3

    return make_random_qwen3(str(tmp_path_factory.mktemp("qwen3-8b")), "8b", write_weights=False)


def run_script(
    tmp_path, name: str, source: str, *args: str, timeout_s: float = TIMEOUT_S
) -> tuple[str, str]:
    """Run ``source`` as a script; stdout and stderr. Past ``timeout_s`` the whole session (rank
    0 and its workers) is killed and the test fails with the output so far."""
    script = tmp_path / f"{name}.py"
    script.write_text(source)
    # os.environ as is: the machine's NCCL settings (e.g. NCCL_NVLS_ENABLE=0) must stay set.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{name} hung: killed after {timeout_s} s\n--- stdout\n{out[-4000:]}\n"
            f"--- stderr\n{err[-8000:]}"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"{name}: exit code {proc.returncode}\n{out[-4000:]}{err[-8000:]}"
    return out, err


RECORD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from nanovllm import LLM, SamplingParams

    if __name__ == "__main__":
        path, tp, spec_file, out_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        with open(spec_file) as f:
            spec = json.load(f)
        llm = LLM(path, tensor_parallel_size=tp, **spec["engine"])
        steps = []
        sampler = llm.model_runner.sampler

        def recording(logits, *args, **kwargs):
            steps.append(logits.float().cpu())
            return sampler(logits, *args, **kwargs)

        llm.model_runner.sampler = recording
        params = SamplingParams(temperature=0, max_tokens=spec["steps"], ignore_eos=True)
        outs = [o["token_ids"] for o in llm.generate(spec["prompts"], params, use_tqdm=False)]
        stats = llm.model_runner.get_pipeline_statistics()
        start = time.monotonic()
        llm.exit()
        exit_s = time.monotonic() - start
        print(f"tp={tp}: exit() took {exit_s:.2f} s")
        all_reduce = llm.runtime.tensor_parallel_all_reduce
        torch.save(
            dict(outs=outs, logits=steps, stats=stats, exit_s=exit_s, all_reduce=all_reduce),
            out_file,
        )
    """
)


def run_recording_logits(tmp_path, path: str, tp: int, prompts, **kw):
    """Greedy outputs, the logits rank 0 sampled from at each step ([rows, vocab], float), the
    pipeline statistics and the all-reduce the engine resolved."""
    spec_file, out_file = tmp_path / f"spec-tp{tp}.json", tmp_path / f"out-tp{tp}.pt"
    spec_file.write_text(json.dumps(dict(engine={**ENGINE, **kw}, prompts=prompts, steps=STEPS)))
    out, err = run_script(
        tmp_path, f"record_tp{tp}", RECORD_SCRIPT, path, str(tp), str(spec_file), str(out_file)
    )
    print(out.strip())
    result = torch.load(out_file, weights_only=False)
    # Every rank drops its graphs before NCCL's finalize and leaves within the deadlines.
    assert FORCED not in err, err[-8000:]
    assert result["exit_s"] < EXIT_BOUND_S, f"exit() took {result['exit_s']:.1f} s"
    return result["outs"], result["logits"], result["stats"], result["all_reduce"]


def test_tp2_equals_tp1_on_8b_shape(model_8b, tmp_path):
    prompts = mixed_prompts(8, seed=3, vocab=10000, lo=20, hi=200)
    one, logits_1, _, _ = run_recording_logits(tmp_path, model_8b, 1, prompts)
    two, logits_2, stats, all_reduce = run_recording_logits(
        tmp_path, model_8b, 2, prompts, enable_pipeline=True
    )
    assert stats["mode"] == "sequential" and "tensor_parallel_size=2" in stats["reason"]
    assert all_reduce == "symm_mem"  # the default ("auto") on GPUs with peer access
    assert_same_greedy_run(prompts, one, logits_1, two, logits_2)


def test_tp2_symm_mem_all_reduce_equals_nccl(model_8b, tmp_path):
    """The symmetric-memory all-reduce (decode steps; prefill's larger messages stay on NCCL)
    against NCCL's, both at TP=2 with CUDA graphs."""
    prompts = mixed_prompts(8, seed=4, vocab=10000, lo=20, hi=200)
    for name in ("nccl", "symm"):
        (tmp_path / name).mkdir()
    nccl, logits_n, _, used = run_recording_logits(
        tmp_path / "nccl", model_8b, 2, prompts, tensor_parallel_all_reduce="nccl"
    )
    assert used == "nccl"
    symm, logits_s, _, used = run_recording_logits(
        tmp_path / "symm", model_8b, 2, prompts, tensor_parallel_all_reduce="symm_mem"
    )
    assert used == "symm_mem"
    worst = max((a - b).abs().max().item() for a, b in zip(logits_n[1:], logits_s[1:]))
    print(f"largest |logit difference| over the decode steps: {worst:.5f}")
    assert_same_greedy_run(prompts, nccl, logits_n, symm, logits_s)


def assert_same_greedy_run(prompts, one, logits_1, two, logits_2) -> None:
    """Two greedy runs of one model: the logits rank 0 sampled from agree within bf16 rounding
    of a tensor-parallel sum at every step, and every sequence that never met a near-tie gives
    the same tokens."""
    # One prefill step (every prompt fits max_num_batched_tokens), then STEPS - 1 decode steps.
    assert len(logits_1) == len(logits_2) == STEPS
    # Rows follow the prompts in every step (ignore_eos: no sequence leaves early).
    # Rank partial sums are rounded to bf16 before the all-reduce and the reduction order
    # differs; a random 36-layer model amplifies that: on 2x H100 every row's relative RMS
    # difference was 0.043-0.054 (mean 0.049) and the maximum |diff| 5-6% of the largest logit.
    # A sharding error gives uncorrelated logits: a relative RMS difference near 1.4. Bound the
    # relative RMS per row and on average, the maximum loosely; clear winners must agree.
    agree = [True] * len(prompts)  # token prefixes equal so far: their logits are comparable
    near_tie = [False] * len(prompts)  # met a step whose top two logits bf16 noise could swap
    compared, failures, rel = 0, [], []
    for step, (a, b) in enumerate(zip(logits_1, logits_2)):
        assert a.shape == b.shape
        for row in range(a.shape[0]):
            if not agree[row]:
                continue
            diff = a[row] - b[row]
            err = diff.abs().max().item()
            scale = a[row].abs().max().item()
            rel_rms = (diff.norm() / a[row].norm()).item()
            print(
                f"step {step} row {row}: relative RMS {rel_rms:.4f}, max |diff| {err:.4f} "
                f"of {scale:.3f}"
            )
            rel.append(rel_rms)
            if rel_rms > 0.1 or err > 0.2 * scale:
                failures.append(f"step {step}, prompt {row}: logits differ beyond bf16")
            compared += step > 0
            top2 = a[row].topk(2).values
            clear = (top2[0] - top2[1]).item() > 2 * err
            if clear and a[row].argmax() != b[row].argmax():
                failures.append(f"step {step}, prompt {row}: a clear winner lost")
            near_tie[row] |= not clear
            agree[row] = one[row][step] == two[row][step]
    assert not failures, failures
    mean_rel = sum(rel) / len(rel)
    print(f"mean relative RMS difference over {len(rel)} rows: {mean_rel:.4f}")
    assert mean_rel < 0.08, mean_rel
    # Random weights give near-ties that bf16 rounding may flip; only clear winners must agree.
    same = sum(o == t for o, t in zip(one, two))
    untied = sum(not t for t in near_tie)
    print(f"identical {STEPS}-token greedy outputs: {same} of {len(prompts)}")
    print(f"sequences without a near-tie in any step: {untied}")
    print(f"decode-step rows compared: {compared}")
    # No fixed fraction of identical outputs is justified here: the single-GPU tests' bounds
    # (test_pipeline.py: all but 2; test_gpu_parity.py: half) hold for roundings far smaller
    # than TP's, which on 2x H100 left 1-2 of 8 sequences identical (benchmarks/results/
    # tp_*_8b_h100x2_*.log): a random model's top two logits are often closer than TP's
    # difference (max |diff| about 5% of the largest logit). What is certain: when every
    # step's top-two gap exceeds twice
    # the largest logit difference, no rounding can swap them, so such a sequence is identical.
    assert same >= untied, f"{same} identical outputs, {untied} sequences without a near-tie"
    assert compared > 0, "every sequence diverged at its first token: no decode step compared"


FAILURE_SCRIPT = textwrap.dedent(
    """
    import faulthandler, functools, multiprocessing, sys, time
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine import tp_workers
    from nanovllm.engine.tp_workers import WorkerError
    from tests.engine.tp_faults import REAL_WORKER_MAIN, fail_at_step

    if __name__ == "__main__":
        faulthandler.dump_traceback_later(FAILURE_TIMEOUT_S - 30)  # where a hang waits, if one
        path, async_scheduling = sys.argv[1], sys.argv[2] == "1"
        all_reduce = sys.argv[3] if len(sys.argv) > 3 else "nccl"
        kw = dict(tensor_parallel_size=2, dtype="bfloat16", load_format="dummy",
                  max_num_seqs=8, max_model_len=512, num_kvcache_blocks=32,
                  async_scheduling=async_scheduling, tensor_parallel_all_reduce=all_reduce)
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        tp_workers._worker_main = functools.partial(fail_at_step, 1, 3)  # rank 1, third step
        llm = LLM(path, **kw)
        start = time.monotonic()
        try:
            llm.generate([[1, 2, 3]] * 4, sp, use_tqdm=False)
            sys.exit("no error")
        except WorkerError as e:
            assert "injected failure in rank 1 at step 3" in str(e), str(e)
        print(f"failure surfaced and the group shut down in {time.monotonic() - start:.2f} s")
        assert not multiprocessing.active_children()
        tp_workers._worker_main = REAL_WORKER_MAIN
        if all_reduce != "nccl":  # one symmetric-memory engine per process: "auto" takes NCCL
            kw["tensor_parallel_all_reduce"] = "auto"
        llm = LLM(path, **kw)  # a new group in the same process
        assert llm.runtime.tensor_parallel_all_reduce == "nccl"
        out = llm.generate([[1, 2, 3]] * 4, sp, use_tqdm=False)
        assert all(len(o["token_ids"]) == 8 for o in out)
        start = time.monotonic()
        llm.exit()
        print(f"healthy exit() after a failure: {time.monotonic() - start:.2f} s")
        assert not multiprocessing.active_children()
        print("TP FAILURE HANDLED")
    """
)


# async_scheduling=True: a decode step is issued ahead, and its inputs are broadcast from rank 0
# with an eager collective, when the worker fails; rank 0 sees the failure in its watched wait.
# symm_mem: rank 0's GPU waits in a symmetric-memory barrier that nothing aborts until the
# shut-down plays the stopped rank's part (SymmetricAllReduce.release_waiters); the next engine
# of the process ("auto": NCCL, as symmetric memory serves one engine per process) must start.
@pytest.mark.parametrize("all_reduce", ["nccl", "symm_mem"])
@pytest.mark.parametrize("async_scheduling", ["0", "1"])
def test_worker_failure_under_nccl_surfaces(tmp_path, async_scheduling, all_reduce):
    from nanovllm.utils.default_model import make_random_qwen3

    path = make_random_qwen3(str(tmp_path / "model"), "0.6b", write_weights=False)
    source = FAILURE_SCRIPT.replace("FAILURE_TIMEOUT_S", str(FAILURE_TIMEOUT_S))
    out, err = run_script(
        tmp_path, "fail", source, path, async_scheduling, all_reduce, timeout_s=FAILURE_TIMEOUT_S
    )
    print(out.strip())
    assert "TP FAILURE HANDLED" in out, out[-4000:] + err[-8000:]
