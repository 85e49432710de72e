"""Where the Triton tests run: the GPU when there is one, else Triton's CPU interpreter.

Import this before anything that imports Triton (it sets TRITON_INTERPRET=1 on a CPU-only machine);
the importing test module is skipped when Triton is missing or cannot run here.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
pytest.importorskip("triton", reason="needs Triton: pip install -e '.[triton]'")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
