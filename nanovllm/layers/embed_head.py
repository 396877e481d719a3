import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.distributed import all_reduce, tp_rank, tp_world_size


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; out-of-slice ids give zeros and an
    all-reduce sums the slices."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.num_embeddings = num_embeddings
        self.per_rank = (num_embeddings + self.tp_size - 1) // self.tp_size
        self.vocab_start = self.per_rank * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, name, shard_id=None):
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the model expects "
                f"({self.num_embeddings}, {param.shape[1]}): it does not match config.json"
            )
        part = loaded[self.vocab_start : self.vocab_start + self.per_rank]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mask.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the last token of each sequence; the vocabulary slices are all-gathered (an
    all_gather keeps every rank in the same collective; only rank 0 samples)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, -1)
        return logits[..., : self.num_embeddings]
