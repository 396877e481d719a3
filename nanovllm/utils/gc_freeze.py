"""Keep the garbage collector off the engine's own heap while ``generate`` runs.

The engine's long-lived objects (modules, CUDA graphs, Dynamo and Inductor caches, the block
manager's blocks) sit in the collector's oldest generation. Each oldest-generation pass walks
all of them, stop-the-world, and frees nothing: the step loop's garbage is acyclic and reference
counting frees it. ``frozen_heap()`` moves every object alive when ``generate`` starts into the
permanent generation (``gc.freeze``) and back when it returns (``gc.unfreeze``), so the passes
inside only walk what ``generate`` itself made. vLLM and SGLang freeze once after start-up; this
unfreezes on the way out because an offline process may build and drop several engines, whose
reference cycles must stay collectable.

Left alone where the process already froze objects itself (``gc.get_freeze_count() > 0``) or
with ``NANOVLLM_GC_FREEZE=0``.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[bool]:
    """Yields whether it froze the heap."""
    if os.environ.get("NANOVLLM_GC_FREEZE", "1") == "0" or gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()
