"""Autotune candidates for the grouped GEMMs, the shared-memory fit checks, and launch grids.

`MOEFLOW_AUTOTUNE=0` makes every kernel run its first candidate, untuned (no compile of the
others: a faster first step, e.g. for tests; slower steps after). Under Triton's CPU
interpreter (`TRITON_INTERPRET=1`) every kernel gets one small tile.

Tuned configs persist on disk (`persist_tuning`), so a new process skips the benchmark of every
shape a process on the same GPU already tuned: one small JSON per (kernel, tuning key) in Triton's
cache dir (`$TRITON_CACHE_DIR`, default `~/.triton/cache`: `<hash>/moeflow-<kernel>.autotune.json`).
The hash covers what Triton's own `cache_results=True` covers (the Triton build, the GPU target,
the kernel's source and dependencies, Triton's cache-invalidating env vars, the tuning key, which
holds the key arguments and the dtypes, and the candidate list) plus the GPU's name and SM count
(an H100 and an H200 share sm_90 but not their best tiles) and this file (its prune rules).
Triton's own option (Triton >= 3.4) cannot be used here: it caches nothing for candidates with a
`pre_hook`, and every candidate here has one (it sets the TMA descriptors' boxes).
`MOEFLOW_AUTOTUNE_CACHE=0` turns the disk cache off (tune in every process, as before); deleting
the files forces a retune. Nothing is cached under the interpreter or with `MOEFLOW_AUTOTUNE=0`
(a single candidate is never tuned).

A machine's first run need not tune either: `tuned_picks.json` beside this file ships picks made on
lent GPUs at the preset shapes (`bench/tools/ship_tuning.py` collects them from a Triton cache dir).
A shipped pick is used on a disk-cache miss only when the GPU's name and SM count, the Triton version,
the kernel's code (`tuning_digest`: its module, its descriptor hooks, the prune rules) and the tuning
key all match and the pick is one of the kernel's current candidates; anything else is tuned as before. `MOEFLOW_AUTOTUNE_SHIPPED=0` ignores the shipped picks.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from pathlib import Path

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("MOEFLOW_AUTOTUNE", "1") != "0"
CACHE = os.environ.get("MOEFLOW_AUTOTUNE_CACHE", "1") != "0"
SHIPPED = os.environ.get("MOEFLOW_AUTOTUNE_SHIPPED", "1") != "0"
SHIPPED_PICKS = Path(__file__).with_name("tuned_picks.json")

log = logging.getLogger("moeflow.kernels")


def candidate_configs(shapes, hook=None):
    """Autotune candidates for Hopper; one small config under the CPU interpreter.

    A shape is (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent]). `hook` sets the TMA
    descriptors' box shapes from the candidate's tile shape. Under the interpreter the
    persistent loop is the one exercised (a few programs walk all tiles).
    """
    if INTERPRET:
        return [
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "PERSISTENT": True},
                num_warps=4,
                num_stages=1,
                pre_hook=hook,
            )
        ]
    if not AUTOTUNE:
        shapes = shapes[:1]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": bool(p[0]) if p else False},
            num_warps=w,
            num_stages=s,
            pre_hook=hook,
        )
        for bm, bn, bk, w, s, *p in shapes
    ]


# ----------------------------------------------------------------------------- tuned configs on disk
def _gpu_target() -> str:
    """What a tuned config depends on beyond the kernel: Triton's compile target (arch, ptxas) and the GPU model."""
    parts = []
    try:
        from triton.compiler.compiler import make_backend
        from triton.runtime.driver import driver

        parts.append(make_backend(driver.active.get_current_target()).hash())
    except Exception as e:  # noqa: BLE001  (an internal of Triton's; the GPU's name below still keys the file)
        log.debug("autotune cache: no Triton target hash (%s)", e)
    if torch.cuda.is_available():
        parts.append(_gpu_name())
    return " | ".join(parts)


def _gpu_name() -> str:
    """The GPU a pick was tuned on: its model and SM count (an H100 and an H200 share sm_90 but not their best tiles)."""
    if not torch.cuda.is_available():
        return ""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name} sm_{props.major}{props.minor} {props.multi_processor_count} SMs"


def _python_fn(kernel):
    """The plain Python function under an Autotuner / JITFunction's wrappers."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def tuning_digest(kernel) -> str:
    """What a shipped pick was tuned for, beyond the GPU and the key: the text of the kernel's module
    and of its candidates' pre_hook module (helpers, descriptor boxes), and of the prune and key rules
    below. Line numbers and other files do not count (Triton's own cache_key counts line numbers)."""
    fn = _python_fn(kernel)
    parts = []
    hooks = [c.pre_hook for c in getattr(kernel, "configs", []) if c.pre_hook is not None]
    for obj in [fn, *hooks[:1]]:
        try:
            parts.append(Path(inspect.getsourcefile(obj)).read_text())
        except (OSError, TypeError):
            parts.append(getattr(obj, "src", "") or "")
    parts += [inspect.getsource(f) for f in (fits_one, _keep_fitting, fits_gmm, fits_wgrad, even_k, m_bucket)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _kernel_source_key(kernel) -> str:
    fn = kernel
    while not hasattr(fn, "cache_key") and hasattr(fn, "fn"):
        fn = fn.fn
    try:
        return str(fn.cache_key)  # the JIT function's source and its dependencies, as Triton keys compiles
    except Exception:  # noqa: BLE001
        import inspect

        return hashlib.sha256(inspect.getsource(getattr(kernel, "base_fn", fn)).encode()).hexdigest()


def _kernel_name(kernel) -> str:
    return getattr(_python_fn(kernel), "__name__", "kernel")[:150]


def _base_key(kernel, target: str) -> list[str]:
    """Everything but the tuning key: Triton build, target, source, env, this file (prune rules), candidates."""
    try:
        from triton.runtime.cache import triton_key

        version = triton_key()
    except Exception:  # noqa: BLE001
        version = triton.__version__
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars

        env = str(sorted(get_cache_invalidating_env_vars().items()))
    except Exception:  # noqa: BLE001
        env = ""
    with open(__file__, "rb") as f:  # the candidates' prune rules (fits_*) live here
        rules = hashlib.sha256(f.read()).hexdigest()
    return [version, target, _kernel_source_key(kernel), env, rules, *map(str, kernel.configs)]


def _config_record(config) -> dict:
    return {
        "kwargs": config.kwargs,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "num_ctas": getattr(config, "num_ctas", 1),
        "maxnreg": getattr(config, "maxnreg", None),
    }


class DiskCache(dict):
    """An autotuner's best-config cache (tuning key -> Config) that also lives on disk.

    Triton's `Autotuner.run` asks `key in self.cache` before it benchmarks and stores its pick with
    `self.cache[key] = config`: a miss here reads the file that key names (and hands back the
    kernel's own candidate, so its pre_hook stays), a store writes it. Any failure to read or write
    leaves the tuning in memory only, as without the cache.
    """

    def __init__(self, kernel, target=_gpu_target, gpu=_gpu_name, shipped: ShippedPicks | None = None):
        super().__init__()
        self.kernel, self.target, self.gpu, self.name = kernel, target, gpu, _kernel_name(kernel)
        self.shipped = shipped if shipped is not None else (ShippedPicks(SHIPPED_PICKS) if SHIPPED else None)
        self._base: list[str] | None = None

    def _manager(self, key):
        from triton.runtime.cache import get_cache_manager

        if self._base is None:
            self._base = _base_key(self.kernel, self.target())
        digest = hashlib.sha256("-".join([*self._base, str(key)]).encode()).hexdigest()
        return get_cache_manager(digest), f"moeflow-{self.name}.autotune.json"

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        config = self._from_disk(key) or self._shipped(key)
        if config is None:
            return False
        dict.__setitem__(self, key, config)
        return True

    def _candidate(self, record: dict | None):
        """The kernel's own candidate equal to a stored pick (its pre_hook kept), or None."""
        if not record:
            return None
        return next((c for c in self.kernel.configs if _config_record(c) == record), None)

    def _from_disk(self, key):
        try:
            manager, filename = self._manager(key)
            path = manager.get_file(filename)
            if path is None:
                return None
            with open(path) as f:
                stored = json.load(f)
            if stored.get("key") != [str(k) for k in key]:
                return None
            return self._candidate(stored.get("best"))
        except Exception as e:  # noqa: BLE001
            log.debug("autotune cache: %s not read (%s)", self.name, e)
            return None

    def _shipped(self, key):
        if self.shipped is None:
            return None
        record = self.shipped.get(
            self.name, tuning_digest(self.kernel), self.gpu(), [str(k) for k in key], triton.__version__
        )
        config = self._candidate(record)
        if config is not None:
            log.info("autotune: %s uses the pick shipped for %s (no tuning)", self.name, self.gpu())
        return config

    def __setitem__(self, key, config) -> None:
        dict.__setitem__(self, key, config)
        try:
            manager, filename = self._manager(key)
            manager.put(
                json.dumps(
                    {
                        "kernel": self.name,
                        "target": self.target(),
                        "gpu": self.gpu(),  # these two let bench/tools/ship_tuning.py ship the pick
                        "source": tuning_digest(self.kernel),
                        "triton": triton.__version__,
                        "key": [str(k) for k in key],
                        "best": _config_record(config),
                    }
                ),
                filename,
                binary=False,
            )
        except Exception as e:  # noqa: BLE001
            log.debug("autotune cache: %s not written (%s)", self.name, e)


class ShippedPicks:
    """The tuned picks shipped in `tuned_picks.json`, read once on first use; a missing or damaged
    file ships nothing (every kernel tunes, as without it)."""

    def __init__(self, path: Path):
        self.path, self._picks = Path(path), None

    @staticmethod
    def identity(record: dict) -> tuple:
        return record["kernel"], record["source"], record["gpu"], tuple(record["key"]), record["triton"]

    def get(self, kernel: str, source: str, gpu: str, key: list[str], triton_version: str) -> dict | None:
        if self._picks is None:
            try:
                records = json.loads(self.path.read_text()).get("picks", [])
                self._picks = {self.identity(r): r["best"] for r in records}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.debug("autotune: no shipped picks from %s (%s)", self.path, e)
                self._picks = {}
        return self._picks.get((kernel, source, gpu, tuple(key), triton_version))


def persist_tuning(*kernels) -> None:
    """Give each `@triton.autotune` kernel an on-disk cache of its tuned configs (module docstring)."""
    if INTERPRET or not AUTOTUNE or not CACHE:
        return
    for kernel in kernels:
        if isinstance(getattr(kernel, "cache", None), dict) and not isinstance(kernel.cache, DiskCache):
            kernel.cache = DiskCache(kernel)


def force_tiles(kernel, shape) -> None:
    """Make an autotuned kernel run exactly one (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent])
    candidate, keeping its descriptor-box hook: for tile sweeps and tests of every candidate.
    A single candidate skips the autotuner's prune, so it must fit the kernel's use."""
    kernel.configs = candidate_configs([shape], kernel.configs[0].pre_hook)
    kernel.cache.clear()


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent]): few candidates, each costs a compile on first use
PERSISTENT = True  # persistent: one program per SM walks the tiles
# `up` stays one program per tile: persistent, its two accumulators and three stores ran 15-20%
# slower (bench/RESULTS.md), so it has no persistent candidate.
UP_SHAPES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 6), (64, 128, 64, 4, 4)]
GMM_SHAPES = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 256, 32, 8, 6),
    (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3, PERSISTENT),
    (128, 256, 64, 8, 4, PERSISTENT),
    (128, 256, 32, 8, 6, PERSISTENT),
]
# Row-gathered operands (gather_rows) get one shared-memory buffer fewer than num_stages asks
# for (the index load takes a pipeline stage), hence the deeper candidates. Two B operands
# (dW1 + dW3) fit only 128 x 128 tiles (`fits_one`); one (dW2) runs best at 128 x 256.
WGRAD_SHAPES = [
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 5),
    (256, 128, 32, 8, 6),
    (128, 128, 32, 8, 6),
    (128, 128, 64, 8, 4, PERSISTENT),
    (128, 256, 64, 8, 4, PERSISTENT),
]
# An aligned layout pads every expert's rows to a multiple of ROW_ALIGN, so that wgrad's row chunks
# (BLOCK_K, which divides it) never cross into the next expert: `wgrad(aligned=True)`.
ROW_ALIGN = 64
assert all(ROW_ALIGN % shape[2] == 0 for shape in WGRAD_SHAPES)


def fits_one(m: int, n: int, k: int, stages: int, two: bool, staged_epilogue: bool = False) -> bool:
    """Pipelined tiles within Hopper's 227 KiB of shared memory, and fp32 accumulators within
    128 x 256 per program (beyond that they spill). `two`: wgrad's two B tiles and two accumulators.
    `staged_epilogue`: a loop that runs the next tile's loads under this tile's stores (persistent
    gmm) stages its epilogue through 32 KiB more (measured from sm_90 compiles)."""
    b_tiles = 2 if two else 1
    smem = (m * k + b_tiles * k * n) * 2 * stages + (32 * 1024 if staged_epilogue else 0)
    return smem <= 226 * 1024 and b_tiles * m * n <= 128 * 256


def _keep_fitting(configs, two: bool, staged):
    keep = [
        c
        for c in configs
        if fits_one(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, two, staged(c))
    ]
    return keep or configs[-1:]


def fits_gmm(configs, named_args, **kwargs):
    """Autotune prune for `gmm` (one B tile per stage: TWO runs two loops in sequence)."""
    return _keep_fitting(configs, False, lambda c: c.kwargs["PERSISTENT"])


def fits_wgrad(configs, named_args, **kwargs):
    """Autotune prune for `wgrad` (TWO: two B tiles per stage)."""
    return _keep_fitting(configs, kwargs.get("TWO", named_args.get("TWO", False)), lambda c: False)


def even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


# ----------------------------------------------------------------------------- launch grids
def e_pow2(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def m_bucket(A: int) -> int:
    """Autotune key for the row count: powers of two, so retuning happens rarely."""
    return triton.next_power_of_2(max(A, 1))


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each walking several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def grid_for(tiles, device: torch.device):
    """Programs for a launch: one per tile (`tiles(meta)`, an upper bound is fine: extra
    programs find no tile), or at most one per SM for a persistent candidate."""
    sms = num_sms(device)

    def grid(meta):
        n = tiles(meta)
        return (min(n, sms) if meta["PERSISTENT"] else n,)

    return grid


def m_grid(A: int, E: int, N: int, device: torch.device):
    """`up` / `gmm`: (row block, column block) tiles, at most the row blocks of E experts holding A rows."""
    return grid_for(lambda meta: (triton.cdiv(A, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]), device)
