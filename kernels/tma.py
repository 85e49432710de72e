"""Hopper's tensor-memory accelerator (TMA): host tensor descriptors for contiguous operands.

Contiguous operands (expert weights, rows already in expert order) are read through TMA
where the GPU has one (Hopper or newer; also under the interpreter); row-gathered ones and
other GPUs use pointer loads. `MOEFLOW_TMA=0` forces pointer loads everywhere (for A/B
timing; results are bit-identical). A descriptor's box is a placeholder until the autotune
candidate's `pre_hook` (`box_hook`) sets it from its tile shape.
"""

from __future__ import annotations

import os

import torch

from .autotune import INTERPRET

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

USE_TMA = os.environ.get("MOEFLOW_TMA", "1") != "0"


def box_hook(**boxes):
    """A pre_hook setting each named descriptor's box from the tile sizes: name=(dim names)."""

    def hook(nargs):
        for name, dims in boxes.items():
            desc = nargs[name]
            if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
                if callable(dims):
                    dims = dims(nargs)
                desc.block_shape = [nargs[d] for d in dims]

    return hook


def _b_box(nargs):
    return ("BLOCK_N", "BLOCK_K") if nargs["B_TRANS"] else ("BLOCK_K", "BLOCK_N")


UP_BOXES = box_hook(x_desc=("BLOCK_M", "BLOCK_K"), w1_desc=("BLOCK_K", "BLOCK_N"), w3_desc=("BLOCK_K", "BLOCK_N"))
GMM_BOXES = box_hook(a1_desc=("BLOCK_M", "BLOCK_K"), a2_desc=("BLOCK_M", "BLOCK_K"), b1_desc=_b_box, b2_desc=_b_box)
WGRAD_BOXES = box_hook(a_desc=("BLOCK_K", "BLOCK_M"), b1_desc=("BLOCK_K", "BLOCK_N"), b2_desc=("BLOCK_K", "BLOCK_N"))


def tma_device(t: torch.Tensor) -> bool:
    """Whether kernels on t's device may read it through TMA: Hopper or newer, or the interpreter."""
    if not USE_TMA or TensorDescriptor is None:
        return False
    if t.device.type == "cuda":
        return torch.cuda.get_device_capability(t.device)[0] >= 9
    return INTERPRET


def aligned_strides(t: torch.Tensor, *strides: int) -> bool:
    """TMA's rules: a 16-byte aligned base and 16-byte multiples for every stride but the last (1)."""
    return t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in strides)


def rows_desc(t: torch.Tensor | None):
    """TMA descriptor over a (rows, cols) activation matrix, or None when TMA cannot read it.

    The box shape is a placeholder: each autotune candidate sets its own (`box_hook`).
    """
    if (
        t is None
        or t.dim() != 2
        or t.shape[0] == 0
        or t.stride(1) != 1
        or not aligned_strides(t, t.stride(0))
        or not tma_device(t)
    ):
        return None
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [16, 16])


def weight_desc(w: torch.Tensor | None):
    """TMA descriptor over (E, R, C) expert weights read as one (E * R, C) matrix, or None."""
    if (
        w is None
        or w.stride(2) != 1
        or w.stride(0) != w.shape[1] * w.stride(1)
        or not aligned_strides(w, w.stride(1))
        or not tma_device(w)
    ):
        return None
    return TensorDescriptor(w, [w.shape[0] * w.shape[1], w.shape[2]], [w.stride(1), 1], [16, 16])


def desc_pair(make, t1, t2):
    """Descriptors for t1 and t2 (t1's again when t2 is None), or None unless TMA can read both:
    a kernel reads its operand pair through TMA or through pointers, never one of each."""
    d1 = make(t1)
    d2 = make(t2) if t2 is not None else d1
    return (d1, d2) if d1 is not None and d2 is not None else None
