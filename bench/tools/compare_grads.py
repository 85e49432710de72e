"""One training step of an LM config with experts.impl=triton and =torch (bf16 autocast), and torch in
fp32: relative gradient error of each bf16 path against the fp32 one (which bf16 path is closer?).

    python bench/tools/compare_grads.py configs/model/small.yaml [batch] [seq]
"""

import copy
import sys

import torch
import yaml

from moeflow.moe.model import ModelConfig, Transformer


def main(path, batch=8, seq=512):
    cfg = yaml.safe_load(open(path))
    cfg["gate"] = {"name": "topk"}
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**cfg)).cuda()
    x = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda")
    y = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda")
    grads = {}
    for name, impl, bf16 in (("fp32", "torch", False), ("triton", "triton", True), ("torch", "torch", True)):
        m = copy.deepcopy(model)
        for layer in m.moe_layers():
            layer.experts.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(m(x).float().flatten(0, 1), y.flatten()) + m.aux_loss()
        loss.backward()
        grads[name] = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
        print(
            f"{name}: loss {loss.item():.5f} grad norm {torch.stack([g.norm() for g in grads[name].values()]).norm():.5f}"
        )
    print("param | rel err triton-bf16 vs fp32 | rel err torch-bf16 vs fp32")
    for n, g in grads["fp32"].items():
        if "experts" in n or "gate" in n or n.startswith("blocks.0.") or n == "lm_head.weight":
            e = [((grads[k][n] - g).norm() / g.norm()).item() for k in ("triton", "torch")]
            print(f"{n} | {e[0]:.4f} | {e[1]:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
