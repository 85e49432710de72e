"""`moeflow stats RUN_DIR`: the per-layer routing table from routing_stats.jsonl."""

from __future__ import annotations

import json

import pytest

from moeflow.launch import cli
from moeflow.launch.cli import SUBCOMMANDS


def main(argv):
    cli.main(["stats", *argv])


def write_run(path, rows):
    path.mkdir()
    (path / "routing_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(step, layer, counts, **extra):
    mean = sum(counts) / len(counts)
    return {
        "step": step,
        "layer": layer,
        "tokens_per_expert": counts,
        "load_max_over_mean": max(counts) / mean,
        "active_experts_per_token": 2.0,
        "dropped_fraction": 0.125,
        "router_entropy": 1.75,
        **extra,
    }


def test_table_shows_last_step_by_default_and_any_step_on_request(tmp_path, capsys):
    assert "stats" in SUBCOMMANDS
    run = write_run(
        tmp_path / "run",
        [
            row(10, 0, [10, 30], **{"loss/load_balance": 0.0123}),
            row(10, 1, [20, 20]),
            row(20, 0, [5, 35], temperature=0.75),
            row(20, 1, [40, 0]),
        ],
    )
    main([str(run)])
    out = capsys.readouterr().out
    assert "step 20" in out and "5/20.0/35" in out and "0/20.0/40" in out and "1.75" in out and "temperature" in out
    assert "0.75" in out and "0.125" in out and "1.75" in out
    main([str(run), "--step", "10"])
    out = capsys.readouterr().out
    assert "step 10" in out and "10/20.0/30" in out and "load_balance" in out and "0.0123" in out and "1.5" in out


@pytest.mark.parametrize("content,word", [(None, "not found"), ("", "empty"), ("{bad json\n", "not valid JSON")])
def test_bad_run_dirs_are_one_line_errors(tmp_path, capsys, content, word):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "routing_stats.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        main([str(run)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("moeflow stats: error: ") and word in err and "\n" not in err


def test_unlogged_step_names_the_logged_range(tmp_path, capsys):
    run = write_run(tmp_path / "run", [row(10, 0, [1, 1]), row(20, 0, [1, 1])])
    with pytest.raises(SystemExit):
        main([str(run), "--step", "15"])
    assert "logged steps run 10..20" in capsys.readouterr().err
