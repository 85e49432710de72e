"""The model's shape and options as one dataclass, checked without importing torch.

`ModelConfig` is what a checkpoint's meta.json stores and what `model=` configs fill; its
`validate()` runs at construction, so a config that cannot build a model fails in one line
(the gate's own options are checked when the gate is built). Importing this module is
cheap: the gate registry (and torch) load only when a config is validated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import need

ACTIVATIONS = ("swiglu", "gelu")
ROPE_TYPES = ("default", "linear", "llama3")
QK_NORM_SCOPES = ("head", "proj")


def shape_field(default):
    """A ModelConfig field that changes parameter shapes: a checkpoint resumes only into a run with the same value."""
    return field(default=default, metadata={"shape": True})


@dataclass
class ModelConfig:
    vocab_size: int = shape_field(256)
    d_model: int = shape_field(128)
    n_layers: int = shape_field(4)
    n_heads: int = shape_field(4)
    max_seq_len: int = 256
    d_ff: int = shape_field(256)  # hidden size of each routed expert
    dense_d_ff: int | None = shape_field(None)  # hidden size of dense FFNs and shared experts (default: d_ff * top_k)
    num_experts: int = shape_field(8)
    top_k: int = 2
    moe_every: int = shape_field(1)  # block i is MoE when (i + 1) % moe_every == 0; 0 makes a dense model
    shared_experts: int = shape_field(0)
    shared_d_ff: int | None = shape_field(
        None
    )  # hidden size of the shared expert (default: dense_d_ff * shared_experts)
    shared_expert_gate: bool = shape_field(False)  # scale the shared expert by a per-token sigmoid gate (Qwen2-MoE)
    activation: str = shape_field("swiglu")
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Hugging Face style: {"rope_type": "linear" | "llama3", "factor": ..., ...}
    n_kv_heads: int | None = shape_field(None)  # grouped-query attention (default: n_heads)
    head_dim: int | None = shape_field(None)  # size of one attention head (default: d_model // n_heads)
    attn_bias: bool = shape_field(False)  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = shape_field(False)  # RMSNorm of q and k before rotary (Qwen3, OLMoE)
    qk_norm_scope: str = shape_field(
        "head"
    )  # head: over each head (Qwen3); proj: over the whole q / k projection (OLMoE)
    norm_eps: float = 1e-5
    tie_embeddings: bool = shape_field(False)
    init_std: float = 0.02
    gate: dict = field(default_factory=lambda: {"name": "topk"})
    experts_impl: str = "torch"
    experts_gather_rows: bool = False  # Triton path: gather routed rows in the GEMM loads (less memory, slower)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Reject impossible shapes with a message that names the fix."""

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff", "num_experts", "top_k"):
            need(
                is_int(getattr(self, name)) and getattr(self, name) > 0,
                f"model.{name} must be a positive integer, got {getattr(self, name)!r}",
            )
        for name in ("dense_d_ff", "shared_d_ff", "n_kv_heads", "head_dim"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v > 0), f"model.{name} must be a positive integer or null, got {v!r}")
        for name in ("moe_every", "shared_experts"):
            need(is_int(getattr(self, name)), f"model.{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("attn_bias", "qk_norm", "shared_expert_gate", "tie_embeddings", "experts_gather_rows"):
            need(
                isinstance(getattr(self, name), bool),
                f"model.{name} must be true or false, got {getattr(self, name)!r}",
            )
        for name, low in (("rope_theta", 0.0), ("norm_eps", 0.0), ("init_std", 0.0)):
            v = getattr(self, name)
            need(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > low,
                f"model.{name} must be a number > {max(low, 0):g}, got {v!r}",
            )
        if self.head_dim is None:
            need(
                self.d_model % self.n_heads == 0,
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; pick n_heads that divides d_model",
            )
        need(
            self.head_size > 0 and self.head_size % 2 == 0,
            f"head size {self.head_size} must be even (and positive) for rotary embeddings; change model.head_dim or model.n_heads",
        )
        kv = self.kv_heads
        need(
            isinstance(kv, int) and kv > 0 and self.n_heads % kv == 0,
            f"model.n_kv_heads={self.n_kv_heads} must be a positive divisor of model.n_heads={self.n_heads}",
        )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        need(
            rope_type in ROPE_TYPES,
            f"model.rope_scaling rope_type={rope_type!r} is not supported; choose one of {', '.join(ROPE_TYPES)} (or null)",
        )
        need(
            self.top_k <= self.num_experts,
            f"model.top_k={self.top_k} is larger than model.num_experts={self.num_experts}; set top_k <= num_experts",
        )
        need(self.moe_every >= 0, f"model.moe_every must be >= 0 (0 = dense model), got {self.moe_every}")
        need(
            self.moe_every <= self.n_layers,
            f"model.moe_every={self.moe_every} with model.n_layers={self.n_layers} leaves no MoE block; "
            f"use a value <= n_layers (or 0 for a dense model)",
        )
        need(self.shared_experts >= 0, f"model.shared_experts must be >= 0, got {self.shared_experts}")
        need(
            self.qk_norm_scope in QK_NORM_SCOPES,
            f"model.qk_norm_scope={self.qk_norm_scope!r} is unknown; choose one of {', '.join(QK_NORM_SCOPES)}",
        )
        need(
            not self.shared_expert_gate or self.shared_experts > 0,
            "model.shared_expert_gate=true needs a shared expert; set model.shared_experts=1 or drop the gate",
        )
        need(
            self.activation in ACTIVATIONS,
            f"model.activation={self.activation!r} is unknown; choose one of {', '.join(ACTIVATIONS)}",
        )
        from .gates import GATES  # the registry (imports torch: only once a config is being checked)

        gate_name = self.gate.get("name") if isinstance(self.gate, dict) else None
        need(gate_name in GATES, f"gate={gate_name!r} is unknown; known gates: {', '.join(sorted(GATES))}")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared expert (0: none)."""
        if not self.shared_experts:
            return 0
        return (
            self.shared_d_ff
            if self.shared_d_ff is not None
            else (self.dense_d_ff or self.d_ff * self.top_k) * self.shared_experts
        )

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def shape_keys(cls) -> dict:
        """The fields marked `shape_field`, with their defaults (for configs saved before a field existed)."""
        return {f.name: f.default for f in fields(cls) if f.metadata.get("shape")}
