"""Package crossings on the route of one engine=torch training step with expert parallelism.

Two gloo ranks on the CPU build the engine (torch, or deepspeed) from the training config (`parallel.ep=2`, a tiny
model, FSDP2 + EP on one mesh), take one step untraced (lazy set-up out of the way), then trace one
`forward_backward` + `optimizer_step` on rank 0 with `sys.setprofile`. A crossing is a call whose
callee lives in one moeflow package (launch, parallel, moe, kernels) and whose nearest moeflow caller
(through torch's module and autograd frames) lives in another. Printed: the distinct crossing edges
(caller function -> callee function), their count, and the crossing calls in all.

    python bench/tools/count_crossings.py [torch|deepspeed]   # moeflow installed; default torch
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PACKAGES = ("launch", "parallel", "moe", "kernels")
OVERRIDES = [
    "parallel.ep=2",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.grad_accum=1",
    "trainer.progress=false",
    "experts.impl=torch",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.max_seq_len=16",
    "model.d_ff=32",
    "model.num_experts=4",
    "data.batch_size=2",
    "data.seq_len=16",
]


def _package_of(code, root: Path) -> str | None:
    try:
        part = Path(code.co_filename).resolve().relative_to(root).parts[0]
    except ValueError:
        return None
    return part if part in PACKAGES else None


def _rank(rank: int, world: int, store: str, out: str, engine_name: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(60))
    from hydra import compose, initialize_config_module

    import moeflow.moe
    from moeflow.launch.config import model_config, trainer_config
    from moeflow.launch.engines import engine_class
    from moeflow.parallel.distributed import DistEnv

    root = Path(moeflow.moe.__file__).resolve().parent.parent
    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        cfg = compose(config_name="train", overrides=[*OVERRIDES, f"engine={engine_name}"])
    mc, tc = model_config(cfg), trainer_config(cfg)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank)
    torch.manual_seed(tc.seed)
    engine = engine_class(engine_name)(cfg, mc, tc, env, torch.device("cpu"), Path(tempfile.mkdtemp()))
    x = torch.randint(0, mc.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))

    def step():
        engine.forward_backward(x, x, last=True)
        engine.optimizer_step()

    step()
    edges: Counter = Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = _package_of(frame.f_code, root)
        if callee is None:
            return
        back, depth = frame.f_back, 0
        while back is not None and depth < 40 and _package_of(back.f_code, root) is None:
            back, depth = back.f_back, depth + 1
        caller = None if back is None else _package_of(back.f_code, root)
        if caller is not None and caller != callee:
            edges[(f"{caller}:{back.f_code.co_name}", f"{callee}:{frame.f_code.co_name}")] += 1

    if rank == 0:
        sys.setprofile(profile)
    step()
    if rank == 0:
        sys.setprofile(None)
        with open(out, "w") as f:
            for (a, b), n in sorted(edges.items()):
                f.write(f"{a} -> {b}  x{n}\n")
            f.write(f"distinct crossings: {len(edges)}\ncrossing calls: {sum(edges.values())}\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "edges.txt")
        engine = sys.argv[1] if len(sys.argv) > 1 else "torch"
        mp.start_processes(_rank, args=(2, str(Path(tmp) / "store"), out, engine), nprocs=2, start_method="spawn")
        print(Path(out).read_text(), end="")


if __name__ == "__main__":
    main()
