"""The CUDA combine (`moeflow.kernels.combine.gather_sum`) inside each dispatcher, run here under
Triton's CPU interpreter in float32: a full engine=torch step (forward, backward, clip, AdamW)
gives the local dispatcher's loss and gradient norm with every transport's combine replaced."""

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.config import TINY, compose_cfg  # noqa: E402
from helpers.triton_device import DEV  # noqa: F401  (first: picks the interpreter on a CPU-only machine)
from moeflow.kernels.combine import gather_sum  # noqa: E402


def _first_step(tmp_path, dispatcher: str) -> tuple[float, float]:
    from moeflow.launch.config import validate
    from moeflow.launch.engines.torch_engine import TorchEngine

    torch.manual_seed(0)
    cfg = compose_cfg(
        *TINY, f"parallel.dispatcher={dispatcher}", "parallel.capacity_factor=4.0"
    )  # capacity: room for every pair
    model_cfg, trainer_cfg = validate(cfg)
    env, device = TorchEngine.start(cfg, trainer_cfg)
    engine = TorchEngine(cfg, model_cfg, trainer_cfg, env, device, tmp_path)
    tokens = torch.randint(0, model_cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    loss, _ = engine.forward_backward(tokens[:, :-1], tokens[:, 1:], last=True)
    norm = engine.optimizer_step()
    engine.close()
    return loss.item(), norm.item()


@pytest.mark.parametrize("dispatcher", ["capacity", "alltoall"])
def test_kernel_combine_trains_like_the_local_dispatcher(tmp_path, monkeypatch, dispatcher):
    want = _first_step(tmp_path / "local", "local")
    kernel = lambda y_AD, plan: gather_sum(y_AD, plan.weight_A, plan.token_A, plan.num_tokens)  # noqa: E731
    for module in ("moeflow.parallel.capacity", "moeflow.parallel.all_to_all"):
        monkeypatch.setattr(f"{module}.combine", kernel)
    got = _first_step(tmp_path / dispatcher, dispatcher)
    assert got == pytest.approx(want, rel=1e-5), (got, want)
