"""Autotune candidates for the grouped GEMMs, the shared-memory fit checks, and launch grids.

`MOEFLOW_AUTOTUNE=0` makes every kernel run its first candidate, untuned (no compile of the
others: a faster first step, e.g. for tests; slower steps after). Under Triton's CPU
interpreter (`TRITON_INTERPRET=1`) every kernel gets one small tile.
"""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("MOEFLOW_AUTOTUNE", "1") != "0"


def candidate_configs(shapes, hook=None):
    """Autotune candidates for Hopper; one small config under the CPU interpreter.

    A shape is (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent]). `hook` sets the TMA
    descriptors' box shapes from the candidate's tile shape. Under the interpreter the
    persistent loop is the one exercised (a few programs walk all tiles).
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "PERSISTENT": True}, num_warps=4, num_stages=1, pre_hook=hook)]
    if not AUTOTUNE:
        shapes = shapes[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": bool(p[0]) if p else False},
                          num_warps=w, num_stages=s, pre_hook=hook)
            for bm, bn, bk, w, s, *p in shapes]


def force_tiles(kernel, shape) -> None:
    """Make an autotuned kernel run exactly one (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent])
    candidate, keeping its descriptor-box hook: for tile sweeps and tests of every candidate.
    A single candidate skips the autotuner's prune, so it must fit the kernel's use."""
    kernel.configs = candidate_configs([shape], kernel.configs[0].pre_hook)
    kernel.cache.clear()


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent]): few candidates, each costs a compile on first use
PERSISTENT = True  # persistent: one program per SM walks the tiles
# `up` stays one program per tile: persistent, its two accumulators and three stores ran 15-20%
# slower (bench/RESULTS.md), so it has no persistent candidate.
UP_SHAPES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 6), (64, 128, 64, 4, 4)]
GMM_SHAPES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 6), (256, 128, 64, 8, 4), (128, 128, 64, 8, 4),
               (128, 256, 64, 8, 3, PERSISTENT), (128, 256, 64, 8, 4, PERSISTENT), (128, 256, 32, 8, 6, PERSISTENT)]
# Row-gathered operands (gather_rows) get one shared-memory buffer fewer than num_stages asks
# for (the index load takes a pipeline stage), hence the deeper candidates. Two B operands
# (dW1 + dW3) fit only 128 x 128 tiles (`_fits_one`); one (dW2) runs best at 128 x 256.
WGRAD_SHAPES = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 128, 64, 8, 5), (256, 128, 32, 8, 6),
                 (128, 128, 32, 8, 6), (128, 128, 64, 8, 4, PERSISTENT), (128, 256, 64, 8, 4, PERSISTENT)]
# An aligned layout pads every expert's rows to a multiple of ROW_ALIGN, so that wgrad's row chunks
# (BLOCK_K, which divides it) never cross into the next expert: `wgrad(aligned=True)`.
ROW_ALIGN = 64
assert all(ROW_ALIGN % shape[2] == 0 for shape in WGRAD_SHAPES)


def fits_one(m: int, n: int, k: int, stages: int, two: bool, staged_epilogue: bool = False) -> bool:
    """Pipelined tiles within Hopper's 227 KiB of shared memory, and fp32 accumulators within
    128 x 256 per program (beyond that they spill). `two`: wgrad's two B tiles and two accumulators.
    `staged_epilogue`: a loop that runs the next tile's loads under this tile's stores (persistent
    gmm) stages its epilogue through 32 KiB more (measured from sm_90 compiles)."""
    b_tiles = 2 if two else 1
    smem = (m * k + b_tiles * k * n) * 2 * stages + (32 * 1024 if staged_epilogue else 0)
    return smem <= 226 * 1024 and b_tiles * m * n <= 128 * 256


def _keep_fitting(configs, two: bool, staged):
    keep = [c for c in configs if fits_one(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, two, staged(c))]
    return keep or configs[-1:]


def fits_gmm(configs, named_args, **kwargs):
    """Autotune prune for `gmm` (one B tile per stage: TWO runs two loops in sequence)."""
    return _keep_fitting(configs, False, lambda c: c.kwargs["PERSISTENT"])


def fits_wgrad(configs, named_args, **kwargs):
    """Autotune prune for `wgrad` (TWO: two B tiles per stage)."""
    return _keep_fitting(configs, kwargs.get("TWO", named_args.get("TWO", False)), lambda c: False)


def even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


# ----------------------------------------------------------------------------- launch grids
def e_pow2(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def m_bucket(A: int) -> int:
    """Autotune key for the row count: powers of two, so retuning happens rarely."""
    return triton.next_power_of_2(max(A, 1))


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def grid_for(tiles, device: torch.device):
    """Programs for a launch: one per tile (`tiles(meta)`, an upper bound is fine: extra
    programs find no tile), or at most one per SM for a persistent candidate."""
    sms = num_sms(device)

    def grid(meta):
        n = tiles(meta)
        return (min(n, sms) if meta["PERSISTENT"] else n,)
    return grid


def m_grid(A: int, E: int, N: int, device: torch.device):
    """`up` / `gmm`: (row block, column block) tiles, at most the row blocks of E experts holding A rows."""
    return grid_for(lambda meta: (triton.cdiv(A, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]), device)
