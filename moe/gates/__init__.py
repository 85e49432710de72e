"""Gates (routers): registry and factory. Chosen by config `gate.name`."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..errors import need
from ..routing import RouterOutput
from .base import Gate
from .dts import ActivationDTSGate, DTSGate
from .expert_choice import ExpertChoiceGate
from .hash import HashGate
from .sinkhorn import SelectiveSinkhornGate, SinkhornGate
from .topk import TopKGate

# name -> constructor(d_model, num_experts, top_k, **options)
GATES: dict[str, Callable[..., Gate]] = {
    "topk": TopKGate,
    "expert_choice": ExpertChoiceGate,
    "dts": DTSGate,
    "dts_act": ActivationDTSGate,
    "sinkhorn": SinkhornGate,
    "ssr": SelectiveSinkhornGate,
    "hash": HashGate,
}

_POSITIONAL = ("self", "d_model", "num_experts", "top_k")


def register_gate(name: str, ctor: Callable[..., Gate]) -> None:
    GATES[name] = ctor


def gate_options(name: str) -> set[str]:
    """The keyword options a gate's constructor accepts (for config validation)."""
    params = inspect.signature(GATES[name]).parameters.values()
    return {p.name for p in params if p.name not in _POSITIONAL and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def build_gate(name: str, d_model: int, num_experts: int, top_k: int, **options) -> Gate:
    need(name in GATES, f"unknown gate {name!r}; known gates: {', '.join(sorted(GATES))}")
    unknown = sorted(set(options) - gate_options(name))
    accepted = ", ".join(sorted(gate_options(name))) or "none"
    need(not unknown, f"gate {name!r} has no option(s) {', '.join(unknown)}; its options are: {accepted}")
    return GATES[name](d_model, num_experts, top_k, **options)


__all__ = [
    "Gate",
    "RouterOutput",
    "TopKGate",
    "ExpertChoiceGate",
    "DTSGate",
    "ActivationDTSGate",
    "SinkhornGate",
    "SelectiveSinkhornGate",
    "HashGate",
    "GATES",
    "register_gate",
    "gate_options",
    "build_gate",
]
