"""moeflow.moe: the MoE layer (gate -> dispatcher -> experts) and a transformer LM built on it.

The names below load on first use (PEP 562), so `moeflow.moe.errors` and `moeflow.moe.config`
import without torch: the CLI checks a command line before paying for the heavy imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DispatchPlan": "routing",
    "LocalDispatcher": "dispatch",
    "combine": "routing",
    "plan_dispatch": "routing",
    "MLP": "experts",
    "SharedExpert": "experts",
    "GroupedExperts": "experts",
    "expert_mlp": "experts",
    "GATES": "gates",
    "Gate": "gates",
    "RouterOutput": "routing",
    "build_gate": "gates",
    "register_gate": "gates",
    "MoELayer": "layer",
    "moe_layers": "layer",
    "moe_aux_loss": "layer",
    "ModelConfig": "config",
    "Transformer": "model",
    "UpcycleOptions": "upcycle",
    "upcycle_model": "upcycle",
    "upcycle_transformer": "upcycle",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
