"""Loading another test file as a module, so tests reuse its fakes and cases instead of copies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parent


def load_test_module(relative_path: str) -> ModuleType:
    """The test file ``tests/<relative_path>`` as a module (loaded once per process)."""
    name = "_test_helpers_" + relative_path.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
