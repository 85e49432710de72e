"""The language-model loss every engine trains and evaluates with."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

FUSED = os.environ.get("MOEFLOW_FUSED_CE", "1") != "0"  # 0: torch's cross-entropy on fp32 logits (A/B timing)


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats per token, in fp32. On a GPU straight from the (bf16)
    logits with `moeflow.kernels.cross_entropy` (no fp32 copy of them); elsewhere torch's on fp32."""
    logits_TV, targets_T = logits_BSV.flatten(0, 1), targets_BS.flatten()
    if FUSED and logits_TV.is_cuda:
        from moeflow.kernels.cross_entropy import cross_entropy_per_token, fused_available

        if fused_available(logits_TV):
            return cross_entropy_per_token(logits_TV, targets_T).mean()
    return F.cross_entropy(logits_TV.float(), targets_T)
