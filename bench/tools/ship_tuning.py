"""Collect the Triton autotuning picks a GPU run stored on disk into moeflow's shipped picks.

Run `moeflow bench train --shape ...` (or any training run) on the GPU to ship for, then:

    python bench/tools/ship_tuning.py --cache-dir ${TRITON_CACHE_DIR:-~/.triton/cache} [--out kernels/tuned_picks.json]
    python bench/tools/ship_tuning.py --prune-stale      # after editing a kernel: drop the picks it invalidated

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


class ShipError(Exception):
    """Bad input to the tool: said in one line, exit 2."""


def collect(cache_dir: Path | None, out: Path, sources: dict[str, str]) -> dict[str, int]:
    """Merge the picks under `cache_dir` (None: none, only drop the stale ones) into `out`; the counts."""
    from moeflow.kernels.autotune import SHIPPED_PICKS, ShippedPicks

    found = sorted(Path(cache_dir).expanduser().rglob("moeflow-*.autotune.json")) if cache_dir is not None else []
    if cache_dir is not None and not found:
        raise ShipError(
            f"no moeflow-*.autotune.json under {cache_dir}: nothing tuned there (pass the TRITON_CACHE_DIR "
            "of a GPU run); --out left as it was"
        )
    try:
        shipped = json.loads((out if out.exists() else SHIPPED_PICKS).read_text())
        if not out.exists():
            shipped["picks"] = []  # a new file: the shipped file's header, none of its picks
        picks = {ShippedPicks.identity(r): r for r in shipped.get("picks", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShipError(f"--out {out} is not a picks file ({e}); point --out at one, or at a new path") from None
    counts = {"added": 0, "replaced": 0, "unchanged": 0, "skipped": 0}
    for path in found:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(shipped, indent=1) + "\n")
    counts["dropped_stale"] = len(picks) - len(kept)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", help="the Triton cache dir the GPU run used")
    ap.add_argument(
        "--prune-stale",
        action="store_true",
        help="only drop shipped picks whose kernel code changed (no GPU run needed)",
    )
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[2] / "kernels" / "tuned_picks.json"), help="shipped picks"
    )
    args = ap.parse_args()
    try:
        if args.prune_stale == bool(args.cache_dir):
            raise ShipError("pass --cache-dir (collect a GPU run's picks) or --prune-stale (only drop stale ones)")
        counts = collect(Path(args.cache_dir) if args.cache_dir else None, Path(args.out), current_sources())
    except ShipError as e:
        raise SystemExit(f"ship_tuning: error: {e}") from None
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" -> {args.out}")


if __name__ == "__main__":
    main()
