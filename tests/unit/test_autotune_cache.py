"""Tuned Triton configs persist on disk (kernels/autotune.py `DiskCache`): a second process, here a
second autotuner over the same kernel source, reuses the first one's pick without benchmarking;
another GPU does not. Runs through Triton's real `Autotuner.run` under the CPU interpreter, with a
stand-in benchmark (the interpreter has no timer)."""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl

from moeflow.kernels import autotune

ran: list[int] = []  # BLOCK of every launch, as the candidates' pre_hook sees it
benched: list[int] = []


def _hook(nargs):
    ran.append(nargs["BLOCK"])


def _bench(kernel_call, quantiles):
    kernel_call()
    benched.append(ran[-1])
    t = 1.0 if ran[-1] == 32 else 2.0  # the second candidate wins: a pick that is not the default
    return [t, t, t]


def make_kernel():
    """A fresh autotuner over the same source (what a new process builds)."""

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK": 16}, num_warps=1, pre_hook=_hook),
            triton.Config({"BLOCK": 32}, num_warps=1, pre_hook=_hook),
        ],
        key=["n"],
        do_bench=_bench,
    )
    @triton.jit
    def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    return add_one


def launch(kernel, n: int = 100):
    x = torch.arange(float(n))
    y = torch.empty_like(x)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    assert torch.equal(y, x + 1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    if not autotune.INTERPRET:
        pytest.skip("runs its kernels under TRITON_INTERPRET=1 (CPU)")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ran.clear()
    benched.clear()
    return tmp_path


def test_a_new_process_reuses_the_tuned_config_and_keeps_its_pre_hook(cache_dir):
    first = make_kernel()
    first.cache = autotune.DiskCache(first, target=lambda: "H100 sm_90 132 SMs")
    launch(first)
    assert sorted(benched) == [16, 32] and first.best_config.kwargs == {"BLOCK": 32}
    files = list(cache_dir.rglob("moeflow-add_one.autotune.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert (
        stored["key"] == ["100", "torch.float32", "torch.float32"]
        and stored["best"]["kwargs"] == {"BLOCK": 32}
        and stored["target"] == "H100 sm_90 132 SMs"
    )  # n, then the dtypes: as Triton keys it

    benched.clear()
    ran.clear()
    second = make_kernel()
    second.cache = autotune.DiskCache(second, target=lambda: "H100 sm_90 132 SMs")
    launch(second)
    assert benched == [] and ran == [32]  # no benchmark; the stored pick ran, through its own pre_hook
    assert second.best_config is second.configs[1]
    launch(second, 200)  # another tuning key: tuned and stored beside it
    assert sorted(benched) == [16, 32] and len(list(cache_dir.rglob("moeflow-add_one.autotune.json"))) == 2


def test_another_gpu_or_a_damaged_file_tunes_again(cache_dir):
    first = make_kernel()
    first.cache = autotune.DiskCache(first, target=lambda: "H100 sm_90 132 SMs")
    launch(first)
    benched.clear()
    other = make_kernel()
    other.cache = autotune.DiskCache(other, target=lambda: "H200 sm_90 132 SMs")
    launch(other)
    assert sorted(benched) == [16, 32]  # an H200 keeps its own pick

    for path in cache_dir.rglob("moeflow-add_one.autotune.json"):
        path.write_text("{not json")
    benched.clear()
    again = make_kernel()
    again.cache = autotune.DiskCache(again, target=lambda: "H100 sm_90 132 SMs")
    launch(again)  # a damaged file is a miss, never an error
    assert sorted(benched) == [16, 32]


def test_the_cache_stays_off_under_the_interpreter_and_when_opted_out(monkeypatch):
    from moeflow.kernels import gemm

    if autotune.INTERPRET:  # this session's own kernels: the interpreter's path is left as it was
        assert all(type(k.cache) is dict for k in (gemm._up_kernel, gemm._gmm_kernel, gemm._wgrad_kernel))
    kernel = make_kernel()
    monkeypatch.setattr(autotune, "INTERPRET", False)
    monkeypatch.setattr(autotune, "CACHE", False)  # MOEFLOW_AUTOTUNE_CACHE=0
    autotune.persist_tuning(kernel)
    assert type(kernel.cache) is dict
    monkeypatch.setattr(autotune, "CACHE", True)
    autotune.persist_tuning(kernel)
    assert isinstance(kernel.cache, autotune.DiskCache)
    monkeypatch.setattr(autotune, "INTERPRET", True)
    fresh = make_kernel()
    autotune.persist_tuning(fresh)
    assert type(fresh.cache) is dict


def _ship_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "tools" / "ship_tuning.py"
    spec = importlib.util.spec_from_file_location("ship_tuning", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H100 = "NVIDIA H100 80GB HBM3 sm_90 132 SMs"


def test_a_shipped_pick_spares_a_new_machine_the_tuning_only_where_everything_matches(cache_dir, tmp_path, monkeypatch):
    """A GPU run's picks, collected by bench/tools/ship_tuning.py, serve a machine with an empty cache:
    the same GPU, kernel source and key use the pick untuned; any mismatch tunes as before."""
    tuned = make_kernel()
    tuned.cache = autotune.DiskCache(tuned, target=lambda: "t", gpu=lambda: H100)
    launch(tuned)
    assert first_pick(cache_dir)["gpu"] == H100
    shipped = tmp_path / "tuned_picks.json"
    source = autotune.tuning_digest(tuned)
    counts = _ship_tool().collect(cache_dir, shipped, {"add_one": source})
    assert counts["added"] == 1 and counts["skipped"] == 0
    assert _ship_tool().collect(cache_dir, shipped, {"add_one": source})["unchanged"] == 1  # idempotent

    def fresh(gpu=H100, picks=shipped):
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / f"empty-{len(list(tmp_path.iterdir()))}"))
        benched.clear()
        ran.clear()
        kernel = make_kernel()
        kernel.cache = autotune.DiskCache(
            kernel, target=lambda: "t", gpu=lambda: gpu, shipped=autotune.ShippedPicks(picks)
        )
        launch(kernel)
        return kernel

    kernel = fresh()
    assert benched == [] and ran == [32] and kernel.best_config is kernel.configs[1]  # the shipped pick, its hook kept
    fresh(gpu="NVIDIA H200 sm_90 132 SMs")
    assert sorted(benched) == [16, 32]  # another GPU tunes

    data = json.loads(shipped.read_text())
    for edit in (
        {"source": "0" * 16},
        {"triton": "0.0"},
        {"best": {**data["picks"][0]["best"], "kwargs": {"BLOCK": 64}}},
    ):
        altered = tmp_path / "altered.json"
        altered.write_text(json.dumps({"picks": [{**data["picks"][0], **edit}]}))
        fresh(picks=altered)
        assert sorted(benched) == [16, 32], edit  # other kernel code, another Triton, a pick no longer a candidate
    damaged = tmp_path / "damaged.json"
    damaged.write_text("{not json")
    fresh(picks=damaged)
    assert sorted(benched) == [16, 32]

    assert _ship_tool().collect(None, shipped, {"add_one": "changed"})["dropped_stale"] == 1  # --prune-stale
    assert json.loads(shipped.read_text())["picks"] == []  # a kernel edited since: its picks go


def first_pick(cache_dir):
    return json.loads(next(cache_dir.rglob("moeflow-add_one.autotune.json")).read_text())


def test_the_shipped_picks_file_is_valid_and_names_this_checkouts_kernels():
    """Picks whose kernel code changed since they were tuned are never shipped: after editing a kernel,
    drop them (`python bench/tools/ship_tuning.py --prune-stale`) or re-tune on the GPU."""
    data = json.loads(autotune.SHIPPED_PICKS.read_text())
    names = _ship_tool().current_sources()
    assert {"_up_kernel", "_gmm_kernel", "_wgrad_kernel"} <= set(names)
    for record in data["picks"]:
        assert names.get(record["kernel"]) == record["source"], record["kernel"]
        assert set(record) >= {"gpu", "key", "best", "triton"}


def test_the_ship_tool_refuses_bad_input_in_one_line_and_leaves_out_alone(tmp_path, monkeypatch, capsys):
    tool = _ship_tool()
    out = tmp_path / "picks.json"
    out.write_text(autotune.SHIPPED_PICKS.read_text())
    before = out.read_text()
    (tmp_path / "empty").mkdir()

    def run(*argv):
        monkeypatch.setattr("sys.argv", ["ship_tuning.py", *argv])
        with pytest.raises(SystemExit) as e:
            tool.main()
        return str(e.value.code)

    assert "no moeflow-*.autotune.json under" in run("--cache-dir", str(tmp_path / "empty"), "--out", str(out))
    assert "no moeflow-*.autotune.json under" in run("--cache-dir", str(tmp_path / "missing"), "--out", str(out))
    assert "pass --cache-dir" in run("--out", str(out))
    assert out.read_text() == before
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(tool.ShipError, match="is not a picks file"):
        tool.collect(None, bad, tool.current_sources())
    new = tmp_path / "sub" / "new.json"
    monkeypatch.setattr("sys.argv", ["ship_tuning.py", "--prune-stale", "--out", str(new)])
    tool.main()  # a new file in a new folder: the shipped file's header, no picks
    written = json.loads(new.read_text())
    assert written["picks"] == [] and "about" in written
