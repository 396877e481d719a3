"""Mixed steps (``LLM(enable_mixed_steps=True)``): one step carries the running decodes first,
then prefill chunks that fill the rest of the token budget, as vLLM's V1 scheduler does.

With the base scheduler a prefill runs as a step of its own, and every running decode waits
behind it. Here a step that admits new requests also advances every decode by a token, and
the prefill rows share its weight reads and GEMMs. A step without prefill work is a pure
decode step (its CUDA graph, async scheduling); one without decodes a pure prefill step. A mixed
step runs eagerly, its attention in two launches: the decode rows through the backend's
paged-decode kernel, the prefill rows through its varlen prefill kernel
(``AttentionBackend.attend``).

Semantics kept from the base scheduler: chunked prefill (the running sequences' unfinished
prefills come before new requests), admission batching and the decodes' block headroom,
prefix caching, preemption by recompute (a step whose decodes preempted admits nothing new:
the blocks just freed are not handed back at once), and nothing is dropped.
"""

from __future__ import annotations

from nanovllm.engine.scheduler import ScheduledBatch, Scheduler


class MixedScheduler(Scheduler):
    def schedule(self) -> ScheduledBatch:
        preemptions = self.num_preemptions
        decode = self._schedule_decode()
        prefill = self._schedule_prefill(
            budget=self.max_num_batched_tokens - len(decode.seqs),
            admit=self.num_preemptions == preemptions,
        )
        if not prefill.seqs:
            return decode
        if not decode.seqs:
            return prefill
        return ScheduledBatch(
            is_prefill=True,
            seqs=decode.seqs + prefill.seqs,
            num_new_tokens=decode.num_new_tokens + prefill.num_new_tokens,
            num_decode_rows=len(decode.seqs),
        )
