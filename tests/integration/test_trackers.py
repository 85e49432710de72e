"""logger=tensorboard|wandb|mlflow, several at once, each read back through its own format:
W&B offline (WANDB_MODE=offline, its .wandb record log), MLflow's local store (its client)."""

from __future__ import annotations

import struct

import pytest

from helpers.config import TINY, compose_cfg
from moeflow.launch import schema
from moeflow.launch.train import train
from moeflow.moe.errors import ConfigError

wandb = pytest.importorskip("wandb", reason="needs wandb: pip install -e '.[trackers]'")
mlflow = pytest.importorskip("mlflow", reason="needs mlflow: pip install -e '.[trackers]'")


def wandb_history(run_dir) -> dict[int, dict]:
    """The history rows of every offline W&B run file in run_dir, by step (its LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows: dict[int, dict] = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""  # 7 bytes: the ':W&B' header
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            buf = data[pos + 7 : pos + 7 + length] if kind in (1, 2) else buf + data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                if record.WhichOneof("record_type") == "history":
                    items = {(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item}
                    rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def tensorboard(run_dir, tag) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_three_trackers_get_the_same_numbers_and_a_resume_continues_their_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    common = [
        *TINY,
        "trainer.eval_every=2",
        "trainer.ckpt_every=2",
        "trainer.log_every=2",
        "logger=[tensorboard,wandb,mlflow]",
    ]
    try:
        train(compose_cfg(*common, "trainer.steps=4"), run)
        train(compose_cfg(*common, "trainer.steps=6", "resume=auto", run_dir=run), run)
    finally:
        wandb.teardown()  # W&B's background service process
    tb = tensorboard(run, "train/loss")
    assert sorted(tb) == [2, 4, 6]
    rows = wandb_history(run)
    assert {s: float(rows[s]["train/loss"]) for s in tb} == pytest.approx(tb, rel=1e-6)
    assert "moe/layer0/load_max_over_mean" in rows[2]
    run_id = (run / ".wandb_run_id").read_text().strip()
    assert {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}  # one W&B run, resumed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    history = client.get_metric_history((run / ".mlflow_run_id").read_text().strip(), "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(tb, rel=1e-6)  # one MLflow run, resumed


def test_an_unknown_or_missing_tracker_is_one_line_before_the_run(monkeypatch):
    with pytest.raises(ConfigError, match="logger='neptune' is unknown"):
        schema.check(compose_cfg("logger=neptune"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger=wandb needs the wandb package: pip install 'moeflow\[trackers\]'"):
        schema.check(compose_cfg("logger=[tensorboard,wandb]"))
