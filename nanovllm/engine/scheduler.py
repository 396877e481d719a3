"""Continuous batching: chunked prefill first, then decode; preemption by recompute."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work: ``num_new_tokens[i]`` tokens of ``seqs[i]``, starting at its
    ``num_computed_tokens``. A sequence samples a token when the step reaches its end."""

    is_prefill: bool
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # A decode step scheduled ahead (async scheduling) while the step before it still runs:
    # each sequence then has one sampled token not yet appended (``lookahead`` = 1), which is
    # this step's input, read on the device from row ``prev_rows[i]`` of that step's samples.
    lookahead: int = 0
    prev_rows: list[int] | None = None
    # A mixed step (engine/mixed_scheduler.py): rows [0, num_decode_rows) are decodes of one
    # token each, the rest prefill chunks; ``is_prefill`` is then True (an eager forward).
    num_decode_rows: int = 0

    def samples(self, i: int) -> bool:
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == len(seq)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: set[int],
        headroom_steps: int = 32,
        stop_checker: Callable[[Sequence], str | None] | None = None,
        admission_batch: int = 1,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        # The stop string a sequence's last token completed (SamplingParams.stop), or None.
        self.stop_checker = stop_checker
        # Admission keeps free blocks for the running sequences' next ``headroom_steps`` tokens.
        # Without it a full cache thrashes: a preempted sequence's freed blocks let it back in at
        # once, it is recomputed, and the next decode step preempts it again: the recomputation
        # costs more prefill work than the headroom costs in batch size.
        self.headroom_steps = headroom_steps
        # While decodes run, admit new requests only once ``admission_batch`` of them (or every
        # waiting one) would find a free slot. Admitting each request as soon as one finishes
        # gives prefill-only steps of one or two prompts: their GEMMs run far below the matmul
        # peak, their eager launches cost as much host time as a large step's, and every one
        # of them stalls the whole decode batch.
        self.admission_batch = admission_batch
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._finished_while_scheduling: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self, budget: int | None = None, admit: bool = True) -> ScheduledBatch:
        """Prefill chunks within ``budget`` tokens (default: ``max_num_batched_tokens``): the
        running sequences' unfinished prefills first, then new requests if ``admit``."""
        batch = ScheduledBatch(is_prefill=True)
        budget = self.max_num_batched_tokens if budget is None else max(0, budget)

        def take(seq: Sequence) -> None:
            nonlocal budget
            n = min(len(seq) - seq.num_computed_tokens, budget)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

        for seq in self.running:  # sequences in the middle of a chunked prefill
            if budget and seq.needs_prefill:
                take(seq)
        if not admit or (not batch.seqs and self._admission_held_back()):
            return batch  # decode on; admit once enough slots have freed
        reserve = None  # blocks the running sequences' headroom needs; computed when needed
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if reserve is None and self.running:
                reserve = self._running_headroom()
            fits, reserve = self._room_for(seq, reserve)
            if not fits:
                break
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            if seq.needs_prefill:
                take(seq)  # otherwise the prefix cache held all but its last token: decode it
        return batch

    def _schedule_decode(self) -> ScheduledBatch:
        batch = ScheduledBatch(is_prefill=False)
        block_size = self.block_manager.block_size
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or seq.needs_prefill:
                continue  # preempted or finished earlier in this loop, or a prefill chunk's
            if len(seq.token_ids) <= len(seq.block_table) * block_size:
                batch.seqs.append(seq)  # its blocks hold the new token: the common case
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    # Alone and still no room: the KV cache cannot hold this sequence longer.
                    # The engine refuses such requests up front, so this is a safety net: the
                    # sequence ends as "abort", never as a "length" it did not reach.
                    self.finish(seq, "abort")
                    self._finished_while_scheduling.append(seq)
                    logger.error(
                        "sequence %d aborted at %d tokens: the KV cache (%d blocks) is full",
                        seq.seq_id,
                        len(seq),
                        self.block_manager.num_blocks,
                    )
                    break
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.append(seq)
            batch.seqs.append(seq)
        batch.num_new_tokens = [1] * len(batch.seqs)
        return batch

    def schedule_ahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """The decode step after ``prev`` (a decode step still running, its tokens not yet
        appended), or None where only the regular ``schedule()`` may decide: new requests are
        due for admission, a prefill is unfinished, or a sequence would need a block that is
        not free (preemption). Sequences that ``prev`` certainly ends (max_tokens,
        max_model_len) are left out; one that ends on a sampled EOS or stop string computes
        one discarded row."""
        if prev.is_prefill or self._admission_due():
            return None
        live = {id(s) for s in self.running if s.status == SequenceStatus.RUNNING}
        rows = [
            i
            for i, s in enumerate(prev.seqs)
            if s.status == SequenceStatus.RUNNING and id(s) in live
        ]
        if len(rows) != len(live):
            return None  # something running is not decoding in ``prev`` (a prefill chunk)
        ahead = ScheduledBatch(is_prefill=False, lookahead=1, prev_rows=[])
        need = 0
        for i in rows:
            seq = prev.seqs[i]
            done = len(seq) + 1  # with prev's token
            if seq.num_completion_tokens + 1 >= seq.params.max_tokens or done >= self.max_model_len:
                continue
            need += self.block_manager.blocks_to_append(seq, extra=1)
            ahead.seqs.append(seq)
            ahead.num_new_tokens.append(1)
            ahead.prev_rows.append(i)
        if not ahead.seqs or need > self.block_manager.num_free_blocks:
            return None
        for seq in ahead.seqs:
            self.block_manager.append(seq, extra=1)
        return ahead

    def _admission_due(self) -> bool:
        """Would ``schedule()`` admit a waiting request now (a prefill step)?"""
        if not self.waiting or self._admission_held_back():
            return False
        reserve = self._running_headroom() if self.running else None
        return self._room_for(self.waiting[0], reserve)[0]

    def _admission_held_back(self) -> bool:
        """Decodes run and fewer slots are free than ``admission_batch`` (or the waiting)."""
        free_slots = self.max_num_seqs - len(self.running)
        return bool(self.running and self.waiting) and free_slots < min(
            self.admission_batch, len(self.waiting)
        )

    def _running_headroom(self) -> int:
        return sum(self._headroom_blocks(s) for s in self.running)

    def _room_for(self, seq: Sequence, reserve: int | None) -> tuple[bool, int | None]:
        """Does ``seq`` fit beside the running sequences' headroom ``reserve`` (None: nothing
        runs)? Returns (fits, the reserve with ``seq``'s own headroom added)."""
        if not self.block_manager.can_allocate(seq):
            return False, reserve
        if reserve is None:
            return True, None
        own = self._headroom_blocks(seq)
        # (cached prefix blocks counted as new: errs on the side of waiting)
        if self.block_manager.num_free_blocks - seq.num_blocks - own < reserve:
            return False, reserve
        return True, reserve + own

    def _headroom_blocks(self, seq: Sequence) -> int:
        """Blocks ``seq`` needs beyond its current ones for its next ``headroom_steps`` tokens."""
        remaining = seq.params.max_tokens - seq.num_completion_tokens
        future = min(self.headroom_steps, remaining, self.max_model_len - len(seq))
        bs = self.block_manager.block_size
        return max(0, -(-(len(seq) + future) // bs) - max(len(seq.block_table), seq.num_blocks))

    def take_finished(self) -> list[Sequence]:
        """Sequences the last ``schedule()`` ended itself (no room left to grow)."""
        out, self._finished_while_scheduling = self._finished_while_scheduling, []
        return out

    def preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks and queue it first for a re-prefill (recompute)."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted sequence %d (KV cache full)", seq.seq_id)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)
        self.running.remove(seq)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None]) -> list[Sequence]:
        """Advance each sequence by the tokens it computed; append sampled tokens; finish.
        Returns the sequences this ended."""
        running, blocks, eos = SequenceStatus.RUNNING, self.block_manager, self.eos_token_ids
        ended: list[Sequence] = []
        hashed_block = blocks.block_size if blocks.enable_prefix_caching else None
        for seq, n, token_id in zip(batch.seqs, batch.num_new_tokens, token_ids):
            if seq.status != running:
                continue
            seq.num_computed_tokens += n
            if (
                hashed_block
                and (seq.num_hashed_blocks + 1) * hashed_block <= seq.num_computed_tokens
            ):
                blocks.register_computed(seq)  # a block became full and computed
            if token_id is None:
                continue
            ids = seq.token_ids
            ids.append(token_id)
            p = seq.params
            completion = len(ids) - seq.num_prompt_tokens
            may_stop = completion > p.min_tokens  # (the sampler masks them too)
            if may_stop and (
                (not p.ignore_eos and token_id in eos) or token_id in p.stop_token_ids
            ):
                reason = "stop"
            elif p.stop and self.stop_checker is not None and self._stop_string(seq):
                reason = "stop"
            elif completion >= p.max_tokens or len(ids) >= self.max_model_len:
                reason = "length"
            else:
                continue
            self.finish(seq, reason)
            ended.append(seq)
        return ended

    def _stop_string(self, seq: Sequence) -> bool:
        seq.stop_reason = self.stop_checker(seq)
        return seq.stop_reason is not None
