"""User-fixable problems are `MoeflowError`s (moe/errors.py), which the CLI prints in one line.

Walks every module of the installed packages with `ast`, as the layering test does, and fails on
a `raise ValueError(...)`, `TypeError(...)`, `RuntimeError(...)` or `KeyError(...)` with a message
outside `ALLOWED`: raise a `MoeflowError` subclass (ConfigError, DataError, CheckpointError,
ConversionError, ...) whose message names the fix instead. A bare class (`raise KeyError`) or a
re-raise passes. `ALLOWED` holds programming errors only (a broken internal invariant or API
contract, which keeps its traceback); keep it short and say why for each entry.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("configs", "kernels", "moe", "parallel", "launch", "slurm")
BUILTINS = {"ValueError", "TypeError", "RuntimeError", "KeyError"}

# (file, enclosing function, exception): matched by name, not line, so edits around them keep the entry.
ALLOWED = {
    # A caller broke the function's contract (tensor shapes, call order); no config, flag or file leads
    # here: the Transformer and the dispatchers pass counts of the right shape and decode one token at a time.
    ("moe/experts.py", "_check_counts", "ValueError"),
    ("moe/model.py", "Attention.forward", "ValueError"),
    # The dispatcher was built for another expert layout than its gate's: `parallelize` builds both from
    # one config, after checking that parallel.ep divides the experts (a ConfigError).
    ("parallel/all_to_all.py", "AllToAllDispatcher.__call__", "ValueError"),
    ("parallel/capacity.py", "CapacityDispatcher.__call__", "ValueError"),
    ("parallel/symm_mem.py", "SymmMemDispatcher.__call__", "ValueError"),
    # kernels/ sits below moe/ (no moe.errors there). The custom op is reached through `topk_indices`,
    # which checks E <= MAX_EXPERTS, from gates that check k <= E at config time; the master-weight
    # optimizer hands the AdamW step a bf16 compute copy (a wrong dtype is its caller's bug).
    ("kernels/topk.py", "topk_indices_triton", "ValueError"),
    ("kernels/adamw.py", "adamw_master_step", "TypeError"),
    # The training loop evaluates a pipelined model through `batch_loss` (`train.evaluate` asks for it);
    # calling it for logits is a caller's bug: the logits exist on the last stage only.
    ("launch/engines/torch_engine.py", "PipelineEval.forward", "RuntimeError"),
    # autograd's convention: torch raises RuntimeError for a second backward through a graph too.
    ("kernels/ops.py", "ExpertMLPFunction.backward", "RuntimeError"),
    # Protocols that name the type: json.dumps' default= hook must raise TypeError; a tensor dtype
    # safetensors cannot name is a wrong-type argument (moeflow's models hold none).
    ("launch/checkpoint.py", "_jsonable", "TypeError"),
    ("parallel/shard_files.py", "write_safetensors", "TypeError"),
    # Internal invariants: parallelize puts each kind of parameter on one mesh; DeepSpeed's marker
    # module is never called; DeepSpeed's group layout is the one moeflow built (private API drift).
    ("launch/optim.py", "optimizer_groups", "RuntimeError"),
    ("launch/engines/deepspeed_groups.py", "_deepspeed_moe_marker.DeepSpeedMoEMarker.forward", "RuntimeError"),
    ("launch/engines/deepspeed_groups.py", "shard_experts_for_deepspeed", "RuntimeError"),
}


def _raises(tree: ast.AST):
    """(enclosing qualified name, exception name, line) of every `raise <builtin>(message)`."""

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                fn = child.exc.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if name in BUILTINS and (child.exc.args or child.exc.keywords):
                    yield ".".join(scope) or "<module>", name, child.lineno
            yield from visit(child, scope)

    yield from visit(tree, [])


def _found() -> dict[tuple[str, str, str], list[int]]:
    out: dict[tuple[str, str, str], list[int]] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            for scope, name, line in _raises(ast.parse(f.read_text(), filename=rel)):
                out.setdefault((rel, scope, name), []).append(line)
    return out


def test_user_facing_errors_are_moeflow_errors():
    bare = sorted(
        f"{f}:{line} ({scope}) raises {name}"
        for (f, scope, name), lines in _found().items()
        if (f, scope, name) not in ALLOWED
        for line in lines
    )
    assert not bare, (
        "raise a MoeflowError subclass from moeflow.moe.errors (ConfigError, DataError, CheckpointError, "
        "ConversionError, ...) with a message that names the fix; for a programming error, add it to ALLOWED "
        "with the reason:\n" + "\n".join(bare)
    )


def test_the_allow_list_names_only_live_raises():
    """An entry whose raise moved or went is removed (or renamed), so the list stays short."""
    stale = sorted(map(str, ALLOWED - set(_found())))
    assert not stale, "ALLOWED entries with no matching raise (update or drop them):\n" + "\n".join(stale)


def test_the_walk_finds_raises():
    """Guard against a walker that finds nothing (and so passes vacuously)."""
    sample = ast.parse("class A:\n    def f(self):\n        raise ValueError('x')\n        raise KeyError\n")
    assert list(_raises(sample)) == [("A.f", "ValueError", 3)]
    assert ("kernels/ops.py", "ExpertMLPFunction.backward", "RuntimeError") in _found()
