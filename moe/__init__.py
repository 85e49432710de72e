"""moeflow.moe: the MoE layer (gate -> dispatcher -> experts) and a transformer LM built on it."""
from .dispatch import DispatchPlan, LocalDispatcher, combine, plan_dispatch
from .experts import MLP, GroupedExperts, expert_mlp
from .gates import GATES, Gate, RouterOutput, build_gate, register_gate
from .layer import MoELayer
from .model import ModelConfig, Transformer
from .upcycle import UpcycleOptions, upcycle_model, upcycle_transformer

__all__ = [
    "DispatchPlan", "LocalDispatcher", "combine", "plan_dispatch",
    "MLP", "GroupedExperts", "expert_mlp",
    "GATES", "Gate", "RouterOutput", "build_gate", "register_gate",
    "MoELayer", "ModelConfig", "Transformer",
    "UpcycleOptions", "upcycle_model", "upcycle_transformer",
]
