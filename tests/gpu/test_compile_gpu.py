"""trainer.compile on a real GPU: the whole model or each block compiled (trainer.compile_scope) takes
the same first steps as eager (bf16 tolerance), and says how long its first step took."""

import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="needs Triton")

from helpers.config import compose_cfg  # noqa: E402
from moeflow.launch.config import validate  # noqa: E402
from moeflow.launch.engines.torch_engine import TorchEngine  # noqa: E402

SHAPE = [
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.d_ff=512",
    "model.num_experts=8",
    "model.top_k=2",
    "model.max_seq_len=256",
    "data.seq_len=256",
    "data.batch_size=8",
    "experts.impl=triton",
    "trainer.progress=false",
]


def _three_steps(tmp_path, *overrides):
    cfg = compose_cfg(*SHAPE, *overrides)
    model_cfg, trainer_cfg = validate(cfg)
    env, device = TorchEngine.start(cfg, trainer_cfg)
    torch.manual_seed(trainer_cfg.seed)  # as train.py does: the same initial weights in every run
    engine = TorchEngine(cfg, model_cfg, trainer_cfg, env, device, tmp_path)
    if trainer_cfg.compile:  # compiled the way the scope says
        blocks = list(engine.model.blocks)
        compiled = [b._compiled_call_impl is not None for b in blocks]
        assert compiled == [trainer_cfg.compile_scope == "blocks"] * len(blocks)
        assert (engine.fwd is engine.model) == (trainer_cfg.compile_scope == "blocks")
    gen = torch.Generator(device="cuda").manual_seed(0)
    out, first = [], None
    for _ in range(3):
        tokens = torch.randint(0, model_cfg.vocab_size, (8, 257), device="cuda", generator=gen)
        t = time.perf_counter()
        loss, _ = engine.forward_backward(tokens[:, :-1], tokens[:, 1:], last=True)
        norm = engine.optimizer_step()
        out.append((loss.item(), norm.item()))
        first = first if first is not None else time.perf_counter() - t
    return out, first


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_steps_follow_eager(tmp_path, scope):
    eager, eager_first = _three_steps(tmp_path / "eager")
    torch._dynamo.reset()
    compiled, first = _three_steps(tmp_path / scope, "trainer.compile=true", f"trainer.compile_scope={scope}")
    print(f"first step: eager {eager_first:.1f} s, compiled ({scope}) {first:.1f} s")
    for (le, ne), (lc, nc) in zip(eager, compiled):
        assert lc == pytest.approx(le, rel=1e-2) and nc == pytest.approx(ne, rel=3e-2)
