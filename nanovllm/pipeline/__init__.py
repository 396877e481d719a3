"""The Attention/FFN decode pipeline on one GPU.

``green`` (GreenContextManager: the two SM partitions and their streams), ``sm_budget``,
``microbatch``, ``step`` (the body of a pipelined step, its buffers and events), ``scheduler``
(PipelineScheduler: the pipelined decoder), ``sequential`` (the whole-GPU step), ``setup`` (what
the strategies run on), ``strategy`` (which strategy the model runner is handed),
``calibration`` and ``policy`` (when to pipeline), ``cache``, ``splits`` (per-bucket SM
splits), ``kernels`` (what each stage runs on its partition), ``stats``, ``report`` and
``trace``. Names are imported lazily: green contexts need cuda-python only when a pipeline is
built.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GreenContextManager": "nanovllm.pipeline.green",
    "PipelineScheduler": "nanovllm.pipeline.scheduler",
    "PipelineOptions": "nanovllm.pipeline.setup",
    "SequentialDecode": "nanovllm.pipeline.sequential",
    "DecodeSetup": "nanovllm.pipeline.setup",
    "make_decode_strategy": "nanovllm.pipeline.strategy",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nanovllm.pipeline' has no attribute {name!r}")
