"""Token sampling from the last hidden states' logits, per-row parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Per-row noise seeds in [0, 2**31) (-1: the engine's generator), None when no row has one.
    row_seeds: list[int] | None = None
    # (row, token ids) whose logits are masked to -inf before sampling (min_tokens).
    banned: list[tuple[int, list[int]]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        temperatures: list[float],
        top_ks: list[int],
        top_ps: list[float],
        device: torch.device,
        row_seeds: list[int] | None = None,
        banned: list[tuple[int, list[int]]] | None = None,
    ) -> SamplingTensors:
        sampled = [i for i, t in enumerate(temperatures) if t > 0]
        if row_seeds is not None and all(s < 0 for s in row_seeds):
            row_seeds = None
        return cls(
            temperatures=to_device(temperatures, torch.float32, device),
            top_ks=to_device(top_ks, torch.int64, device),
            top_ps=to_device(top_ps, torch.float32, device),
            all_greedy=not sampled,
            any_filter=any(top_ks[i] > 0 or top_ps[i] < 1.0 for i in sampled),
            row_seeds=row_seeds,
            banned=[(r, ids) for r, ids in banned or [] if ids],
        )


def row_seed(seed: int, step: int) -> int:
    """The noise seed of a request with ``SamplingParams.seed`` for its ``step``-th token: a
    function of the two alone, so batching never changes the request's draws."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)
    h ^= h >> 31
    return (h * 0x94D049BB133111EB % (1 << 64)) >> 33  # in [0, 2**31)


def ban_tokens(logits: torch.Tensor, banned: list[tuple[int, list[int]]]) -> torch.Tensor:
    """A copy of ``logits`` with the given (row, token ids) set to -inf; the logits themselves
    when nothing is banned."""
    vocab = logits.shape[1]
    pairs = [(r, t) for r, ids in banned for t in ids if 0 <= t < vocab]
    if not pairs:
        return logits
    rows, cols = zip(*pairs)
    out = logits.clone()
    out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = -torch.inf
    return out


def top_logprobs(
    logits: torch.Tensor, sampled: torch.Tensor, requests: list[tuple[int, int]]
) -> list[dict[int, float]]:
    """For each (row, n): token id -> log-probability of the raw distribution
    (``log_softmax(logits)``) for the sampled token and the n most likely ones."""
    if not requests:
        return []
    rows = torch.tensor([r for r, _ in requests], device=logits.device)
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    k = min(max(n for _, n in requests), logprobs.shape[1])
    top_vals, top_ids = logprobs.topk(k, dim=-1)
    chosen = sampled[rows]
    chosen_vals = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    top_ids, top_vals = top_ids.tolist(), top_vals.tolist()
    out = []
    for j, (token, value) in enumerate(zip(chosen.tolist(), chosen_vals.tolist())):
        n = requests[j][1]
        entry = {token: value}
        entry.update(zip(top_ids[j][:n], top_vals[j][:n]))
        out.append(entry)
    return out


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
        logits = ban_tokens(logits, params.banned)
        if not params.all_greedy and not params.any_filter and self._use_fused(logits):
            from nanovllm.kernels.triton_sampling import gumbel_argmax

            base = generator.initial_seed() if generator is not None else 0
            seed = (base * 1_000_003 + self._fused_calls) % (2**31 - 1)
            self._fused_calls += 1
            seeds = params.row_seeds
            if seeds is not None:
                seeds = to_device(seeds, torch.int64, logits.device)
            return gumbel_argmax(logits.contiguous(), params.temperatures, seed, seeds)
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
            noise = _exponential_noise(scaled, params, generator)
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
        noise = _exponential_noise(probs, params, generator)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return sorted_ids.gather(1, choice).squeeze(1)


def _exponential_noise(like: torch.Tensor, params: SamplingTensors, generator) -> torch.Tensor:
    """Exp(1) noise shaped like ``like``; rows with their own seed draw from a generator of
    that seed alone."""
    noise = torch.empty_like(like).exponential_(generator=generator)
    for row, s in enumerate(params.row_seeds or ()):
        if s >= 0:
            g = torch.Generator(like.device).manual_seed(s)
            noise[row].exponential_(generator=g)
    return noise
