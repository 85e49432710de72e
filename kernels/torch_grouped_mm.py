"""Baseline: the expert MLP through `torch._grouped_mm` with groups padded to 16 rows.

cuBLAS's grouped GEMM wants every group to start on a 16-row boundary, so rows are
copied into a padded buffer (no host sync: the padded size is bounded by A + 16*E) and
picked back out after the down projection. Autograd comes from torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ALIGN = 16


def available() -> bool:
    return hasattr(torch, "_grouped_mm")


def padded_rows(counts_E: Tensor, num_rows: int) -> tuple[Tensor, Tensor, int]:
    """Destination row of each grouped row in the padded buffer, the padded group ends (int32), buffer size."""
    E = counts_E.shape[0]
    counts = counts_E.to(torch.int64)
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    pend = torch.cumsum(padded, 0)
    shift_E = (pend - padded) - (torch.cumsum(counts, 0) - counts)
    expert_A = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=num_rows)
    dest_A = torch.arange(num_rows, device=counts.device) + shift_E[expert_A]
    return dest_A, pend.to(torch.int32), num_rows + ALIGN * E


def grouped_mm_mlp(x_AD: Tensor, w1_EDF: Tensor, w3_EDF: Tensor | None, w2_EFD: Tensor, counts_E: Tensor) -> Tensor:
    A, D = x_AD.shape
    dest_A, offs_E, size = padded_rows(counts_E, A)
    x_PD = x_AD.new_zeros(size, D).index_copy(0, dest_A, x_AD)
    h_PF = torch._grouped_mm(x_PD, w1_EDF, offs=offs_E)
    if w3_EDF is not None:
        g_PF = F.silu(h_PF) * torch._grouped_mm(x_PD, w3_EDF, offs=offs_E)
    else:
        g_PF = F.gelu(h_PF, approximate="tanh")
    y_PD = torch._grouped_mm(g_PF, w2_EFD, offs=offs_E)
    return y_PD[dest_A]
