"""`moeflow prepare deepspeed-ops`: build now what a run would otherwise build on its first step.

DeepSpeed JIT-compiles its CPU communication op the first time a run uses it (about a minute,
silent, on every rank at once). Building it here first makes that first run start at once, and
clears a build lock that a killed build left behind (see `engines.deepspeed_engine.build_ops`).
The build lands in torch's extension dir (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions).
"""

from __future__ import annotations

import argparse

from .engines import require

WHAT = ("deepspeed-ops",)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="moeflow prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=WHAT)
    p.parse_args(argv)
    require("deepspeed")
    from .engines.deepspeed_engine import build_ops

    built = build_ops()
    print(f"moeflow: DeepSpeed ops ready: {', '.join(built) or 'none needed on this accelerator'}")
