"""What an upcycling run is asked to do (`UpcycleOptions`), checked at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import MoeflowError
from ..errors import need as _need

ROUTER_INITS = ("auto", "zero", "normal")


class UpcycleError(MoeflowError):
    """A problem with the model or the options that the user can fix."""


@dataclass
class UpcycleOptions:
    """What `moeflow upcycle` and the Python API accept.

    num_experts: copies of the dense MLP (N); with granularity m the layer has N*m experts.
    top_k: experts per token before granular scaling (the layer uses top_k*m).
    router_init: "zero" (uniform routing: identical experts then get identical gradients and
        never diverge), "normal" (std router_std) or "auto" (small-normal, the default; its rows
        tied across the slices of a copy when granularity > 1; see the module docstring).
    expert_noise: Gaussian noise added to each copy, relative to each weight's std
        (breaks symmetry, so the output is no longer exactly preserved; off by default).
    shared_expert: keep a copy of the dense MLP as an always-on shared expert; it takes
        `shared_fraction` of the output and the routed experts the rest (exact).
    moe_every: every moe_every-th FFN becomes an MoE layer (1: all).
    """

    num_experts: int = 8
    top_k: int = 2
    gate: str = "topk"
    gate_options: dict = field(default_factory=dict)
    router_init: str = "auto"
    router_std: float = 0.02
    expert_noise: float = 0.0
    granularity: int = 1
    shared_expert: bool = False
    shared_fraction: float = 0.5
    moe_every: int = 1
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            _need(cond, msg, UpcycleError)

        need(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            f"num_experts must be a positive integer, got {self.num_experts!r}",
        )
        need(
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
            f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}",
        )
        need(
            isinstance(self.granularity, int) and self.granularity >= 1,
            f"granularity must be a positive integer, got {self.granularity!r}",
        )
        need(
            self.router_init in ROUTER_INITS,
            f"router_init={self.router_init!r} is unknown; choose one of {', '.join(ROUTER_INITS)}",
        )
        need(self.router_std >= 0, f"router_std must be >= 0, got {self.router_std}")
        need(self.expert_noise >= 0, f"expert_noise must be >= 0, got {self.expert_noise}")
        need(0.0 < self.shared_fraction < 1.0, f"shared_fraction must be in (0, 1), got {self.shared_fraction}")
        need(
            isinstance(self.moe_every, int) and self.moe_every >= 1,
            f"moe_every must be a positive integer, got {self.moe_every!r}",
        )

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.granularity

    @property
    def active_experts(self) -> int:
        return self.top_k * self.granularity

    @property
    def resolved_router_init(self) -> str:
        """auto: a random router (Sparse Upcycling's), so copies get different tokens and diverge.
        A zero router ties the logits: every token picks the same experts by index, and identical
        copies see identical gradients forever (8 experts at top-2 trained as 4 distinct pairs)."""
        return "normal" if self.router_init == "auto" else self.router_init

    @property
    def exact(self) -> bool:
        """Whether the upcycled model must reproduce the dense one (what --verify checks).

        Known exact gates: topk with renormalised weights, and dts (at step 0 every expert
        is active and the softmax weights sum to 1). Other gates may drop tokens or weigh
        them otherwise; --verify then reports the difference without failing.
        """
        if self.expert_noise > 0:
            return False
        if self.gate == "dts":
            return True
        if self.gate != "topk" or not self.gate_options.get("renormalize", True):
            return False
        if self.granularity > 1 and self.resolved_router_init == "zero":
            return self.top_k == self.num_experts
        return True

    def to_dict(self) -> dict:
        return asdict(self)
