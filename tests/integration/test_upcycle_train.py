"""(d) An upcycled checkpoint continues in `moeflow train`; its first loss is the dense model's loss."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[hf]'")

from helpers.config import compose_cfg  # noqa: E402
from helpers.timeouts import limit  # noqa: E402
from helpers.upcycle import make_hf  # noqa: E402
from moeflow.launch.data import BatchSampler, load_splits  # noqa: E402
from moeflow.launch.train import train  # noqa: E402
from moeflow.launch.upcycle import cli as upcycle_cli  # noqa: E402

SEQ, BATCH, SEED = 16, 4, 7


def corpus(path, vocab: int):
    toks = np.random.default_rng(0).integers(0, vocab, size=4000).astype(np.uint16)
    toks.tofile(path)
    return path


def dense_first_loss(dense, cfg) -> float:
    """The dense model's loss on the exact batch the trainer draws at step 0."""
    splits = load_splits(cfg.data)
    x, y = BatchSampler(splits.train, cfg.data.seq_len, cfg.data.batch_size, cfg.trainer.seed).batch(0, 0, 0)
    with torch.no_grad():
        return F.cross_entropy(dense(x).logits.float().flatten(0, 1), y.flatten()).item()


def train_overrides(data, steps: int = 1):
    return [
        "data=memmap",
        f"data.path={data}",
        f"data.seq_len={SEQ}",
        f"data.batch_size={BATCH}",
        f"trainer.steps={steps}",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        "trainer.progress=false",
        f"trainer.seed={SEED}",
        "experts.impl=torch",
    ]


def test_upcycled_llama_continues_in_moeflow_train(tmp_path):
    dense = make_hf("llama", tmp_path / "dense", vocab=128)
    data = corpus(tmp_path / "tokens.bin", 128)
    report = upcycle_cli.upcycle(
        [str(tmp_path / "dense"), str(tmp_path / "moe"), "--format", "moeflow", "--num-experts", "4", "--top-k", "2"]
    )
    out = (tmp_path / "moe").resolve()
    assert report["train_command"] == shlex.join(["moeflow", "train", f"resume={out}"])
    cfg = compose_cfg(
        f"hydra.searchpath=[file://{out / 'configs'}]",
        "model=upcycled",
        "gate=upcycled",
        f"resume={out}",
        *train_overrides(data),
    )
    result = train(cfg, tmp_path / "run")
    assert result["start_step"] == 0 and result["step"] == 1
    want = dense_first_loss(dense, cfg)
    assert result["train_loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_slurm_style_run_in_the_upcycled_dir_with_resume_auto(tmp_path):
    """README's recipe: hydra.run.dir=<upcycled dir> resume=auto starts from the upcycled
    weights, and a requeued job resumes from the run's own later checkpoint."""
    dense = make_hf("qwen3", tmp_path / "dense", vocab=128, head_dim=16)
    data = corpus(tmp_path / "tokens.bin", 128)
    upcycle_cli.upcycle(
        [str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "1", "--granularity", "2"]
    )
    run_dir = (tmp_path / "moe" / "moeflow").resolve()
    base = [
        f"hydra.searchpath=[file://{run_dir / 'configs'}]",
        "model=upcycled",
        "gate=upcycled",
        "resume=auto",
        *train_overrides(data),
    ]
    cfg = compose_cfg(*base, "trainer.ckpt_every=1")
    first = train(cfg, run_dir)
    assert first["start_step"] == 0
    assert first["train_loss"] == pytest.approx(dense_first_loss(dense, cfg), rel=1e-5, abs=1e-6)
    again = train(compose_cfg(*base, "trainer.steps=2", "trainer.ckpt_every=1"), run_dir)
    assert again["start_step"] == 1 and again["step"] == 2


@pytest.mark.slow
def test_user_command_from_a_moeflow_dense_checkpoint(tmp_path):
    """The real CLI, twice: a dense moeflow run -> `moeflow upcycle` -> the printed `moeflow train` command."""
    data = corpus(tmp_path / "tokens.bin", 256)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.d_ff=64",
        "model.num_experts=1",
        "model.top_k=1",
        "model.max_seq_len=32",
    ]
    dense_run = tmp_path / "dense_run"
    cmd = [
        sys.executable,
        "-m",
        "moeflow.launch.cli",
        "train",
        *tiny,
        *train_overrides(data, steps=2),
        "trainer.ckpt_every=2",
        f"hydra.run.dir={dense_run}",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=limit(300))
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "upcycle",
            str(dense_run),
            str(tmp_path / "moe"),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--granularity",
            "2",
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=limit(300),
    )
    assert "verify moeflow MoE vs dense" in up.stdout
    line = next(ln.strip() for ln in up.stdout.splitlines() if ln.strip().startswith("moeflow train "))
    argv = shlex.split(line)[2:]  # the printed command is shell-quoted
    run_dir = tmp_path / "moe_run"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "train",
            *argv,
            *train_overrides(data, steps=1),
            f"hydra.run.dir={run_dir}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=limit(300),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    log = next(run_dir.glob("*.log")).read_text()
    assert "weights-only checkpoint" in log
    done = json.loads(log.split("done: ")[1].split("; run dir")[0])
    # the dense moeflow model's loss on the same first batch
    from moeflow.launch import checkpoint as ckpt
    from moeflow.moe.model import ModelConfig, Transformer

    found = ckpt.find_checkpoint(dense_run)
    dense = Transformer(ModelConfig(**ckpt.read_meta(found)["model"])).eval()
    dense.load_state_dict(ckpt.load_full_weights(found), strict=False)
    cfg = compose_cfg(*tiny, *train_overrides(data))
    splits = load_splits(cfg.data)
    x, y = BatchSampler(splits.train, SEQ, BATCH, SEED).batch(0, 0, 0)
    with torch.no_grad():
        want = F.cross_entropy(dense(x).flatten(0, 1), y.flatten()).item()
    assert done["train_loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("router_init, diverge", [("auto", True), ("zero", False)])
def test_upcycled_experts_diverge_in_training(tmp_path, router_init, diverge):
    """The default upcycle (a random router) makes copies that differ after a few steps, experts and
    router rows alike; a zero router keeps pairs of experts bit-identical (it trained 8 experts as 4)."""
    from moeflow.parallel.checkpoint import read_full_tensors

    make_hf("llama", tmp_path / "dense", vocab=128)
    data = corpus(tmp_path / "tokens.bin", 128)
    upcycle_cli.upcycle(
        [
            str(tmp_path / "dense"),
            str(tmp_path / "moe"),
            "--format",
            "moeflow",
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--router-init",
            router_init,
        ]
    )
    out = (tmp_path / "moe").resolve()
    overrides = [o for o in train_overrides(data, steps=6) if not o.startswith("trainer.ckpt_every")] + [
        "trainer.ckpt_every=6"
    ]
    train(
        compose_cfg(
            f"hydra.searchpath=[file://{out / 'configs'}]",
            "model=upcycled",
            "gate=upcycled",
            f"resume={out}",
            *overrides,
        ),
        tmp_path / "run",
    )
    weights = read_full_tensors(tmp_path / "run" / "checkpoints" / "step_00000006", "model.")
    experts = {k: v for k, v in weights.items() if k.endswith("w1_EDF")}
    routers = {k: v for k, v in weights.items() if ".gate." in k and v.dim() == 2 and v.shape[0] == 4}
    assert experts and routers, sorted(weights)
    tied = [
        (k, i, j)
        for group in (experts, routers)
        for k, v in group.items()
        for i in range(4)
        for j in range(i + 1, 4)
        if torch.equal(v[i], v[j])
    ]
    assert (not tied) if diverge else tied, tied[:4]


def test_tied_router_rows_and_dead_experts_are_warned():
    from moeflow.launch.routing_health import CollapseWatch
    from moeflow.moe.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4, max_seq_len=8))
    layer = model.moe_layers()[0]
    watch = CollapseWatch(idle_intervals=2)
    model(torch.randint(0, 256, (2, 8)))
    assert watch.check(model, 1) == []  # a fresh random router: nothing to say
    with torch.no_grad():
        for p in layer.gate.parameters():
            if p.dim() == 2 and p.shape[0] == 4:
                p[2].copy_(p[1])
    layer.last_stats = {"tokens_per_expert": torch.tensor([5.0, 0.0, 3.0, 0.0])}
    said = watch.check(model, 2)
    assert len(said) == 1 and "experts 1 and 2 have identical router rows" in said[0]
    said = watch.check(model, 3)
    assert len(said) == 1 and "experts [1, 3] got no tokens for 2 log intervals" in said[0]
    assert watch.check(model, 4) == []  # once each


def test_upcycled_and_resumed_runs_need_no_model_restated(tmp_path):
    """`moeflow train resume=<upcycled dir>` and then `resume=auto` use the model the checkpoints
    record (once: the default model's shapes, refused); naming single keys still applies them."""
    make_hf("llama", tmp_path / "dense", vocab=128)
    data = corpus(tmp_path / "tokens.bin", 128)
    upcycle_cli.upcycle(
        [str(tmp_path / "dense"), str(tmp_path / "moe"), "--format", "moeflow", "--num-experts", "4", "--top-k", "2"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    base = [
        sys.executable,
        "-m",
        "moeflow.launch.cli",
        "train",
        *train_overrides(data, steps=1),
        "trainer.ckpt_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.run(
        [*base, f"resume={tmp_path / 'moe'}", "gate.aux_loss_coef=0.02"],
        env=env,
        capture_output=True,
        text=True,
        timeout=limit(300),
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "resume: model and gate as recorded in" in (run_dir / "train.log").read_text()
    again = subprocess.run(
        [*base, "resume=auto", "trainer.steps=2"], env=env, capture_output=True, text=True, timeout=limit(300)
    )
    assert again.returncode == 0, again.stderr[-2000:]
    from moeflow.launch import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.find_checkpoint(run_dir))
    assert meta["step"] == 2 and meta["model"]["num_experts"] == 4 and meta["model"]["vocab_size"] == 128
    assert meta["config"]["gate"]["aux_loss_coef"] == 0.02  # the single key given at the start, kept on resume


def test_a_resume_keeps_its_data_and_a_fresh_start_never_mixes_into_a_used_run_dir(tmp_path):
    """Found by a newcomer: `resume=auto` without repeating data=... fell back to the default byte-level data
    (a BPE model trained on bytes); and starting from an upcycled folder into a run dir that held another
    run's checkpoints mixed the two runs' steps."""
    from moeflow.moe.errors import ConfigError

    make_hf("llama", tmp_path / "dense", vocab=128)
    data = corpus(tmp_path / "tokens.bin", 128)
    upcycle_cli.upcycle(
        [str(tmp_path / "dense"), str(tmp_path / "moe"), "--format", "moeflow", "--num-experts", "4", "--top-k", "2"]
    )
    run = tmp_path / "run"
    first = [f"resume={tmp_path / 'moe'}", *train_overrides(data, steps=1), "trainer.ckpt_every=1"]
    train(compose_cfg(*first), run)
    # continue without naming the data: the run's own data, not data=stdlib
    again = compose_cfg("resume=auto", "trainer.steps=2", "trainer.ckpt_every=1", "trainer.device=cpu", run_dir=run)
    assert again.data.source == "memmap" and again.data.path == str(data)
    assert train(again, run)["step"] == 2
    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run"):
        train(compose_cfg(*first), run)  # the first command again, into the used run dir


def test_data_of_another_tokenizer_than_the_model_carries_is_refused_before_the_run(tmp_path):
    from helpers.tokenizer import stdlib_package, train_bpe
    from moeflow.launch import data_prepare
    from moeflow.launch.preflight import preflight
    from moeflow.moe.errors import ConfigError

    train_bpe(tmp_path / "dense", vocab_size=300)  # the model's own tokenizer, in its folder
    make_hf("llama", tmp_path / "dense", vocab=300)
    upcycle_cli.upcycle(
        [str(tmp_path / "dense"), str(tmp_path / "moe"), "--format", "moeflow", "--num-experts", "2", "--top-k", "1"]
    )
    train_bpe(tmp_path / "other", vocab_size=280, corpus=stdlib_package("email"))
    for name, tok in (("mine", tmp_path / "dense"), ("theirs", tmp_path / "other")):
        data_prepare.main(
            [
                "prepare",
                str(stdlib_package("json")),
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path / name),
                "--no-progress",
            ]
        )
    args = [
        f"resume={tmp_path / 'moe'}",
        "data=memmap",
        "data.seq_len=32",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.device=cpu",
    ]
    preflight([*args, f"data.path={tmp_path / 'mine' / 'train.bin'}"])  # the model's tokenizer: fine
    with pytest.raises(
        ConfigError, match=r"was tokenized with another tokenizer .* prepare the data with the model's tokenizer"
    ):
        preflight([*args, f"data.path={tmp_path / 'theirs' / 'train.bin'}"])
