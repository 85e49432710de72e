"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, several at once, each through its own library.

`logger=tensorboard` (the default), `logger=wandb`, `logger=mlflow`, `logger=[tensorboard,wandb]`
or `logger=none`; `tracking.*` names the project and run. The loop talks to one `Trackers`
object with TensorBoard's calls (add_scalar, add_text, add_histogram); each tracker gets them in
its own form. A resumed run continues the same W&B / MLflow run: their ids are kept in the run
dir. W&B honours its own environment (WANDB_MODE=offline, WANDB_API_KEY, WANDB_ENTITY).
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

from moeflow.moe.errors import ConfigError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> the module it needs
WANDB_ID, MLFLOW_ID = ".wandb_run_id", ".mlflow_run_id"


def chosen(logger) -> list[str]:
    """The trackers `logger` names, checked: a name, a list of names, or none."""
    names = [logger] if isinstance(logger, str) or logger is None else list(logger)
    names = [n for n in names if n not in (None, "none")]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"logger={unknown[0]!r} is unknown; use {', '.join(TRACKERS)}, none, or a list such as logger=[tensorboard,wandb]"
        )
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        extra = "pip install 'moeflow[trackers]'" if missing[0] != "tensorboard" else "pip install tensorboard"
        raise ConfigError(
            f"logger={missing[0]} needs the {TRACKERS[missing[0]]} package: {extra}, or choose another logger"
        )
    return list(dict.fromkeys(names))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _kept_id(path: Path, make) -> str:
    """The id a tracker's run got the first time (kept in the run dir), so that a resume continues it."""
    if path.is_file():
        return path.read_text().strip()
    new = make()
    path.write_text(new + "\n")
    return new


class Trackers:
    """Scalars, texts and histograms to every chosen tracker (on the main rank only)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, tracking: dict | None = None):
        tracking = tracking or {}
        self.names = names
        run_name = tracking.get("run_name") or Path(run_dir).resolve().name
        project = tracking.get("project") or "moeflow"
        self.tb = self.wandb = self.mlflow = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if "wandb" in names:
            import wandb

            run_id = _kept_id(Path(run_dir) / WANDB_ID, lambda: uuid.uuid4().hex[:12])
            try:
                self.wandb = wandb.init(
                    project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), config=config
                )
            except Exception as e:  # not logged in, no network: wandb raises its own types
                raise ConfigError(
                    f"logger=wandb could not start a W&B run ({' '.join(str(e).split())[:200]}); log in with `wandb login`, "
                    f"or log locally with WANDB_MODE=offline (then `wandb sync` later)"
                ) from None
        if "mlflow" in names:
            import mlflow

            uri = tracking.get("mlflow_tracking_uri")
            if uri:
                mlflow.set_tracking_uri(uri)
            elif not os.environ.get("MLFLOW_TRACKING_URI"):
                # a store in the run dir: SQLite where MLflow's database layer is installed
                if importlib.util.find_spec("sqlalchemy") is not None:
                    mlflow.set_tracking_uri(f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}")
                else:  # mlflow-skinny: the file store, which MLflow 3 keeps behind an opt-in
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    mlflow.set_tracking_uri((Path(run_dir).resolve() / "mlruns").as_uri())
            mlflow.set_experiment(project)
            kept = Path(run_dir) / MLFLOW_ID
            run = mlflow.start_run(run_id=kept.read_text().strip() if kept.is_file() else None, run_name=run_name)
            if not kept.is_file():
                kept.write_text(run.info.run_id + "\n")
                mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})
            self.mlflow = mlflow

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metric(tag.replace("@", "_"), float(value), step=step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.summary[tag] = text
        if self.mlflow is not None:
            self.mlflow.set_tag(tag, text[:5000])

    def add_histogram(self, tag: str, values, step: int) -> None:
        if self.tb is not None:
            self.tb.add_histogram(tag, values, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Histogram(values.detach().float().cpu().numpy())}, step=step)
        # MLflow has no histograms: the per-layer scalars carry the balance there

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()
