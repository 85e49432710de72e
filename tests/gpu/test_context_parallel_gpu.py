"""Context parallelism's attention on the GPU: the same blockwise path as on the CPU, in bf16, against
full causal attention computed in float64 (emulated CP ranks: the collective is the only part left out)."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from moeflow.parallel.context_parallel import attend_blocks, shard_positions, shard_sequence, unshard_sequence  # noqa: E402

BF16_TOL = 2e-2  # bf16 inputs and products (8 bits of mantissa) against a float64 reference, values of order 1


@pytest.mark.parametrize("cp, heads, kv_heads, seq", [(2, 8, 8, 2048), (4, 8, 2, 4096)])
def test_blockwise_attention_on_cuda_in_bf16_equals_full_attention(cp, heads, kv_heads, seq):
    gen = torch.Generator(device="cuda").manual_seed(cp)
    B, d = 2, 64
    q, k, v = (
        torch.randn(B, h, seq, d, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (heads, kv_heads, kv_heads)
    )
    g = torch.randn(B, heads, seq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    full = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, enable_gqa=kv_heads != heads)
    ref = torch.autograd.grad((full * g.double()).sum(), (q64, k64, v64))

    pos = [shard_positions(seq, r, cp, "cuda") for r in range(cp)]
    blocks = [(shard_sequence(k, r, cp, 2), shard_sequence(v, r, cp, 2), pos[r]) for r in range(cp)]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as the engine's forward runs
        outs = [attend_blocks(shard_sequence(q, r, cp, 2), pos[r], blocks) for r in range(cp)]
    out = unshard_sequence(outs, dim=2)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    assert (out.double() - full).abs().max().item() < BF16_TOL
    for a, b in zip(got, ref):
        assert (a.double() - b).abs().max().item() < BF16_TOL * max(1.0, b.abs().max().item())
