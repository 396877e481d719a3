import torch
from torch import nn

_MIN_TEMPERATURE = 1e-5


class Sampler(nn.Module):
    """Per-row greedy (temperature 0), temperature, top-k (<= 0: off) and top-p sampling.

    logits [num_seqs, vocab]; temperatures/top_ps float [num_seqs]; top_ks int [num_seqs].
    """

    def forward(self, logits, temperatures, top_ks, top_ps, generator=None) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        is_greedy = temperatures <= 0
        if bool(is_greedy.all()):
            return greedy
        # A tiny positive temperature would overflow logits / t to inf (NaN probabilities):
        # clamp it, which keeps such rows (near-)greedy.
        t = temperatures.clamp(min=_MIN_TEMPERATURE)
        scaled = logits / torch.where(is_greedy, 1.0, t).unsqueeze(1)
        sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
        drop = (top_ks.unsqueeze(1) > 0) & (rank >= top_ks.unsqueeze(1))
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # top-p keeps the smallest prefix whose mass reaches p (the first token always stays)
        drop |= (probs.cumsum(-1) - probs) >= top_ps.unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Sampling by argmax(p / E) with E ~ Exp(1) is exact and needs no host sync.
        noise = torch.empty_like(probs).exponential_(generator=generator)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        sampled = sorted_ids.gather(1, choice).squeeze(1)
        return torch.where(is_greedy, greedy, sampled)
