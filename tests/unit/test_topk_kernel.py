"""The router's Triton top-k kernel vs torch.topk: on CPU under TRITON_INTERPRET=1, on CUDA when present."""

import pytest
import torch

from helpers.triton_device import DEV  # first: picks the interpreter on a CPU-only machine
from moeflow.kernels.topk import topk_indices, topk_indices_triton  # noqa: E402
from moeflow.moe.gates.common import top_k_indices  # noqa: E402


@pytest.mark.parametrize("T,E,k", [(37, 128, 8), (5, 7, 3), (70, 64, 6), (3, 1000, 2), (9, 16, 16), (1, 1, 1)])
def test_matches_torch_topk(T, E, k):
    scores = torch.randn(T, E, device=DEV)  # continuous: no ties, so the order is unique
    got = topk_indices_triton(scores, k)
    assert got.dtype == torch.int64 and got.shape == (T, k)
    assert torch.equal(got, scores.topk(k, dim=-1).indices)


def test_bf16_and_strided_rows():
    scores = torch.randn(40, 2 * 96, device=DEV, dtype=torch.bfloat16)[:, ::2]  # column stride 2
    got = topk_indices_triton(scores, 5)
    # bf16 scores can tie, so compare the chosen values (ties may pick different experts)
    assert torch.equal(scores.float().gather(1, got), scores.float().topk(5, dim=-1).values)


def test_ties_nan_and_all_minus_inf():
    inf = float("inf")
    nan = float("nan")
    scores = torch.tensor(
        [
            [1.0, 3.0, 3.0, nan, -inf],
            [-inf, -inf, -inf, -inf, -inf],
            [2.0, 2.0, 2.0, 2.0, 2.0],
            [1.0, inf, 3.0, nan, 0.0],
            [nan, 1.0, nan, inf, 2.0],
            [-0.0, 0.0, -1.0, -inf, -2.0],
            [0.0, -0.0, -1.0, -inf, -2.0],
            [1.0, -nan, inf, -inf, 2.0],
        ],
        device=DEV,
    )
    got = topk_indices_triton(scores, 3).cpu().tolist()
    assert got[0] == [3, 1, 2]  # NaN first (as torch.topk), then the tie by lower index
    assert got[1] == [0, 1, 2]  # never a repeated or out-of-range expert
    assert got[2] == [0, 1, 2]
    assert got[3] == [3, 1, 2]  # NaN above +inf, as torch.topk ranks it
    assert got[4] == [0, 2, 3]  # several NaN: lower index first, then +inf
    assert got[5] == [0, 1, 2] and got[6] == [0, 1, 2]  # -0 ties with +0 (lower index first)
    assert got[7] == [1, 2, 4]  # a NaN with the sign bit set ranks first too


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="need 1 <= k <= E"):
        topk_indices_triton(torch.randn(4, 8, device=DEV), 9)


def test_dispatch_falls_back_to_torch_off_the_gpu():
    scores = torch.randn(6, 2048)  # on the CPU, and wider than one program's row
    assert torch.equal(top_k_indices(scores, 4), scores.topk(4, dim=-1).indices)
    assert torch.equal(topk_indices(scores, 4), scores.topk(4, dim=-1).indices)
