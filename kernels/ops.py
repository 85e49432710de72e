"""The thin autograd layer over the grouped-GEMM kernels, registered as torch custom ops.

`expert_mlp(x, w1, w3, w2, counts_E)` computes all experts on rows grouped by expert.
`expert_mlp_routed(x_TD, w1, w3, w2, counts_E, token_A, weight_A)` does the same on
unpermuted tokens: rows are copied into expert order once (the backward needs them in that
order too), each expert's group padded with zero rows to a multiple of `ROW_ALIGN` when
groups are large (`aligned_layout`: the weight gradients then read both operands through TMA,
unmasked), and the outputs, times their gate weight, are scattered by the last GEMM's stores
into token order and summed per token (`moeflow.moe.routing.combine`'s semantics), so the
routed copy of the outputs is never materialised. (The kernels can also gather rows inside their loads;
on the H100 the copy + TMA loads is faster: bench/RESULTS.md.) The backward's un-permute sum
runs on a second CUDA stream beside the last weight-gradient GEMM.

Forward and backward are the custom ops `moeflow::experts_fwd` / `moeflow::experts_bwd`
(with fake implementations, so torch.compile traces them as opaque nodes); a traced backward
uses `moeflow::experts_bwd_fresh`, the same computation into new buffers.
`ExpertMLPFunction` (a torch.autograd.Function) ties them together.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import gemm, permute
from .autotune import ROW_ALIGN

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)


def _copies_rows(token_A: Tensor | None, gather_rows: bool) -> bool:
    """Whether routed rows are copied into expert order (x_AD, dy_AD) rather than gathered in the loads."""
    return token_A is not None and not gather_rows


def _copy_rows(src: Tensor, tok_offsets: Tensor, expert_row_A: Tensor, token_A: Tensor, counts_E: Tensor) -> Tensor:
    """src's token rows fanned out into expert order; with more rows than assignments (an aligned
    layout) its pad rows are zeroed."""
    pads = (token_A, counts_E) if token_A.shape[0] > expert_row_A.shape[0] else None
    return permute.fan_out(src, tok_offsets, expert_row_A, token_A.shape[0], pads)


# MOEFLOW_OVERLAP=0 runs the backward's segment sum in line instead of on a second CUDA stream (A/B timing)
OVERLAP = os.environ.get("MOEFLOW_OVERLAP", "1") != "0"
_SIDE_STREAMS: dict = {}


def _nothing():
    pass


class SideStream:
    """Run the block's kernels on a second CUDA stream, concurrently with the kernels launched after it,
    until `join()`: a memory-bound kernel then fills the SMs a GEMM's tail leaves idle (and shares
    bandwidth the GEMM barely uses). `src` (read on the side stream) is kept alive until that work is
    done. Elsewhere (CPU, MOEFLOW_OVERLAP=0) the block runs in line and `join` does nothing."""

    def __init__(self, src: Tensor):
        self.src = src
        self.stream = None
        if OVERLAP and src.is_cuda:
            if src.device not in _SIDE_STREAMS:  # one per device, made once
                _SIDE_STREAMS[src.device] = torch.cuda.Stream(src.device)
            self.stream = _SIDE_STREAMS[src.device]
            self.main = torch.cuda.current_stream(src.device)

    def __enter__(self):
        if self.stream is not None:
            self.stream.wait_stream(self.main)  # the inputs are ready
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self._ctx.__exit__(*exc)
            self.src.record_stream(self.stream)  # its memory is not reused before the side stream is done
        self.src = None
        return False

    def join(self):
        if self.stream is not None:
            self.main.wait_stream(self.stream)


@torch.library.custom_op("moeflow::experts_fwd", mutates_args=())
def experts_fwd(
    x: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    counts_E: Tensor,
    token_A: Tensor | None,
    weight_A: Tensor | None,
    pos_A: Tensor | None,
    tok_offsets: Tensor | None,
    expert_row_A: Tensor | None,
    num_rows: int,
    save: bool,
    gather_rows: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, h1, h3, x_AD (all but y empty unless `save`; h3 empty for GELU; x_AD empty if not copied).

    Routed rows are copied into expert order (x_AD = x[token_A], zeros where token_A < 0: the
    pad rows of `aligned_layout`; written by fanning each token row out to its rows `expert_row_A`,
    so each is read once) unless `gather_rows`: the up GEMM and the backward's weight
    gradient then read contiguous rows through TMA, faster than gathering them inside the GEMMs'
    loads by more than the copy costs (bench/RESULTS.md), at A x D more saved activations.
    `gather_rows` gathers inside the loads instead.
    """
    copy = _copies_rows(token_A, gather_rows)
    x_AD = _copy_rows(x, tok_offsets, expert_row_A, token_A, counts_E) if copy else x
    A = num_rows if token_A is None else token_A.shape[0]
    g, h1, h3 = gemm.up(x_AD, token_A if gather_rows else None, w1, w3, counts_E, A, store_h=save)
    if token_A is None:
        y = gemm.down(g, w2, counts_E)
    else:
        y_sorted = gemm.down(g, w2, counts_E, scale_A=weight_A, scatter_A=pos_A)  # token-sorted rows
        y = permute.segsum(y_sorted, tok_offsets, tok_offsets.shape[0] - 1)

    def empty():  # one per output: custom ops may not return aliases of each other
        return x.new_empty(0)

    return (
        y,
        (h1 if save else empty()),
        (h3 if save and w3 is not None else empty()),
        (x_AD if save and copy else empty()),
    )


@experts_fwd.register_fake
def _(x, w1, w3, w2, counts_E, token_A, weight_A, pos_A, tok_offsets, expert_row_A, num_rows, save, gather_rows):
    A = num_rows if token_A is None else token_A.shape[0]
    rows_out = num_rows if token_A is None else tok_offsets.shape[0] - 1
    F = w1.shape[2]
    h1 = x.new_empty(A, F) if save else x.new_empty(0)
    h3 = x.new_empty(A, F) if save and w3 is not None else x.new_empty(0)
    x_AD = x.new_empty(A, x.shape[1]) if save and _copies_rows(token_A, gather_rows) else x.new_empty(0)
    return x.new_empty(rows_out, w2.shape[2]), h1, h3, x_AD


def _experts_bwd(
    dy: Tensor,
    x_AD: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    counts_E: Tensor,
    token_A: Tensor | None,
    weight_A: Tensor | None,
    pos_A: Tensor | None,
    tok_offsets: Tensor | None,
    expert_row_A: Tensor | None,
    h1: Tensor,
    h3: Tensor,
    gather_rows: bool,
    aligned: bool,
    in_place: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dw1, dw3 (empty for GELU), dw2, dweight_A (empty when unrouted).

    x_AD: the rows in expert order, or with `gather_rows` the token rows (read through token_A).
    `aligned`: the rows follow `aligned_layout` (groups padded with zero rows).
    `in_place`: h1/h3 are overwritten by dh1/dh3 (peak memory). Order chosen so transient buffers die early.
    """
    swiglu = w3 is not None
    copy = _copies_rows(token_A, gather_rows)
    gather = token_A if gather_rows else None
    # dy rows in expert order, as x_AD (contiguous rows are read through TMA; dropped after dW2)
    dy_AD = _copy_rows(dy, tok_offsets, expert_row_A, token_A, counts_E) if copy else dy.contiguous()
    # g comes back already multiplied by the gate weight, so dW2[e] = (weight * g)^T @ dy[token]
    dh1, dh3, g, dweight = gemm.down_bwd(
        dy_AD, gather, w2, h1, h3 if swiglu else None, weight_A, counts_E, swiglu, in_place=in_place
    )
    dw2, _ = gemm.wgrad(g, None, dy_AD, None, gather, None, counts_E, aligned=aligned)
    del g, dy_AD
    join_segsum = _nothing
    if token_A is None:
        dx = gemm.grad_input(dh1, w1, dh3 if swiglu else None, w3, counts_E)
    else:
        dx_sorted = gemm.grad_input(dh1, w1, dh3 if swiglu else None, w3, counts_E, scatter_A=pos_A)
        dx = dx_sorted.new_empty(tok_offsets.shape[0] - 1, dx_sorted.shape[1])
        with SideStream(dx_sorted) as side:  # memory-bound: runs beside the dW1/dW3 GEMM
            permute.segsum(dx_sorted, tok_offsets, dx.shape[0], out=dx)
        join_segsum = side.join
        del dx_sorted
    # dW1[e], dW3[e] = x_AD[rows of e]^T @ dh1, dh3
    dw1, dw3 = gemm.wgrad(x_AD, gather, dh1, dh3 if swiglu else None, None, None, counts_E, aligned=aligned)
    join_segsum()
    dweight = dweight.to(weight_A.dtype) if weight_A is not None else x_AD.new_empty(0, dtype=torch.float32)
    return dx, dw1, (dw3 if swiglu else x_AD.new_empty(0)), dw2, dweight


def _define_backward(name: str, in_place: bool, doc: str):
    """One custom op over `_experts_bwd`; the two differ only in whether dh1/dh3 overwrite h1/h3."""

    def backward_op(
        dy: Tensor,
        x_AD: Tensor,
        w1: Tensor,
        w3: Tensor | None,
        w2: Tensor,
        counts_E: Tensor,
        token_A: Tensor | None,
        weight_A: Tensor | None,
        pos_A: Tensor | None,
        tok_offsets: Tensor | None,
        expert_row_A: Tensor | None,
        h1: Tensor,
        h3: Tensor,
        gather_rows: bool,
        aligned: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _experts_bwd(
            dy, x_AD, w1, w3, w2, counts_E, token_A, weight_A, pos_A, tok_offsets, expert_row_A, h1, h3,
            gather_rows, aligned, in_place,
        )  # fmt: skip

    backward_op.__doc__ = doc
    return torch.library.custom_op(name, mutates_args=("h1", "h3") if in_place else ())(backward_op)


experts_bwd = _define_backward(
    "moeflow::experts_bwd",
    in_place=True,
    doc="The eager backward: dh1/dh3 overwrite the saved h1/h3 (the autograd layer forbids a second backward).",
)
experts_bwd_fresh = _define_backward(
    "moeflow::experts_bwd_fresh",
    in_place=False,
    doc="""The compiled backward: dh1/dh3 in new buffers. A compiled graph may not write into its saved
    tensors, so Inductor copied h1 and h3 before the in-place op (two A x F copies per layer, 1.5 ms a
    step at the OLMoE-like bench shape; measured -2.0 ms a step on one H100, bench/RESULTS.md). The peak
    is that of those copies: h1, h3, dh1 and dh3 live together while the op runs (eager, in place, holds
    2 x A x F less).""",
)


@experts_bwd.register_fake
@experts_bwd_fresh.register_fake
def _(
    dy, x_AD, w1, w3, w2, counts_E, token_A, weight_A, pos_A, tok_offsets, expert_row_A, h1, h3, gather_rows, aligned
):
    dweight = torch.empty_like(weight_A) if weight_A is not None else x_AD.new_empty(0, dtype=torch.float32)
    dx = x_AD.new_empty(tok_offsets.shape[0] - 1 if token_A is not None else x_AD.shape[0], w1.shape[1])
    return (
        dx,
        torch.empty_like(w1),
        torch.empty_like(w3) if w3 is not None else x_AD.new_empty(0),
        torch.empty_like(w2),
        dweight,
    )


class ExpertMLPFunction(torch.autograd.Function):
    """Autograd over the custom ops. Integer routing tensors carry no gradient."""

    @staticmethod
    def forward(
        ctx,
        x,
        w1,
        w3,
        w2,
        counts_E,
        token_A,
        weight_A,
        pos_A,
        tok_offsets,
        expert_row_A,
        num_rows,
        gather_rows,
        aligned,
    ):
        save = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 6))
        y, h1, h3, x_AD = torch.ops.moeflow.experts_fwd(
            x, w1, w3, w2, counts_E, token_A, weight_A, pos_A, tok_offsets, expert_row_A, num_rows, save, gather_rows
        )
        # the backward reads x in expert order: the copy when one was made, else x itself
        ctx.save_for_backward(
            x_AD if _copies_rows(token_A, gather_rows) else x,
            w1,
            w3,
            w2,
            counts_E,
            token_A,
            weight_A,
            pos_A,
            tok_offsets,
            expert_row_A,
            h1,
            h3,
        )
        ctx.gather_rows, ctx.aligned = gather_rows, aligned
        return y

    @staticmethod
    def backward(ctx, dy):
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "moeflow experts: a second backward through the same forward is not supported "
                "(saved activations are reused in place); recompute the forward instead"
            )
        ctx.consumed = True
        x_AD, w1, w3, w2, counts_E, token_A, weight_A, pos_A, tok_offsets, expert_row_A, h1, h3 = ctx.saved_tensors
        # compiled: the op that writes new buffers (a traced in-place write into saved tensors costs two copies)
        backward_op = (
            torch.ops.moeflow.experts_bwd_fresh if torch.compiler.is_compiling() else torch.ops.moeflow.experts_bwd
        )
        dx, dw1, dw3, dw2, dweight = backward_op(
            dy,
            x_AD,
            w1,
            w3,
            w2,
            counts_E,
            token_A,
            weight_A,
            pos_A,
            tok_offsets,
            expert_row_A,
            h1,
            h3,
            ctx.gather_rows,
            ctx.aligned,
        )
        return (
            dx,
            dw1,
            dw3 if w3 is not None else None,
            dw2,
            None,
            None,
            dweight if weight_A is not None else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------- checks
class UnsupportedInput(ValueError):
    """The Triton path cannot compute this input; callers fall back to the reference path."""


def triton_usable(device: torch.device) -> str | None:
    """None if the kernels can run on `device`, else why not (one line)."""
    if device.type == "cpu":
        return (
            None
            if os.environ.get("TRITON_INTERPRET") == "1"
            else "tensors are on the CPU (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        )
    if device.type != "cuda":
        return f"device {device} is not supported by the Triton kernels"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.x < 8.0 (bf16 tensor cores needed)"
    return None


def check_inputs(x: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor, counts_E: Tensor) -> None:
    """Raise UnsupportedInput (one line, naming the fix) for anything the kernels must not see."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedInput(f"dtype {x.dtype} is not supported (bf16/fp16 only; enable autocast or cast the model)")
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if w is not None and w.dtype != x.dtype:
            raise UnsupportedInput(f"{name} has dtype {w.dtype} but x has {x.dtype}")
        if w is not None and w.device != x.device:
            raise UnsupportedInput(f"{name} is on {w.device} but x is on {x.device}")
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise UnsupportedInput(
            f"expected x 2-D and weights 3-D, got x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )
    E, D, F = w1.shape
    if x.shape[1] != D or tuple(w2.shape) != (E, F, D) or (w3 is not None and w3.shape != w1.shape):
        raise UnsupportedInput(f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if w3 is not None and w3.stride() != w1.stride():
        raise UnsupportedInput("w1 and w3 must have the same strides")
    if counts_E.dim() != 1 or counts_E.shape[0] != E:
        raise UnsupportedInput(f"counts_E must have shape ({E},), got {tuple(counts_E.shape)}")
    if x.stride(1) != 1:
        raise UnsupportedInput("x must have unit stride along its last dim (call .contiguous())")


def expert_mlp(x_AD: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor, counts_E: Tensor) -> Tensor:
    """All experts on rows grouped by expert (counts_E rows each, in order)."""
    check_inputs(x_AD, w1, w3, w2, counts_E)
    return ExpertMLPFunction.apply(
        x_AD, w1, w3, w2, counts_E.to(torch.int32), None, None, None, None, None, x_AD.shape[0], False, False
    )


def routing_layout(token_A: Tensor, num_tokens: int, token_order_A: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """pos_A (row of each assignment in token-sorted order) and per-token row offsets (T+1).

    `token_order_A`: each row's index in a token-sorted order the caller already has (the
    routing's own order for top-k gates); saves a sort.
    """
    if token_order_A is not None:
        pos_A = token_order_A
    else:
        order = torch.argsort(token_A, stable=True)
        pos_A = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    offsets = torch.zeros(num_tokens + 1, dtype=torch.int32, device=token_A.device)
    # rows per token without torch.bincount, whose CUDA version syncs with the host
    per_token = torch.zeros(num_tokens, dtype=torch.int32, device=token_A.device).scatter_add_(
        0, token_A.long(), torch.ones_like(token_A, dtype=torch.int32)
    )
    offsets[1:] = torch.cumsum(per_token, 0)
    return pos_A.to(torch.int32), offsets


class _AlignedLayout(torch.autograd.Function):
    """`permute.aligned_layout` with the gate weights' gradient: weight_P[dest_A[a]] = weight_A[a]."""

    @staticmethod
    def forward(ctx, weight_A, counts_E, token_A, pos_A, align):
        counts_P, token_P, pos_P, weight_P, dest_A, expert_row_A = permute.aligned_layout(
            counts_E, token_A, pos_A, weight_A, align
        )
        ctx.save_for_backward(dest_A)
        ctx.mark_non_differentiable(counts_P, token_P, pos_P, expert_row_A)
        return counts_P, token_P, weight_P, pos_P, expert_row_A

    @staticmethod
    def backward(ctx, _counts, _token, grad_weight_P, _pos, _rows):
        (dest_A,) = ctx.saved_tensors
        return grad_weight_P.index_select(0, dest_A), None, None, None, None


def aligned_layout(counts_E: Tensor, token_A: Tensor, weight_A: Tensor, pos_A: Tensor, align: int = ROW_ALIGN):
    """The routed rows with each expert's group padded to a multiple of `align` rows (one kernel).

    Returns counts_P, token_P (-1 on pad rows), weight_P (0 on pad rows; differentiable in
    weight_A), pos_P (-1 on pad rows) and expert_row_A (the padded row of each assignment in
    token-sorted order: `permute.fan_out`'s destinations). P = A + (align - 1) * min(E, A) rows (at most
    that many groups are non-empty), a bound known without a host sync; rows past the last group
    are pad rows too.
    """
    return _AlignedLayout.apply(weight_A, counts_E, token_A, pos_A, align)


# Pad to the aligned layout when experts average at least this many rows: the pad rows (about
# ROW_ALIGN / 2 per expert) then cost little. Small batches spread over many experts (4 rows per
# expert would become 64) keep the unpadded copy, whose weight gradients mask one operand.
ALIGN_FROM_ROWS_PER_EXPERT = 4 * ROW_ALIGN


def expert_mlp_routed(
    x_TD: Tensor,
    w1: Tensor,
    w3: Tensor | None,
    w2: Tensor,
    counts_E: Tensor,
    token_A: Tensor,
    weight_A: Tensor,
    token_order_A: Tensor | None = None,
    gather_rows: bool = False,
) -> Tensor:
    """y_TD[t] = sum over assignments a of t: weight_A[a] * MLP_{e(a)}(x_TD[t]), grouped by expert.

    `token_order_A` (optional): a token-sorted position of each row (see `routing_layout`).
    `gather_rows`: read x and dy rows through token_A inside the GEMMs instead of copying them
    into expert order: A x D fewer saved activations, slower on the H100 (bench/RESULTS.md).
    Otherwise rows are copied, into `aligned_layout` when the experts average at least
    ALIGN_FROM_ROWS_PER_EXPERT rows.
    """
    check_inputs(x_TD, w1, w3, w2, counts_E)
    if token_A.dim() != 1 or weight_A.shape != token_A.shape:
        raise UnsupportedInput(
            f"token_A {tuple(token_A.shape)} and weight_A {tuple(weight_A.shape)} must be 1-D and equal"
        )
    if token_order_A is not None and token_order_A.shape != token_A.shape:
        raise UnsupportedInput(f"token_order_A {tuple(token_order_A.shape)} must match token_A {tuple(token_A.shape)}")
    pos_A, offsets = routing_layout(token_A, x_TD.shape[0], token_order_A)
    if gather_rows or token_A.shape[0] < ALIGN_FROM_ROWS_PER_EXPERT * counts_E.shape[0]:
        A = token_A.shape[0]
        expert_row_A = (
            None
            if gather_rows
            else torch.empty_like(pos_A).scatter_(
                0, pos_A.long(), torch.arange(A, dtype=torch.int32, device=pos_A.device)
            )
        )
        return ExpertMLPFunction.apply(
            x_TD,
            w1,
            w3,
            w2,
            counts_E.to(torch.int32),
            token_A.to(torch.int32),
            weight_A,
            pos_A,
            offsets,
            expert_row_A,
            x_TD.shape[0],
            gather_rows,
            False,
        )
    counts_P, token_P, weight_P, pos_P, expert_row_A = aligned_layout(counts_E, token_A, weight_A, pos_A)
    return ExpertMLPFunction.apply(
        x_TD, w1, w3, w2, counts_P, token_P, weight_P, pos_P, offsets, expert_row_A, x_TD.shape[0], False, True
    )
