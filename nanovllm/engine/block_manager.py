"""Paged KV blocks with prefix caching.

A full block is identified by a chained xxhash over its tokens and the hash of the block
before it. Hashes are registered only once a block's K/V has been computed, so a lookup never
returns a block that is still being filled. Freed blocks keep their hash and stay reusable
until they are handed out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


def block_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Insertion order = order of freeing: the front is the least recently freed block.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free(self) -> Block:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # its cached content is evicted
        block.hash, block.token_ids, block.ref_count = -1, [], 1
        return block

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest run of leading full blocks already in the cache."""
        hits, h = [], -1
        if not self.enable_prefix_caching:
            return hits
        # At most (len - 1) tokens come from the cache: the last token is always computed (the
        # step needs a query to sample from), and never into a block another sequence shares.
        for i in range((len(seq) - 1) // self.block_size):
            tokens = seq.block(i)
            h = block_hash(tokens, h)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks - len(hits) + reusable_free <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of ``seq``; cached leading blocks are shared."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks - len(hits)):
            seq.block_table.append(self._take_free().block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.last_hash = self.blocks[hits[-1]].hash if hits else -1

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_tokens = seq.num_hashed_blocks = 0
        seq.last_hash = -1

    def blocks_to_append(self, seq: Sequence, extra: int = 0) -> int:
        """Blocks ``seq`` lacks for its tokens plus ``extra`` sampled but not yet appended."""
        needed = -(-(len(seq) + extra) // self.block_size)
        return max(0, needed - len(seq.block_table))

    def can_append(self, seq: Sequence, extra: int = 0) -> bool:
        """Room for the K/V of every token of ``seq`` (the last one is computed next step)."""
        return self.blocks_to_append(seq, extra) <= self.num_free_blocks

    def append(self, seq: Sequence, extra: int = 0) -> None:
        for _ in range(self.blocks_to_append(seq, extra)):
            seq.block_table.append(self._take_free().block_id)

    def register_computed(self, seq: Sequence) -> None:
        """Hash the blocks that became full and computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        while (seq.num_hashed_blocks + 1) * self.block_size <= seq.num_computed_tokens:
            i = seq.num_hashed_blocks
            tokens = seq.block(i)
            h = block_hash(tokens, seq.last_hash)
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block_id.setdefault(h, block.block_id)
            seq.num_hashed_blocks, seq.last_hash = i + 1, h
