"""Skip marks for optional dependencies, each saying what to install (never a silent module-wide skip)."""

from __future__ import annotations

import importlib.util

import pytest


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


transformers = pytest.mark.skipif(_missing("transformers"), reason="needs transformers: pip install -e '.[hf]'")
deepspeed = pytest.mark.skipif(_missing("deepspeed"), reason="needs DeepSpeed: pip install -e '.[deepspeed]'")
megatron = pytest.mark.skipif(_missing("megatron.core"), reason="needs megatron-core: pip install -e '.[megatron]'")
ray = pytest.mark.skipif(_missing("ray"), reason="needs Ray: pip install -e '.[ray]'")
triton = pytest.mark.skipif(_missing("triton"), reason="needs Triton: pip install -e '.[triton]'")
