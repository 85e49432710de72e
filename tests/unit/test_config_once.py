"""`moeflow train` checks its config once: one schema pass and one meta build of the model for the
checks (the engine's build is the model it trains), however many layers ask (preflight, the run)."""

from __future__ import annotations


def test_moeflow_train_checks_the_config_once(tmp_path, monkeypatch):
    from moeflow.launch import schema, train_command
    from moeflow.moe import model as model_module

    counts = {"schema": 0, "meta_builds": 0}
    check, init = schema.check, model_module.Transformer.__init__

    def counting_check(cfg):
        counts["schema"] += 1
        return check(cfg)

    def counting_init(self, *a, **k):
        init(self, *a, **k)
        counts["meta_builds"] += next(self.parameters()).device.type == "meta"

    monkeypatch.setattr(schema, "check", counting_check)
    monkeypatch.setattr(model_module.Transformer, "__init__", counting_init)
    monkeypatch.setattr("sys.argv", ["moeflow-train"])
    train_command.main(
        [
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.d_ff=32",
            "data.seq_len=16",
            "data.batch_size=2",
            "data.max_bytes=100000",
            "trainer.steps=1",
            "trainer.eval_every=0",
            "trainer.ckpt_every=0",
            "trainer.progress=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    assert counts == {
        "schema": 1,
        "meta_builds": 2,
    }  # the checks' build, and the engine's model (materialised from meta)
