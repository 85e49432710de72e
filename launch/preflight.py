"""Check a `moeflow train` command line before Hydra starts the run.

Hydra's own composition errors are multi-line and suggest `+key=` for a misspelled key.
Here the same composition runs first, and any problem becomes one line that names the
fix; then the semantic checks of `config.validate` and the output-dir check run.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moeflow.moe.errors import ConfigError

from . import schema
from .config_groups import check_launcher_keys
from .config_groups import choices_with_keys as _choices_with_keys
from .recorded_model import adopt_recorded_model

# Flags after which Hydra prints something instead of running: let it.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--shell-completion", "-sc"}


def _all_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of a config (values not read: a mandatory `???` one is fine)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict):
            keys += _all_keys(v, full + ".")
    return keys


def _config_groups() -> set[str]:
    """The config groups shipped in the package (model, gate, data, ...)."""
    import importlib.resources

    root = importlib.resources.files("moeflow.configs")
    return {f.name for f in root.iterdir() if f.is_dir() and not f.name.startswith("_")}


def _explain(err: Exception, overrides: list[str]) -> str:
    msg = str(err)
    cause = err.__cause__ or err.__context__
    text = f"{msg} {cause or ''}"
    m = re.search(r"Key '([^']+)' is not in struct", text) or re.search(r"Could not override '([^']+)'", text)
    if m:
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        # the override that names the key exactly, else one that holds it (`model.d_modle` for 'd_modle'):
        # `device=cpu` beside a valid `trainer.device=...` is the unknown one
        key = next((k for k in keys if k == m.group(1)), None) or next((k for k in keys if m.group(1) in k), m.group(1))
        group_names = _config_groups()
        groups = [
            o for o in overrides if "=" in o and o.split("=", 1)[0] in group_names
        ]  # `seed=7` is a key, not a group
        with initialize_config_module(config_module="moeflow.configs", version_base=None):
            composed = compose(config_name="train", overrides=groups)
            known = _all_keys(composed)  # the keys of the chosen groups
        group = key.split(".", 1)[0]
        owners = _choices_with_keys(group).get(key)
        if owners:
            chosen = next((o.split("=", 1)[1] for o in groups if o.split("=", 1)[0] == group), None)
            node = composed.get(group)
            default = node.get("name") if hasattr(node, "get") else None
            mine = sorted(k.split(".", 1)[1] for k in known if k.startswith(group + ".") and k.count(".") == 1)
            where = " and ".join(f"{group}={o}" for o in owners)
            if chosen:  # the user chose this group: its own keys are the fix, not another choice
                return f"'{key}' is not a key of {group}={chosen} (only of {where}); its keys are: {', '.join(mine)}"
            this = f"the default {group}={default}" if default else f"the default {group}"
            return f"'{key}' is a key of {where}, not of {this} (whose keys are: {', '.join(mine)}); choose {group}={owners[0]}"
        close = [k for k in known if k.endswith("." + key)][:1] or difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config key '{key}'{hint}; list the valid keys with `moeflow train --cfg job`"
    if isinstance(err, MissingConfigException):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
        options = re.findall(r"^\t(\S+)$", msg, flags=re.M)
        if m:
            return f"unknown choice '{m.group(2)}' for {m.group(1)}; choose one of: {', '.join(options)}"
    return " ".join(msg.split())


def compose_checked(args: list[str]) -> DictConfig:
    overrides = [a for a in args if not a.startswith("-")]
    try:
        with initialize_config_module(config_module="moeflow.configs", version_base=None):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(_explain(e, overrides)) from None


def check_output_dir(path: str | Path) -> None:
    """The run dir must be creatable and writable before anything starts."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output dir {p} cannot be created: {probe} is a file; choose another hydra.run.dir=...")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output dir {p} is not writable ({probe} denies writes); choose a writable hydra.run.dir=... or run from a writable folder"
        )


def check_resume_path_exists(cfg) -> None:
    """resume=PATH that is not there is the problem to name first (a typo once surfaced as a vocab mismatch
    between the data and the default model that the missing checkpoint left in place)."""
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not Path(str(resume)).expanduser().exists():
        raise ConfigError(
            f"resume={resume} does not exist; pass a run dir or a checkpoints/step_* dir (or resume=auto to continue this run dir)"
        )


def check_resume_has_a_run_dir(cfg, args: list[str]) -> None:
    """resume=auto looks in the run dir; the default one is new for every run, so it would never find anything."""
    import os

    explicit = any(a.startswith("hydra.run.dir=") for a in args) or os.environ.get("MOEFLOW_LAUNCHED") == "1"
    if cfg.get("resume") == "auto" and not explicit and cfg.launcher.name in ("none", "local"):
        raise ConfigError(
            "resume=auto continues the run in hydra.run.dir, but none was given and the default (outputs/<date>/<time>) "
            "is new for every run; pass hydra.run.dir=<the run's dir>, or resume=<a run or checkpoint dir>"
        )


def check_training_config(args: list[str]) -> None:
    """What a `moeflow train` command line must pass before any run starts, for launchers to check
    every job they submit: composition, every value's type and range, the semantic checks. The
    job runs elsewhere: trainer.device=cuda is checked as a name, not against this machine's GPUs."""
    from omegaconf import open_dict

    cfg = compose_checked(args)
    adopt_recorded_model(cfg, args, cfg.hydra.run.dir)
    schema.check(cfg)
    check_launcher_keys(cfg)
    device = str(cfg.trainer.device)
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"trainer.device={device!r} is unknown; use auto, cpu or cuda")
    import torch

    from .config import validate

    if device.startswith("cuda") and not torch.cuda.is_available():
        with open_dict(cfg):
            cfg.trainer.device = "auto"  # the model and options are checked all the same
    validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), schema_checked=True)


# Hydra's own command-line flags; any other "-x"/"--x" is a user reaching for a flag `moeflow train` does not have
_HYDRA_FLAGS = _INFO_FLAGS | {
    "--version", "--package", "-p", "--run", "-r", "--multirun", "-m", "--config-path", "-cp",
    "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun",
}  # fmt: skip
# flags of other tools (and of `moeflow bench train`) that users try on `moeflow train`
_SETTING_OF_FLAG = {
    "--steps": "trainer.steps=N",
    "--device": "trainer.device=cpu|cuda",
    "--batch-size": "data.batch_size=N",
    "--seq-len": "data.seq_len=N",
    "--lr": "optim.lr=X",
    "--compile": "trainer.compile=true",
    "--seed": "trainer.seed=N",
    "--resume": "resume=PATH|auto",
    "--out": "hydra.run.dir=DIR",
}


def refuse_unknown_flags(args: list[str]) -> None:
    """`moeflow train --steps 2` reached Hydra's override parser ("LexerNoViableAltException: 2"):
    settings are key=value overrides, said in one line with the one meant where it is known."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if arg.startswith("-") and flag not in _HYDRA_FLAGS:
            setting = _SETTING_OF_FLAG.get(flag)
            fix = f"use {setting}" if setting else "see `moeflow train --help` for the settings"
            raise ConfigError(f"{flag} is not an option of moeflow train: its settings are key=value overrides; {fix}")


def preflight(args: list[str]) -> None:
    refuse_unknown_flags(args)
    if any(a.split("=")[0] in _INFO_FLAGS for a in args) or any(a in ("-m", "--multirun") for a in args):
        return  # info output, or a sweep (each job is validated when it starts)
    cfg = compose_checked(args)  # Hydra alone: a typo is reported before torch is imported
    check_resume_path_exists(cfg)
    adopt_recorded_model(cfg, args, cfg.hydra.run.dir)  # the run's log says so
    schema.check(cfg)  # every value's type and range, still without torch
    check_launcher_keys(cfg)
    from .tokenizer_files import check_data_matches_model

    check_data_matches_model(cfg.data, cfg.get("resume"), Path(cfg.hydra.run.dir))
    check_resume_has_a_run_dir(cfg, args)
    check_output_dir(cfg.hydra.run.dir)
    if os.environ.get("RANK", "0") == "0":
        from .run_lock import check_unlocked

        check_unlocked(cfg.hydra.run.dir)  # before Hydra writes its files into a dir another run uses
    from .config import validate  # torch, the model and its gates: the semantic checks

    with_hydra_removed = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate(with_hydra_removed, schema_checked=True)
