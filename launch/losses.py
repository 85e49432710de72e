"""The language-model loss every engine trains and evaluates with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats per token (float32 logits)."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
