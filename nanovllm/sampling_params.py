from __future__ import annotations

import math
from dataclasses import dataclass


def _bad(name: str, value, fix: str):
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {fix}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (immutable: validated once, never changed afterwards).

    - ``temperature``: 0 means greedy.
    - ``top_k``: 0 or -1 disable it; ``top_p``: 1 disables it.
    - ``max_tokens``: at most this many generated tokens; ``min_tokens``: EOS, the
      ``stop_token_ids`` and the ``stop`` strings cannot end generation before this many.
    - ``ignore_eos``: keep generating after EOS.
    - ``stop_token_ids``: token ids that end generation (the id is kept in the output).
    - ``stop``: strings that end generation once the output text contains one; the text ends
      before it unless ``include_stop_str_in_output``. ``finish_reason`` is then ``"stop"``.
    - ``seed``: this request's own random stream: the same prompt and seed give the same tokens,
      alone or batched with others. None uses the engine's generator (``LLM(seed=...)``).
    - ``logprobs``: N adds ``"logprobs"`` to the output: per generated token, a dict of token id
      -> log-probability under the model's raw distribution (before temperature and filters),
      holding the sampled token and the N most likely ones (0: the sampled token only).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            _bad("temperature", t, "use a finite number >= 0 (0 means greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            _bad("top_k", self.top_k, "use a positive integer, or 0 / -1 to disable top-k")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "use a number in (0, 1]; 1 disables top-p")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _bad("max_tokens", self.max_tokens, "use an integer >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            _bad(
                "min_tokens",
                self.min_tokens,
                f"use an integer in [0, max_tokens={self.max_tokens}]",
            )
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "use True or False")
        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            _bad("stop_token_ids", self.stop_token_ids, "use a list of non-negative token ids")
        stop = () if self.stop is None else self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            _bad("stop", self.stop, 'use a str or a list of non-empty str, e.g. ["\\n\\n"]')
        if self.seed is not None and not _is_int(self.seed):
            _bad("seed", self.seed, "use an integer, or None for the engine's generator")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            _bad("logprobs", self.logprobs, "use an integer >= 0 (top tokens per step), or None")
        # Normalised once; frozen afterwards (object.__setattr__ is the dataclass way in here).
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        object.__setattr__(self, "stop", tuple(stop))
