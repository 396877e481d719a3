from __future__ import annotations

from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, its KV blocks and how far its KV has been computed."""

    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.block_size = block_size
        self.block_table: list[int] = []
        # Tokens whose K/V is in the cache; the rest still has to be computed.
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at the last allocation.
        self.num_cached_tokens = 0
        # Prefix-cache bookkeeping: how many leading blocks are hashed, and the last hash.
        self.num_hashed_blocks = 0
        self.last_hash = -1
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # One dict per generated token (SamplingParams.logprobs), filled by the sampling step.
        self.logprobs: list[dict[int, float]] = []
        self.stop_reason: str | None = None  # the stop string that ended generation

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    @property
    def needs_prefill(self) -> bool:
        """More than one token still lacks K/V: a (chunked) prefill, not a decode step."""
        return self.num_computed_tokens < len(self.token_ids) - 1
