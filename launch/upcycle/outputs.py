"""What `moeflow upcycle` writes: moeflow checkpoints with their Hydra configs, atomically."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from moeflow.moe.model import Transformer
from moeflow.moe.state import unique_state_dict
from moeflow.moe.upcycle import UpcycleError, UpcycleOptions

from .. import checkpoint as ckpt


def model_yaml(cfg: dict, name: str = "upcycled", tool: str = "moeflow upcycle") -> str:
    import yaml  # PyYAML comes with omegaconf

    body = {
        k: v for k, v in cfg.items() if k not in ("gate", "experts_impl", "experts_gather_rows")
    }  # not model.* keys
    return f"# Written by `{tool}`: the model's shape (use with model={name}).\n" + yaml.safe_dump(
        body, sort_keys=False
    )


def gate_yaml(gate: dict, name: str = "upcycled", tool: str = "moeflow upcycle") -> str:
    import yaml

    return f"# Written by `{tool}`: the model's router (use with gate={name}).\n" + yaml.safe_dump(
        gate, sort_keys=False
    )


def gate_node(gate: str, options: dict) -> dict:
    """The gate node with every constructor option spelled out (what the trainer's config holds)."""
    import inspect

    from moeflow.moe.gates import GATES
    from moeflow.moe.gates import gate_options as accepted

    if gate not in GATES:
        raise UpcycleError(f"gate {gate!r} is unknown; known gates: {', '.join(sorted(GATES))}")
    params = inspect.signature(GATES[gate]).parameters
    out = {"name": gate}
    for name in sorted(accepted(gate)):
        default = params[name].default
        if name in options:
            out[name] = options[name]
        elif default is not inspect.Parameter.empty and isinstance(default, (int, float, str, bool, type(None))):
            out[name] = default
    return out


def full_gate(opts: UpcycleOptions) -> dict:
    """The upcycled gate's node; a fresh run of its config initialises the router as upcycling did."""
    out = gate_node(opts.gate, opts.gate_options)
    if "init_std" in out and "init_std" not in opts.gate_options:
        out["init_std"] = 0.0 if opts.resolved_router_init == "zero" else opts.router_std
    return out


def train_command(moeflow_dir: Path) -> str:
    """The command that continues a written model: a resume takes the model its checkpoint records
    (launch/recorded_model.py), so naming the model is not needed; configs/ offers model=NAME for sweeps."""
    return shlex.join(["moeflow", "train", f"resume={moeflow_dir.resolve()}"])  # quoted: the path may hold spaces


def write_moeflow(folder: Path, moe: Transformer, opts: UpcycleOptions, source: Path) -> None:
    """An upcycled model as a weights-only moeflow checkpoint with `model=upcycled gate=upcycled`."""
    write_model_dir(
        folder, moe, {"upcycled_from": str(source), "upcycle": opts.to_dict()}, "upcycled", "moeflow upcycle"
    )


def write_model_dir(folder: Path, model: Transformer, extra_meta: dict, name: str, tool: str) -> None:
    """A weights-only moeflow checkpoint (step 0, fresh optimizer) plus Hydra configs
    `model=NAME gate=NAME` that compose into a valid `moeflow train` config."""
    meta = {
        "model": model.cfg.to_dict(),
        "config": write_configs(folder, model.cfg, name, tool),
        "weights_only": True,
        **extra_meta,
    }
    ckpt.save_checkpoint(folder, 0, unique_state_dict(model), None, meta, keep=0)  # weights only: training starts fresh


def write_configs(folder: Path, model_cfg, name: str, tool: str) -> dict:
    """configs/{model,gate}/NAME.yaml for a model, checked to compose; the composed train config."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    cfg = model_cfg.to_dict()
    (folder / "configs" / "model").mkdir(parents=True)
    (folder / "configs" / "gate").mkdir(parents=True)
    (folder / "configs" / "model" / f"{name}.yaml").write_text(model_yaml(cfg, name, tool))
    (folder / "configs" / "gate" / f"{name}.yaml").write_text(gate_yaml(cfg["gate"], name, tool))
    try:  # the generated configs must compose into a valid `moeflow train` config
        with initialize_config_module(config_module="moeflow.configs", version_base=None):
            train_cfg = compose(
                config_name="train",
                overrides=[
                    f"hydra.searchpath=[file://{(folder / 'configs').resolve()}]",
                    f"model={name}",
                    f"gate={name}",
                ],
            )
        full = OmegaConf.to_container(train_cfg, resolve=True)
    except Exception as e:  # a generated config that does not compose is a bug: report it plainly
        raise UpcycleError(f"the generated Hydra configs do not compose ({' '.join(str(e).split())[:300]})") from None
    return full


def atomic_output(output: Path, force: bool):
    """A temp folder next to OUTPUT, and a function that moves it into place."""
    if output.exists() and not force:
        raise UpcycleError(f"{output} already exists; choose a new output folder or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-{output.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def commit() -> None:
        old = output.parent / f".old-{output.name}-{os.getpid()}"
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)

    return tmp, commit
