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


def model_yaml(cfg: dict) -> str:
    import yaml  # PyYAML comes with omegaconf

    body = {k: v for k, v in cfg.items() if k not in ("gate", "experts_impl", "experts_gather_rows")}  # not model.* keys
    return "# Written by `moeflow upcycle`: the upcycled MoE's shape (use with model=upcycled).\n" + yaml.safe_dump(body, sort_keys=False)


def gate_yaml(gate: dict) -> str:
    import yaml

    return "# Written by `moeflow upcycle`: the router of the upcycled MoE (use with gate=upcycled).\n" + yaml.safe_dump(gate, sort_keys=False)


def full_gate(opts: UpcycleOptions) -> dict:
    """The gate node with every constructor option spelled out (what the trainer's config holds)."""
    import inspect

    from moeflow.moe.gates import GATES, gate_options as accepted

    if opts.gate not in GATES:
        raise UpcycleError(f"gate {opts.gate!r} is unknown; known gates: {', '.join(sorted(GATES))}")
    params = inspect.signature(GATES[opts.gate]).parameters
    out = {"name": opts.gate}
    for name in sorted(accepted(opts.gate)):
        default = params[name].default
        if name in opts.gate_options:
            out[name] = opts.gate_options[name]
        elif default is not inspect.Parameter.empty and isinstance(default, (int, float, str, bool, type(None))):
            out[name] = default
    if "init_std" in out and "init_std" not in opts.gate_options:
        out["init_std"] = 0.0 if opts.resolved_router_init == "zero" else opts.router_std  # fresh runs of this config
    return out


def train_command(moeflow_dir: Path) -> str:
    d = moeflow_dir.resolve()
    # quoted: `[...]` is a glob to zsh, and the paths may hold spaces
    return shlex.join(["moeflow", "train", f"hydra.searchpath=[file://{d / 'configs'}]", "model=upcycled", "gate=upcycled", f"resume={d}"])


def write_moeflow(folder: Path, moe: Transformer, opts: UpcycleOptions, source: Path) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    cfg = moe.cfg.to_dict()
    (folder / "configs" / "model").mkdir(parents=True)
    (folder / "configs" / "gate").mkdir(parents=True)
    (folder / "configs" / "model" / "upcycled.yaml").write_text(model_yaml(cfg))
    (folder / "configs" / "gate" / "upcycled.yaml").write_text(gate_yaml(cfg["gate"]))
    try:  # the generated configs must compose into a valid `moeflow train` config
        with initialize_config_module(config_module="moeflow.configs", version_base=None):
            train_cfg = compose(config_name="train", overrides=[f"hydra.searchpath=[file://{(folder / 'configs').resolve()}]", "model=upcycled", "gate=upcycled"])
        full = OmegaConf.to_container(train_cfg, resolve=True)
    except Exception as e:  # a generated config that does not compose is a bug: report it plainly
        raise UpcycleError(f"the generated Hydra configs do not compose ({' '.join(str(e).split())[:300]})") from None
    meta = {"model": cfg, "config": full, "weights_only": True, "upcycled_from": str(source), "upcycle": opts.to_dict()}
    ckpt.save_checkpoint(folder, 0, unique_state_dict(moe), None, meta, keep=0)  # weights only: training starts fresh


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
