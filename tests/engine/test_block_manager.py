"""BlockManager: reference counts, prefix caching (chained hashes, computed-only hits, the
keep-one-token rule), LRU eviction of freed cached blocks, and append."""

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4


def make_seq(tokens, block_size=BS):
    return Sequence(list(tokens), SamplingParams(temperature=0), block_size)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does once a step has computed every token's K/V."""
    seq.num_computed_tokens = len(seq)
    bm.register_computed(seq)


def assert_no_writes_into_shared_blocks(bm: BlockManager, seq: Sequence) -> None:
    """Every block that still receives K/V (positions >= num_computed_tokens) is private."""
    first = seq.num_computed_tokens // bm.block_size
    for block_id in seq.block_table[first:]:
        assert bm.blocks[block_id].ref_count == 1, (block_id, seq.block_table)


def test_allocate_and_deallocate_ref_counts():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))  # 3 blocks: 4 + 4 + 2
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert bm.num_free_blocks == 5
    assert seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    table = list(seq.block_table)
    bm.deallocate(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert all(bm.blocks[b].ref_count == 0 for b in table)
    assert bm.num_free_blocks == 8


def test_shared_prefix_block_ref_count():
    bm = BlockManager(8, BS)
    a = make_seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(list(range(8)) + [99, 98])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[x].ref_count for x in a.block_table[:2]] == [2, 2]
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    bm.deallocate(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]
    # only a's private last block went back to the free list
    assert bm.num_free_blocks == 8 - len(b.block_table)
    bm.deallocate(b)
    assert bm.num_free_blocks == 8


def test_no_hit_before_kv_is_computed():
    bm = BlockManager(8, BS)
    a = make_seq(range(9))
    bm.allocate(a)
    assert bm.hash_to_block_id == {}  # allocated, not computed: nothing to share yet
    b = make_seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    # a chunk that computed 1.5 blocks registers only the one full block
    a.num_computed_tokens = 6
    bm.register_computed(a)
    assert list(bm.hash_to_block_id.values()) == [a.block_table[0]]
    c = make_seq(range(9))
    bm.allocate(c)
    assert c.block_table[0] == a.block_table[0] and c.num_cached_tokens == BS


def test_chained_hash_needs_same_prefix():
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.allocate(a)
    compute_all(bm, a)
    # same second block [5..8], different first block: the chained hash differs, no hit
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0])
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(a.block_table).isdisjoint(b.block_table)
    # same first block, different second block: only the first hits
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 0, 0])
    bm.allocate(c)
    assert c.num_cached_tokens == BS
    assert c.block_table[0] == a.block_table[0] and c.block_table[1] != a.block_table[1]


@pytest.mark.parametrize("num_blocks_in_prompt", [1, 2, 3])
def test_exact_multiple_never_takes_last_block_from_cache(num_blocks_in_prompt):
    n = num_blocks_in_prompt * BS
    bm = BlockManager(16, BS)
    a = make_seq(range(n))
    bm.allocate(a)
    compute_all(bm, a)
    assert len(bm.hash_to_block_id) == num_blocks_in_prompt  # every block is cached
    b = make_seq(range(n))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == n - BS  # at most len - 1 tokens, whole blocks: one block less
    assert b.num_computed_tokens <= len(b) - 1
    assert b.block_table[:-1] == a.block_table[:-1]
    assert b.block_table[-1] != a.block_table[-1]
    assert_no_writes_into_shared_blocks(bm, b)
    # one token more than a whole number of blocks: every full block may hit
    c = make_seq(list(range(n)) + [7])
    bm.allocate(c)
    assert c.num_cached_tokens == n
    assert_no_writes_into_shared_blocks(bm, c)


def test_freed_blocks_keep_hash_and_are_reused():
    bm = BlockManager(8, BS)
    a = make_seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    table = list(a.block_table)
    bm.deallocate(a)
    assert bm.num_free_blocks == 8
    assert all(bm.blocks[b].hash != -1 for b in table[:2])  # still cached
    b = make_seq(range(9))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == table[:2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert b.last_hash == bm.blocks[table[1]].hash and b.num_hashed_blocks == 2
    assert bm.num_free_blocks == 8 - 3
    assert_no_writes_into_shared_blocks(bm, b)


def test_eviction_is_least_recently_freed_first_and_drops_stale_hash():
    bm = BlockManager(4, BS)
    a = make_seq(range(8))  # blocks [a0, a1]
    b = make_seq(range(100, 108))  # blocks [b0, b1]
    bm.allocate(a)
    bm.allocate(b)
    compute_all(bm, a)
    compute_all(bm, b)
    a_table, b_table = list(a.block_table), list(b.block_table)
    bm.deallocate(a)  # a's tail first, so a prefix outlives its own continuation
    bm.deallocate(b)
    assert list(bm.free_block_ids) == a_table[::-1] + b_table[::-1]
    a1_hash = bm.blocks[a_table[1]].hash
    assert bm.hash_to_block_id[a1_hash] == a_table[1]

    c = make_seq([50, 51, 52])  # one new block: evicts the least recently freed, a1
    bm.allocate(c)
    assert c.block_table == [a_table[1]]
    assert a1_hash not in bm.hash_to_block_id
    assert bm.blocks[a_table[1]].hash == -1
    assert list(bm.free_block_ids) == [a_table[0], b_table[1], b_table[0]]
    # a's first block still hits; its one new block evicts the next in line, b1
    again_a = make_seq(list(range(4)) + [0])
    bm.allocate(again_a)
    assert again_a.num_cached_tokens == BS
    assert again_a.block_table == [a_table[0], b_table[1]]
    assert bm.blocks[b_table[1]].hash == -1
    bm.deallocate(again_a)
    bm.deallocate(c)
    # b0 was never handed out: it is still cached; b1 is gone
    again_b = make_seq(list(range(100, 108)) + [0])
    bm.allocate(again_b)
    assert again_b.num_cached_tokens == BS and again_b.block_table[0] == b_table[0]


def test_can_allocate_counts_free_cached_blocks():
    bm = BlockManager(3, BS)
    a = make_seq(range(9))  # 3 blocks: the whole cache
    bm.allocate(a)
    compute_all(bm, a)
    assert not bm.can_allocate(make_seq(range(1)))  # nothing free
    bm.deallocate(a)
    # 3 blocks needed, 2 of them cached but free: they still take a place in the free list
    b = make_seq(range(9))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert bm.num_free_blocks == 0

    # while a holds the shared prefix, a sharer needs only its private blocks
    bm2 = BlockManager(4, BS)
    a = make_seq(range(9))
    bm2.allocate(a)
    compute_all(bm2, a)
    assert bm2.num_free_blocks == 1
    shares = make_seq(list(range(8)) + [5])  # 2 shared + 1 new
    assert bm2.can_allocate(shares)
    fresh = make_seq(range(200, 209))  # 3 new
    assert not bm2.can_allocate(fresh)


def test_can_allocate_when_cached_hits_are_the_free_blocks():
    bm = BlockManager(4, BS)
    a = make_seq(range(9))  # blocks 0, 1, 2; 0 and 1 are full and get hashed
    bm.allocate(a)
    compute_all(bm, a)
    bm.deallocate(a)  # free list: 3, 2, 1, 0
    filler = make_seq([300])
    bm.allocate(filler)  # takes 3
    bm.allocate(make_seq([301]))  # takes 2 (a's unhashed partial block)
    assert list(bm.free_block_ids) == [1, 0]
    b = make_seq(range(9))
    # two cached hits, but they ARE the two free blocks: b needs 3 and only 2 are free
    assert len(bm._cached_prefix(b)) == 2
    assert not bm.can_allocate(b)
    bm.deallocate(filler)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3] and b.num_cached_tokens == 8
    assert bm.num_free_blocks == 0


def test_can_append_and_append():
    bm = BlockManager(2, BS)
    seq = make_seq(range(4))  # exactly one block
    bm.allocate(seq)
    assert bm.can_append(seq)  # nothing new needed yet
    bm.append(seq)
    assert len(seq.block_table) == 1
    seq.token_ids.append(9)  # a sampled token spills into a second block
    assert bm.can_append(seq)
    bm.append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 0
    assert bm.blocks[seq.block_table[1]].ref_count == 1
    seq.token_ids.extend([1, 2, 3])  # 8 tokens still fit in 2 blocks
    assert bm.can_append(seq)
    seq.token_ids.append(4)  # the ninth needs a third block: none left
    assert not bm.can_append(seq)


def test_decode_blocks_get_registered():
    bm = BlockManager(8, BS)
    seq = make_seq(range(3))
    bm.allocate(seq)
    compute_all(bm, seq)
    assert bm.hash_to_block_id == {}  # no full block yet
    seq.token_ids.append(3)  # 4 tokens: block full, but the last token is not computed
    bm.append(seq)
    bm.register_computed(seq)
    assert bm.hash_to_block_id == {}
    compute_all(bm, seq)  # the decode step computed it
    assert list(bm.hash_to_block_id.values()) == [seq.block_table[0]]


def test_disabled_prefix_caching():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    bm.allocate(a)
    compute_all(bm, a)
    assert bm.hash_to_block_id == {}
    assert all(bm.blocks[b].hash == -1 for b in a.block_table)
    b = make_seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)
    bm.deallocate(a)
    c = make_seq(range(9))
    bm.allocate(c)
    assert c.num_cached_tokens == 0
