import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``: through pinned memory and a non-blocking copy on
    CUDA, so that building a step's inputs never waits for the GPU."""
    pin = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)
