"""The engine contract (launch/engines/contract.py): the training loop uses an engine through it alone,
and every engine offers all of it.

- Statically: launch/train.py touches the engine only as `engine.<member>` (and the class as
  `Engine.<member>`) of the contract: no getattr/hasattr duck typing, no engine handed to other code
  that would reach past the contract.
- Every engine class subclasses `contract.Engine` and leaves nothing abstract.
- A two-step run per engine (two micro-batches a step) on 2 gloo ranks on CPU checks each member
  (`helpers.engine_contract_workers`): torch and DeepSpeed (ZeRO-1) in full; megatron-core without
  GPTModel's forward, which needs CUDA (gradients set on the parameters stand in for the backward),
  and in full where a GPU is present.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from helpers import requires
from moeflow.launch.engines import ENGINES, engine_class
from moeflow.launch.engines.contract import MEMBERS, Engine

ROOT = Path(__file__).resolve().parents[2]
REQUIRES = {"torch": [], "deepspeed": [requires.deepspeed], "megatron": [requires.megatron]}


def engine_uses(source: str, instance: str = "engine", cls: str = "Engine") -> tuple[set[str], list[str]]:
    """(attributes of `instance` and `cls` the code reads, uses of them other than an attribute access)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    used, bare = set(), []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id in (instance, cls)):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.value is node:
            used.add(parent.attr)
        elif not isinstance(node.ctx, ast.Store):  # assigning the engine (engine = Engine(...)) is fine
            bare.append(f"line {node.lineno}: {ast.unparse(parent) if parent is not None else node.id}")
    return used, bare


def test_the_loop_touches_only_contract_members():
    used, bare = engine_uses((ROOT / "launch" / "train.py").read_text())
    assert used, "the walk found no engine use in launch/train.py (renamed?)"
    assert used <= MEMBERS, f"launch/train.py uses engine members outside the contract: {sorted(used - MEMBERS)}"
    calls_of_the_class = [u for u in bare if "Engine(" in u]  # the one construction
    assert len(calls_of_the_class) == 1 and set(bare) == set(calls_of_the_class), (
        "launch/train.py hands the engine to other code (or duck-types it with getattr/hasattr): " + "; ".join(bare)
    )


def test_the_static_check_catches_duck_typing():
    src = "def f(engine):\n    getattr(engine, 'writer', None)\n    engine.step()\n    helper(engine)\n"
    used, bare = engine_uses(src)
    assert used == {"step"} and len(bare) == 2


def test_the_contract_members():
    assert MEMBERS == {
        "name",
        "start",
        "model",
        "eval_model",
        "autocast",
        "start_step",
        "data_parallel_rank",
        "data_parallel_group",
        "last_step_skipped",
        "describe",
        "forward_backward",
        "optimizer_step",
        "lr",
        "save",
        "poll_save",
        "finish_save",
        "rollback",
        "extra_result",
        "stage_report",
        "close",
    }


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_engine_class_implements_the_contract(name):
    for mark in REQUIRES[name]:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    cls = engine_class(name)
    assert issubclass(cls, Engine) and cls.name == name
    assert not cls.__abstractmethods__, f"{cls.__name__} leaves {sorted(cls.__abstractmethods__)} abstract"


def _two_steps(tmp_path, name: str, forward: bool, world: int = 2, device: str = "cpu") -> list[dict]:
    from helpers import ep_workers as W
    from helpers.engine_contract_workers import ENGINES as CONFIGS

    assert set(CONFIGS) == set(ENGINES), "every engine needs a conformance config"
    results = W.spawn(
        "helpers.engine_contract_workers:two_steps", world, tmp_path, name, str(tmp_path / "run"), forward, device
    )
    want = MEMBERS if forward else MEMBERS - {"forward_backward"}
    for rank, r in enumerate(results):
        assert set(r["checked"]) == want, (
            f"rank {rank}: contract members the run did not check: {sorted(want - set(r['checked']))}"
        )
        assert len(r["lrs"]) == 2 and all(n is None or n > 0 for n in r["norms"])
    assert results[0]["saved"] is not None
    return results


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torch_engine_runs_two_steps_through_the_contract(tmp_path):
    _two_steps(tmp_path, "torch", forward=True)


@pytest.mark.slow
@pytest.mark.multiprocess
@requires.deepspeed
def test_deepspeed_engine_runs_two_steps_through_the_contract(tmp_path):
    results = _two_steps(tmp_path, "deepspeed", forward=True)
    assert all(n is not None for r in results for n in r["norms"]), (
        "clipping is on (optim.grad_clip): DeepSpeed reports the norm"
    )


@pytest.mark.slow
@pytest.mark.multiprocess
@requires.megatron
def test_megatron_engine_runs_two_steps_through_the_contract(tmp_path):
    """On CPU without the forward (GPTModel's needs CUDA); with a GPU, the whole step."""
    cuda = torch.cuda.is_available()
    _two_steps(tmp_path, "megatron", forward=cuda, world=1 if cuda else 2, device="cuda" if cuda else "cpu")
