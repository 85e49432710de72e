"""A resumed run's model is the one its checkpoint records, unless the command line names another.

An imported, upcycled or trained model's checkpoint holds its whole composed config. Without
this, every resume had to restate the model (`hydra.searchpath=[...] model=imported
gate=imported`) or fail on the default model's shapes. Naming a model or gate choice
(`model=...`, `gate=...`) keeps the command line's; single keys (`model.experts_impl=triton`,
`gate.aux_loss_coef=0.02`) apply on top of the recorded model. A run resumed from its own
training checkpoint (not a weights-only model folder, whose config names no real data) also keeps
its data unless `data=...` or a `data.*` key is given: a resume that silently fell back to the
default data trained a BPE model on bytes.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

RECORDED_GROUPS = ("model", "gate")


def _key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def names_its_own(args: list[str], group: str) -> bool:
    """Does the command line choose a config of `group` (`model=tiny`), not just set one of its keys?"""
    return any(_key(a) == group for a in args if "=" in a)


def recorded_config(resume, run_dir: str | Path) -> tuple[dict, Path, bool] | None:
    """The composed config of the checkpoint `resume` names (auto: this run dir's latest), if it records
    one, with the checkpoint and whether it is weights-only (a model folder: its data means nothing)."""
    if resume is None:
        return None
    from . import checkpoint as ckpt

    where = Path(run_dir) if resume == "auto" else Path(str(resume)).expanduser()
    found = ckpt.find_checkpoint(where)
    if found is None:
        return None
    meta = ckpt.read_meta(found)
    config = meta.get("config")
    return (config, found, bool(meta.get("weights_only"))) if isinstance(config, dict) else None


def adopt_recorded_model(cfg: DictConfig, args: list[str], run_dir: str | Path) -> str | None:
    """Replace cfg.model / cfg.gate by the resumed checkpoint's (see the module docstring); what was done, in words."""
    recorded = recorded_config(cfg.get("resume"), run_dir)
    if recorded is None:
        return None
    config, found, weights_only = recorded
    data_named = any(_key(a) == "data" or _key(a).startswith("data.") for a in args if "=" in a)
    groups = [g for g in RECORDED_GROUPS if not names_its_own(args, g)] + (
        [] if weights_only or data_named else ["data"]
    )
    taken = []
    for group in groups:
        node = config.get(group)
        if not isinstance(node, dict) or OmegaConf.to_container(cfg[group], resolve=True) == node:
            continue
        dotted = {_key(a): OmegaConf.select(cfg, _key(a)) for a in args if "=" in a and _key(a).startswith(group + ".")}
        with open_dict(cfg):
            cfg[group] = node
            for key, value in dotted.items():  # the command line's single keys win over the recorded ones
                OmegaConf.update(cfg, key, value, force_add=True)
        taken.append(group)
    if not taken:
        return None
    return f"resume: {' and '.join(taken)} as recorded in {found} (name {'/'.join(f'{g}=...' for g in taken)} to use another)"
