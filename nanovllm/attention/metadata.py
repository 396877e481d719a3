"""Per-step attention metadata. It travels with the batch (or micro-batch), never in a global."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class AttentionMetadata:
    """Everything the attention backends need for one forward pass.

    Shapes (``num_tokens`` = tokens in this pass, ``num_seqs`` = sequences):

    - ``slot_mapping``: [num_tokens] int32, flat KV-cache slot (block * block_size + offset) each
      new token's K/V is written to; -1 skips the write (CUDA-graph padding rows).
    - prefill: ``cu_seqlens_q`` / ``cu_seqlens_k``: [num_seqs + 1] int32 prefix sums of the query
      lengths and of the key lengths (cached prefix + new tokens). Query j of sequence i sits at
      absolute position ``len_k - len_q + j`` and attends causally to keys ``[0, that position]``.
      ``block_tables`` is None when no sequence has a cached prefix: keys are then exactly the new
      tokens' ``k``/``v``; otherwise every key is read from the paged cache.
    - decode: one query token per sequence; ``context_lens``: [num_seqs] int32 keys per sequence
      (the new token included, 0 for padding rows); ``block_tables``: [num_seqs, max_blocks] int32
      (-1 padded).
    - mixed (a prefill step that also decodes): ``decode`` is the metadata of its first
      ``num_decode_tokens`` tokens, one per decoding sequence; the prefill fields above describe
      the tokens after them; ``slot_mapping`` covers every token of the step.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    decode: AttentionMetadata | None = None

    @property
    def num_decode_tokens(self) -> int:
        """Tokens at the start of a mixed step that decode (0 for any other step)."""
        return 0 if self.decode is None else self.decode.context_lens.shape[0]

    def decode_slice(self, start: int, end: int) -> AttentionMetadata:
        """The metadata of decode rows [start, end): a micro-batch's view, sharing storage."""
        assert not self.is_prefill, "only decode metadata can be sliced by rows"
        return replace(
            self,
            slot_mapping=self.slot_mapping[start:end],
            context_lens=self.context_lens[start:end],
            block_tables=self.block_tables[start:end],
        )
