"""Stop strings (``SamplingParams.stop``): after each sampled token, decode a short tail of the
output, not the whole of it, and look for a stop string that the new token completed."""

from __future__ import annotations

from nanovllm.engine.sequence import Sequence


class StopStringChecker:
    """``checker(seq)`` is the stop string that ``seq``'s last token completed, or None."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def __call__(self, seq: Sequence) -> str | None:
        stops = seq.params.stop
        if not stops or seq.num_completion_tokens < max(1, seq.params.min_tokens):
            return None
        # A token decodes to at least one byte and a character has at most four: 4 tokens per
        # character of the longest stop string (+4 for a partial character at the window's start)
        # always hold an occurrence that ends in the last token.
        window = 4 * max(len(s) for s in stops) + 4
        start = max(seq.num_prompt_tokens, len(seq) - window)
        text = self._decode(seq.token_ids[start:])
        before = len(self._decode(seq.token_ids[start:-1]))
        for s in stops:
            # only an occurrence that ends in the new token's text (an earlier one was ignored
            # for min_tokens, or would have stopped the sequence already)
            if text.find(s, max(0, before - len(s) + 1)) >= 0:
                return s
        return None

    def truncate(self, seq: Sequence, text: str) -> str:
        """The output text of a sequence that ``seq.stop_reason`` ended: up to the stop string
        (through it with ``include_stop_str_in_output``)."""
        s = seq.stop_reason
        i = text.rfind(s) if s else -1
        if i < 0:
            return text
        return text[: i + len(s)] if seq.params.include_stop_str_in_output else text[:i]
