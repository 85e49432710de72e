"""How large a model `moeflow train` fits on this GPU: a few real training steps per size, each in
its own process (an out-of-memory error ends only that try), printing total parameters and peak memory.

    python bench/tools/largest_model.py --layers 16 18 20 --ac full none -- extra.overrides=...

Shape: the OLMoE-like layer of `bench/RESULTS.md` (d_model 2048, 16 heads, 64 experts of hidden
1024, top-8), bytes of Python's standard library as data (vocab 256), seq 2048 x batch 4, AdamW.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPE = [
    "model.d_model=2048",
    "model.n_heads=16",
    "model.d_ff=1024",
    "model.num_experts=64",
    "model.top_k=8",
    "model.max_seq_len=2048",
    "data.seq_len=2048",
    "data.batch_size=4",
    "trainer.steps=3",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.ckpt_every=0",
    "trainer.progress=false",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[16, 18, 20])
    p.add_argument("--ac", nargs="+", default=["full"], help="trainer.activation_checkpointing values to try")
    p.add_argument("extra", nargs="*")
    a = p.parse_args()
    rows = []
    for ac in a.ac:
        for n in a.layers:
            overrides = [*SHAPE, f"model.n_layers={n}", f"trainer.activation_checkpointing={ac}", *a.extra]
            code = (
                "import json, sys, torch\n"
                "from hydra import compose, initialize_config_module\n"
                "from moeflow.launch.train import train\n"
                "with initialize_config_module(config_module='moeflow.configs', version_base=None):\n"
                "    cfg = compose(config_name='train', overrides=sys.argv[1:])\n"
                "from moeflow.launch.config import validate\n"
                "from moeflow.moe.model import Transformer\n"
                "with torch.device('meta'):\n"
                "    params = Transformer(validate(cfg)[0]).num_params()\n"
                "error = None\n"
                "try:\n"
                "    result, ok = train(cfg, __import__('pathlib').Path(__import__('tempfile').mkdtemp())), True\n"
                "except torch.OutOfMemoryError as e:\n"
                "    result, ok, error = {}, False, str(e).split('.')[0]\n"
                "print('RESULT ' + json.dumps({'ok': ok, 'params_B': params / 1e9, 'peak_gib': torch.cuda.max_memory_allocated() / 2**30,\n"
                "      'train_loss': result.get('train_loss'), 'error': error}))\n"
            )
            out = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            res = (
                json.loads(line[7:])
                if line
                else {"ok": False, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
            )
            row = {"layers": n, "activation_checkpointing": ac, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
