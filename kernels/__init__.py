"""moeflow.kernels: Triton kernels for the experts (grouped GEMM with fused permute)."""
