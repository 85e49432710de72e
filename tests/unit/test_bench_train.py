"""`moeflow bench train` on tiny shapes (CPU): every variant runs, the figures are consistent, and
the MoE and dense variants go through the real trainer."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from helpers.bench import TINY_BENCH as TINY
from helpers.bench import bench_train_args
from moeflow.launch.bench import train as bench_train
from moeflow.moe.config import ModelConfig


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=16, num_experts=4, top_k=2)
    d, f, k, L, S, V = 32, 16, 2, 2, 64, 50
    per_layer = 4 * d * d + 2 * d + d * 4 + k * 3 * d * f  # attention, norms, router, the k active experts
    matmul_params = L * per_layer + V * d + d  # the LM head and the final norm; the embedding lookup is not counted
    assert bench_train.flops_per_token(cfg, S) == 6 * matmul_params + 12 * L * 4 * 8 * S


@pytest.mark.slow  # trains (a few seconds on 2 cores)
def test_bench_runs_every_variant_through_the_trainer(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    import moeflow.launch.train as trainer

    calls = []
    real = trainer.train

    def counting(cfg, run_dir):
        calls.append((cfg.experts.impl, cfg.model.moe_every))
        return real(cfg, run_dir)

    monkeypatch.setattr(trainer, "train", counting)
    out = tmp_path / "train.json"
    args = bench_train_args("moe,dense,hf", out)
    result = bench_train.run(args)
    assert calls == [
        ("torch", 1),
        ("auto", 0),
    ]  # the MoE (experts.impl=torch) and its dense equivalent, both by the trainer
    saved = json.loads(out.read_text())
    for key in (
        "device",
        "moe_tokens_per_s",
        "dense_tokens_per_s",
        "moe_mfu",
        "dense_mfu",
        "moe_peak_mem_gib",
        "first_step_s",
    ):
        assert key in saved
    assert [r["variant"] for r in saved["variants"]] == ["moe-torch", "dense", "hf (mixtral)"]
    assert saved["moe_over_dense"] == pytest.approx(saved["moe_tokens_per_s"] / saved["dense_tokens_per_s"])
    for r in saved["variants"]:
        assert r["tokens_per_s"] > 0 and r["first_step_s"] > 0 and 0 < r["mfu"] and r["compiled"] is False
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / saved["peak_flops"])
    moe, dense = saved["variants"][0], saved["variants"][1]
    assert moe["params"]["active"] == pytest.approx(dense["params"]["active"], rel=0.05)  # same active FLOPs, no router
    assert "MoE (moe-torch) / dense tokens/s" in capsys.readouterr().out
    assert result["shape"] == "tiny"
    # the preset's name, and the model the rows ran with the overrides applied (TINY's one layer, 4 experts)
    assert saved["model"]["n_layers"] == 1 and saved["model"]["num_experts"] == 4 and saved["model"]["d_model"] == 32


@pytest.mark.slow  # trains 4 tiny steps (about a second on 2 cores)
def test_phase_times_are_reported_and_fit_in_the_steady_step(tmp_path, capsys):
    out = tmp_path / "train.json"
    args = bench_train_args("dense", out)
    bench_train.run(args)
    row = json.loads(out.read_text())["variants"][0]
    phases = [row["forward_s"], row["backward_s"], row["optimizer_s"]]
    assert all(p > 0 for p in phases) and row["phases_measured_with"] == "perf_counter"
    assert sum(phases) <= row["steady_step_s"]  # the measured steps' phases, inside the interval tokens/s comes from
    assert json.loads(out.read_text())["dense_phases_s"] == {
        "forward": phases[0],
        "backward": phases[1],
        "optimizer": phases[2],
    }
    assert "fwd / bwd / opt" in capsys.readouterr().out


@pytest.mark.slow  # trains 4 tiny steps, two of them profiled
def test_a_profiled_variant_prints_its_table(tmp_path, capsys):
    args = bench_train_args("dense", override=["trainer.profile=true"])
    row = bench_train.run(args)["variants"][0]
    assert row["profile_ms_per_step"]["gemm"] > 0
    gemms = row["profile_top"]["gemm"]  # [name, ms per step, calls per step], costliest first
    assert (
        gemms
        and all(ms >= 0 for _, ms, _ in gemms)
        and [r[1] for r in gemms] == sorted((r[1] for r in gemms), reverse=True)
    )
    assert "dense: profile: CPU self time per step" in capsys.readouterr().out


@pytest.mark.parametrize("seq_len", [16, 2048, 8192])
def test_the_random_token_file_leaves_a_validation_window(tmp_path, seq_len):
    """The documented default (seq 2048) once stopped on "the split has 2000 tokens, fewer than data.seq_len+2"."""
    from omegaconf import OmegaConf

    from moeflow.launch.data import training_samplers

    n = bench_train.token_count(8, seq_len)
    tokens = bench_train.random_tokens(tmp_path, 50304, n)
    data = OmegaConf.create(
        {
            "source": "memmap",
            "path": str(tokens),
            "val_path": None,
            "dtype": "uint16",
            "seq_len": seq_len,
            "batch_size": 8,
            "val_percent": bench_train.VAL_PERCENT,
            "max_bytes": None,
            "glob": "*",
            "mix": None,
        }
    )
    training_samplers(data, 50304, 0)  # raises DataError if either split is too small


def test_unknown_shape_or_variant_fails_in_one_line():
    from moeflow.moe.errors import ConfigError

    base = dict(variants="moe", impls="torch", seq_len=16, batch_size=2, steps=1, device="cpu", out=None, override=TINY)
    with pytest.raises(ConfigError, match="--shape 'huge' is unknown"):
        bench_train.run(argparse.Namespace(shape="huge", **base))
    with pytest.raises(ConfigError, match="--variants: 'fast' is unknown"):
        bench_train.run(argparse.Namespace(shape="tiny", **{**base, "variants": "fast"}))
    # a device refusal names the bench's own flag, not the trainer setting the bench passes it on as
    with pytest.raises(ConfigError, match="^--device='tpu' is unknown"):
        bench_train.run(argparse.Namespace(shape="tiny", **{**base, "device": "tpu"}))


def test_an_existing_results_file_is_replaced_only_with_force(tmp_path):
    from moeflow.moe.errors import ConfigError

    out = tmp_path / "train_h100.json"
    out.write_text("{}")
    with pytest.raises(ConfigError, match="--out .* already exists; pass --force"):
        bench_train.main(["--shape", "huge", "--out", str(out)])  # refused before the (bad) shape is even looked at
    assert out.read_text() == "{}"


def test_overrides_may_follow_the_flags(monkeypatch):
    """`moeflow bench train --compile optim.master_weights=true` once failed with 'unrecognized arguments'."""
    seen = {}
    monkeypatch.setattr(bench_train, "run", lambda args: seen.update(vars(args)))
    bench_train.main(["model.n_layers=4", "--compile", "optim.master_weights=true", "--steps", "3"])
    assert (
        seen["override"] == ["model.n_layers=4", "optim.master_weights=true"] and seen["compile"] and seen["steps"] == 3
    )


def test_implementations_that_would_fall_back_and_a_directory_out_are_refused_before_running(tmp_path):
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match="--impls grouped_mm runs only on a CUDA GPU"):
        bench_train.run(bench_train_args("moe", impls="grouped_mm"))
    with pytest.raises(ConfigError, match="is a directory; name a file in it"):
        bench_train.main(["--shape", "tiny", "--out", str(tmp_path), "--force"])


@pytest.mark.parametrize(
    "override, says",
    [
        ("data.batch_size=32", "use --batch-size"),  # the step time was computed from --batch-size: it was off 4x
        ("data.global_batch_size=16", "use --batch-size"),
        ("trainer.steps=20", "use --steps"),
        ("data.seq_len=64", "use --seq-len"),
        ("launcher=local", "the bench sets launcher itself"),  # it ran one process all the same, silently
        ("+launcher.nproc=2", "the bench sets launcher.nproc itself"),
        ("hydra.run.dir=somewhere", "the bench sets hydra.run.dir itself"),
        ("experts.impl=torch", "use --impls"),  # rows named moe-triton / moe-grouped_mm would have run torch
        ("model.moe_every=1", "the dense variant sets model.moe_every=0"),  # the "dense" row would be a MoE
    ],
)
def test_overrides_of_what_the_bench_sets_are_refused_before_running(override, says):
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(says)):
        bench_train.run(bench_train_args("moe,dense", override=[override]))
    with pytest.raises(ConfigError, match="use one of them"):  # compiled rows that were not compiled
        bench_train.run(bench_train_args("moe", override=["trainer.compile=false"], compile=True))


def test_an_out_whose_folder_cannot_hold_it_is_refused_before_running(tmp_path):
    """It crashed after the whole benchmark had run, losing the results."""
    from moeflow.launch.bench import check_out
    from moeflow.moe.errors import ConfigError

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_out(str(tmp_path / "a_file" / "deeper" / "results.json"), force=False)
    with pytest.raises(ConfigError, match="names no file"):
        check_out("", force=False)
    check_out(str(tmp_path / "new" / "deeper" / "results.json"), force=False)  # made when the results are written
    assert not (tmp_path / "new").exists()  # a refused run must not leave folders behind


def test_an_interrupted_variant_does_not_offer_to_resume_its_temporary_run(monkeypatch):
    """The trainer's "continue with ... resume=auto hydra.run.dir=<tmp>" named a folder the bench deletes."""
    import moeflow.launch.train as train_module
    from moeflow.moe.errors import Interrupted

    def interrupted(cfg, run_dir):
        raise Interrupted(f"stopped by SIGINT after step 3, checkpoint saved in {run_dir}; continue with resume=auto")

    monkeypatch.setattr(train_module, "train", interrupted)
    with pytest.raises(Interrupted) as e:
        bench_train.run(bench_train_args("dense"))
    assert str(e.value) == (
        "dense: interrupted (stopped by SIGINT); the trainer's checkpoint went with the bench's temporary run dir, "
        "and no results file was written"
    )  # the trainer's "stopping after this step with a checkpoint" came first: say where that checkpoint went


def test_a_misspelt_benchmark_is_named_with_the_one_meant():
    from moeflow.launch.bench import main as bench_main
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown benchmark 'traim' \(did you mean 'train'\?\)"):
        bench_main(["traim"])


def test_list_and_override_mistakes_are_refused_before_any_row_runs(monkeypatch):
    """A typo in the last --impls entry, a row listed twice, an empty --impls, or an override of a key
    the config lacks: refused in one line before the first row trains (which would lose its results)."""
    import moeflow.launch.train as trainer
    from moeflow.moe.errors import ConfigError

    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("a row ran before the refusal"))
    with pytest.raises(ConfigError, match="experts.impl='trition' is not available here"):
        bench_train.run(bench_train_args("moe", impls="torch,trition"))
    with pytest.raises(ConfigError, match="--variants: 'moe' is listed twice"):
        bench_train.run(bench_train_args("moe,dense,moe"))
    with pytest.raises(ConfigError, match="--impls: 'torch' is listed twice"):
        bench_train.run(bench_train_args("moe", impls="torch,torch"))
    with pytest.raises(ConfigError, match="--impls is empty"):
        bench_train.run(bench_train_args("moe", impls=","))
    # the user's `device=cpu`, not the bench's own valid trainer.device, is the unknown key
    with pytest.raises(ConfigError, match=r"unknown config key 'device' \(did you mean 'trainer.device'\?\)"):
        bench_train.run(bench_train_args("moe", override=["device=cpu"]))


def test_a_model_transformers_cannot_compute_is_the_hf_rows_skip_and_the_json_is_written(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "train.json"
    bench_train.run(bench_train_args("hf,torchtitan", out, override=["gate=sinkhorn", "trainer.compile=true"]))
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    assert "no transformers model of this shape" in rows["hf"]["skipped"] and "gate=sinkhorn" in rows["hf"]["skipped"]
    assert rows["hf"]["compiled"] is False  # trainer.compile does not reach the hf row
    assert rows["torchtitan-compiled"]["compiled"] is True and rows["torchtitan-compiled"]["skipped"]


def test_a_shape_too_big_for_this_machine_names_a_smaller_one_before_any_row(monkeypatch):
    """The trainer's memory refusal says "or more ranks"; the bench is one process, so it names --shape tiny."""
    import os

    from moeflow.moe.errors import ConfigError

    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_PAGE_SIZE" else 1024)  # a 1 KiB machine
    monkeypatch.setattr(bench_train, "trainer_variant", lambda *a, **k: pytest.fail("a row ran"))
    with pytest.raises(ConfigError, match=r"memory; use fewer or smaller experts, --shape tiny, or fewer layers") as e:
        bench_train.run(bench_train_args("moe"))
    assert "more ranks" not in str(e.value)
