"""generate() keeps the collector off the heap it found, and gives it back."""

import gc

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.utils.gc_freeze import frozen_heap


@pytest.fixture
def no_frozen_objects():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_frozen_heap_freezes_and_gives_back(no_frozen_objects):
    with frozen_heap() as froze:
        assert froze and gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_frozen_heap_leaves_a_process_that_froze_itself_alone(no_frozen_objects):
    gc.freeze()
    own = gc.get_freeze_count()
    with frozen_heap() as froze:
        assert not froze
    assert gc.get_freeze_count() == own


def test_frozen_heap_off_by_env(no_frozen_objects, monkeypatch):
    monkeypatch.setenv("NANOVLLM_GC_FREEZE", "0")
    with frozen_heap() as froze:
        assert not froze and gc.get_freeze_count() == 0


def test_generate_runs_frozen_and_unfreezes_even_on_error(tiny_model, no_frozen_objects):
    llm = LLM(tiny_model, device="cpu")
    seen = []
    step = llm.step

    def spying_step():
        seen.append(gc.get_freeze_count())
        return step()

    llm.step = spying_step
    outs = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(outs[0]["token_ids"]) == 4
    assert seen and all(n > 0 for n in seen)
    assert gc.get_freeze_count() == 0

    def failing_step():
        raise RuntimeError("boom")

    llm.step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert gc.get_freeze_count() == 0
    llm.exit()
