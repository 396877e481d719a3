"""Token sampling from the last hidden states' logits, per-row parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.utils.tensors import to_device

_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingTensors:
    """Per-row parameters [num_seqs] on the logits' device, plus what the host already knows
    about them (so the sampler never synchronises to inspect them)."""

    temperatures: torch.Tensor  # float32; <= 0 means greedy
    top_ks: torch.Tensor  # int64; <= 0 means no top-k filter
    top_ps: torch.Tensor  # float32; 1.0 means no top-p filter
    all_greedy: bool
    any_filter: bool  # some sampled row has a top-k or top-p filter

    @classmethod
    def build(
        cls,
        temperatures: list[float],
        top_ks: list[int],
        top_ps: list[float],
        device: torch.device,
    ) -> SamplingTensors:
        sampled = [i for i, t in enumerate(temperatures) if t > 0]
        return cls(
            temperatures=to_device(temperatures, torch.float32, device),
            top_ks=to_device(top_ks, torch.int64, device),
            top_ps=to_device(top_ps, torch.float32, device),
            all_greedy=not sampled,
            any_filter=any(top_ks[i] > 0 or top_ps[i] < 1.0 for i in sampled),
        )


class Sampler(nn.Module):
    """Per-row greedy (temperature 0), temperature, top-k and top-p sampling.

    Without filters a row draws by Gumbel-max over the whole vocabulary (no sort: at a
    152k vocabulary and hundreds of rows a sort costs more than a small model's decode step),
    on CUDA in one fused Triton pass (``nanovllm.kernels.triton_sampling``); with filters it
    sorts once and renormalises the kept prefix.

    ``fused``: None chooses the Triton kernel for CUDA logits when Triton imports; True forces
    it (CPU tensors then need ``TRITON_INTERPRET=1``); False never uses it.
    """

    def __init__(self, fused: bool | None = None):
        super().__init__()
        self.fused = fused
        self._fused_calls = 0  # the kernel's noise is keyed by (generator seed, call count)
        self._has_triton: bool | None = None  # looked up once, on the first candidate call

    def _use_fused(self, logits: torch.Tensor) -> bool:
        if self.fused is False or (self.fused is None and not logits.is_cuda):
            return False
        if self._has_triton is None:
            try:
                import triton  # noqa: F401

                self._has_triton = True
            except ImportError:
                self._has_triton = False
        if self.fused and not self._has_triton:
            raise ImportError("Sampler(fused=True) needs Triton: pip install triton")
        return self._has_triton

    def forward(
        self, logits: torch.Tensor, params: SamplingTensors, generator=None
    ) -> torch.Tensor:
        """logits [num_seqs, vocab] -> token ids [num_seqs] int64."""
        if not params.all_greedy and not params.any_filter and self._use_fused(logits):
            from nanovllm.kernels.triton_sampling import gumbel_argmax

            base = generator.initial_seed() if generator is not None else 0
            seed = (base * 1_000_003 + self._fused_calls) % (2**31 - 1)
            self._fused_calls += 1
            return gumbel_argmax(logits.contiguous(), params.temperatures, seed)
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if params.all_greedy:
            return greedy
        is_greedy = params.temperatures <= 0
        # A tiny positive temperature would overflow logits / t to inf (NaN probabilities):
        # clamp it, which keeps such rows (near-)greedy.
        t = torch.where(is_greedy, 1.0, params.temperatures.clamp(min=_MIN_TEMPERATURE))
        scaled = logits / t.unsqueeze(1)  # a copy: the caller's logits stay as they were
        if params.any_filter:
            sampled = self._sample_filtered(scaled, params, generator)
        else:
            # argmax(l/t - log E), E ~ Exp(1), draws from softmax(l/t) exactly.
            noise = torch.empty_like(scaled).exponential_(generator=generator)
            sampled = scaled.sub_(noise.log_()).argmax(dim=-1)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _sample_filtered(scaled, params: SamplingTensors, generator) -> torch.Tensor:
        sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[1], device=scaled.device).unsqueeze(0)
        top_ks = params.top_ks.unsqueeze(1)
        drop = (top_ks > 0) & (rank >= top_ks)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # top-p keeps the smallest prefix whose mass reaches p (the first token always stays)
        drop |= (probs.cumsum(-1) - probs) >= params.top_ps.unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Sampling by argmax(p / E) with E ~ Exp(1) is exact and needs no host sync.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return sorted_ids.gather(1, choice).squeeze(1)
