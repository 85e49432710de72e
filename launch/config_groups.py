"""Which choice of a config group reads which key, from the shipped YAML files: the one fact the launcher-key
check needs, shared by the preflight and `validate` (so neither imports the other)."""

from __future__ import annotations

from moeflow.moe.errors import ConfigError


def choices_with_keys(group: str) -> dict[str, list[str]]:
    """`group.key` -> the choices of config group `group` that have it (from the shipped YAML files)."""
    import importlib.resources

    import yaml

    root = importlib.resources.files("moeflow.configs") / group
    if not root.is_dir():
        return {}
    owners: dict[str, list[str]] = {}
    for f in sorted(root.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            body = yaml.safe_load(f.read_text()) or {}
            for k in body:
                if k != "defaults":
                    owners.setdefault(f"{group}.{k}", []).append(f.name.removesuffix(".yaml"))
    return owners


def check_launcher_keys(cfg) -> None:
    """`+launcher.nproc=2` adds the key to the default launcher, which never reads it: one process ran."""
    launcher = cfg.get("launcher") or {}
    name = launcher.get("name", "none")
    owners = choices_with_keys("launcher")
    for key in launcher:
        mine = owners.get(f"launcher.{key}", [])
        if name in mine:
            continue
        fix = f"choose launcher={mine[0]}" if mine and name == "none" else "drop it"
        raise ConfigError(f"launcher.{key} is not read by launcher={name}; {fix}")
