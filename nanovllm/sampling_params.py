from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` means greedy; ``top_k`` 0 or -1 and
    ``top_p=1`` disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        def bad(name, value, fix):
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {fix}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        t = self.temperature
        if not is_number(t) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "use a finite number >= 0 (0 means greedy)")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", self.top_k, "use a positive integer, or 0 / -1 to disable top-k")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "use a number in (0, 1]; 1 disables top-p")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "use an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "use True or False")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", self.stop_token_ids, "use a list of non-negative token ids")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.stop_token_ids = list(self.stop_token_ids)
