"""Collect the Triton autotuning picks a GPU run stored on disk into moeflow's shipped picks.

Run `moeflow bench train --shape ...` (or any training run) on the GPU to ship for, then:

    python bench/tools/ship_tuning.py --cache-dir ${TRITON_CACHE_DIR:-~/.triton/cache} [--out kernels/tuned_picks.json]

Every `moeflow-<kernel>.autotune.json` under the cache dir that names its GPU and kernel source
(written since the shipped picks exist) is merged into the shipped file; a pick for the same
(kernel, code, GPU, key, Triton version) replaces the shipped one, and the tool says how many were added, replaced
and skipped. Picks whose kernel source no longer matches this checkout's kernels are dropped (they
would never be used), so run it from the commit the GPU run used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def current_sources() -> dict[str, str]:
    """kernel name -> `tuning_digest` of this checkout's autotuned kernels (every Autotuner in kernels/gemm.py)."""
    from triton.runtime.autotuner import Autotuner

    from moeflow.kernels import autotune, gemm

    kernels = [k for k in vars(gemm).values() if isinstance(k, Autotuner)]
    return {autotune._kernel_name(k): autotune.tuning_digest(k) for k in kernels}


def collect(cache_dir: Path, out: Path, sources: dict[str, str]) -> dict[str, int]:
    from moeflow.kernels.autotune import ShippedPicks

    shipped = json.loads(out.read_text()) if out.exists() else {"picks": []}
    picks = {ShippedPicks.identity(r): r for r in shipped.get("picks", [])}
    counts = {"added": 0, "replaced": 0, "unchanged": 0, "skipped": 0}
    for path in sorted(Path(cache_dir).expanduser().rglob("moeflow-*.autotune.json")):
        try:
            stored = json.loads(path.read_text())
            record = {k: stored[k] for k in ("kernel", "source", "gpu", "key", "best", "triton")}
        except (OSError, ValueError, KeyError):
            counts["skipped"] += 1  # written before picks named their GPU and source, or damaged
            continue
        if not record["gpu"] or sources.get(record["kernel"]) != record["source"]:
            counts["skipped"] += 1
            continue
        ident = ShippedPicks.identity(record)
        old = picks.get(ident)
        counts["added" if old is None else "unchanged" if old == record else "replaced"] += 1
        picks[ident] = record
    kept = [r for r in picks.values() if sources.get(r["kernel"]) == r["source"]]
    shipped["picks"] = sorted(kept, key=lambda r: (r["gpu"], r["kernel"], r["key"]))
    out.write_text(json.dumps(shipped, indent=1) + "\n")
    counts["dropped_stale"] = len(picks) - len(kept)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", required=True, help="the Triton cache dir the GPU run used")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[2] / "kernels" / "tuned_picks.json"), help="shipped picks"
    )
    args = ap.parse_args()
    counts = collect(Path(args.cache_dir), Path(args.out), current_sources())
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" -> {args.out}")


if __name__ == "__main__":
    main()
