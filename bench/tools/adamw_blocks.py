"""The fused AdamW step's bandwidth per launch shape (issue 32): BLOCK x num_warps, against a plain copy.

The optimizer phase is memory-bound (master weights + bf16 moments: 20 B/parameter read+written), so
the ceiling is what a torch copy of the same bytes reaches on the same GPU in the same run. Tensors are
the OLMoE-like 4-layer model's big ones (1.8B parameters). Not a product setting until a winner shows.

    python bench/tools/adamw_blocks.py [--moments bfloat16|float32]
"""

from __future__ import annotations

import argparse

import torch

from moeflow.kernels import adamw

SIZES = [64 * 2048 * 2048, 64 * 1024 * 2048] * 4 + [50304 * 2048] * 2  # experts w13, w2 per layer; embed, head


def timed(fn, repeats: int = 5) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_bandwidth(dev) -> float:
    """TB/s of a plain fp32 copy (2^30 elements: 8.6 GB read+written): the ceiling for a streaming kernel."""
    src = torch.empty(2**30, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / 1e9 / timed(lambda: dst.copy_(src))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moments", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    dev, mdt = torch.device("cuda"), getattr(torch, args.moments)
    tensors = []
    for n in SIZES:
        master = torch.randn(n, device=dev)
        tensors.append(
            (
                master,
                master.bfloat16(),
                torch.randn(n, device=dev, dtype=torch.bfloat16) * 1e-3,
                torch.zeros(n, device=dev, dtype=mdt),
                torch.zeros(n, device=dev, dtype=mdt),
            )
        )
    inv_scale = torch.ones((), device=dev)
    params = sum(SIZES)
    per_param = 4 + 4 + 2 + 2 + 2 * 2 * mdt.itemsize
    gb = params * per_param / 1e9

    def step():
        for i, (master, param, grad, m, v) in enumerate(tensors):
            adamw.adamw_master_step(master, param, grad, m, v, inv_scale, 10, 1e-4, 0.9, 0.95, 1e-8, 0.1, seed=i)

    copy_tbs = copy_bandwidth(dev)
    copy_ms = gb / copy_tbs
    print(f"{params / 1e9:.2f}B parameters, {per_param} B/parameter, {gb:.1f} GB a step")
    print(f"a copy streams {copy_tbs:.2f} TB/s: {copy_ms:.2f} ms for a step's bytes")
    for block in (512, 1024, 2048, 4096):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 1:
                continue
            adamw.BLOCK, adamw.NUM_WARPS = block, warps
            ms = timed(step)
            print(
                f"BLOCK={block:5d} num_warps={warps:2d}: {ms:6.2f} ms = {gb / ms:.2f} TB/s, x{copy_ms / ms:.3f} of the copy"
            )


if __name__ == "__main__":
    main()
