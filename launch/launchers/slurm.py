"""`moeflow slurm submit|status|cancel|logs`: a thin layer over sbatch/squeue/scontrol/scancel.

`submit` composes the Hydra config, renders the sbatch script from a Jinja template in
`slurm/` (`launcher.template`), and hands it to `sbatch`. Hydra multirun (`-m a=1,2 b=x,y`)
becomes a job array, one task per combination.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jinja2
from omegaconf import DictConfig, OmegaConf

from moeflow.moe.errors import ConfigError, RunFailed

from .common import compose, without_launcher

TEMPLATE_DIR = Path(str(importlib.resources.files("moeflow.slurm")))  # the repo's slurm/, shipped as package data


class SlurmError(ConfigError):
    """A Slurm problem the user can fix; printed as one line."""


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SlurmError(
            f"`{tool}` is not on PATH: run this on a Slurm login node, or install the Slurm client "
            f"(Debian/Ubuntu: apt-get install slurm-client) and add it to PATH"
        )
    return path


def slurm_args(args: list[str]) -> list[str]:
    """Overrides for composing: `launcher=slurm` unless given; `launcher=ray` means Ray on Slurm."""
    if "launcher=ray" in args:
        args = [a for a in args if a != "launcher=ray"] + ["launcher=slurm", "launcher.template=ray"]
    if not any(a.startswith("launcher=") for a in args):
        args = ["launcher=slurm", *args]
    return args


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's own multirun expansion (BasicSweeper): the cartesian product of `a=1,2 b=x,y`."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
        raise ConfigError(f"cannot parse the sweep overrides: {' '.join(str(e).split())}") from None
    return BasicSweeper.split_arguments(parsed, None)[0]


# What each launcher field may hold before it reaches an sbatch script. #SBATCH lines take no
# quoting, so values that land there must be single tokens of safe characters; values that land
# in the shell body are quoted (shlex) by `render`. A value outside its pattern is refused.
SAFE_TOKEN = re.compile(r"^[A-Za-z0-9._:@%+=,/~-]+$")
JOB_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._:@%+=,~-]+$")  # also a file name under output_root: one path component
FIELD_PATTERNS = {
    "job_name": JOB_NAME,
    "partition": SAFE_TOKEN,
    "account": SAFE_TOKEN,
    "qos": SAFE_TOKEN,
    "constraint": re.compile(r"^[A-Za-z0-9._:@%+=,/|&*\[\]()!-]+$"),
    "mem": re.compile(r"^[0-9]+[KMGT]?$"),
    "time": re.compile(r"^[0-9]+(-[0-9]{1,2})?(:[0-9]{1,2}){0,2}$|^(?i:unlimited|infinite)$"),
    "output_root": SAFE_TOKEN,
}
INT_FIELDS = {
    "nodes": 1,
    "nproc_per_node": 1,
    "gpus_per_node": 0,
    "cpus_per_task": 1,
    "signal_seconds": 1,
    "rdzv_port": 1,
    "ray_port": 1,
    "ray_wait_s": 1,
}
BOOL_FIELDS = ("exclusive", "requeue")


def check_launcher(s: DictConfig) -> None:
    """Every field typed and every value safe for where it lands in the script; one line per problem."""
    for name, low in INT_FIELDS.items():
        v = s.get(name)
        if v is None and name in ("cpus_per_task", "rdzv_port", "ray_port"):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"launcher.{name} must be an integer >= {low}, got {v!r}")
    for name in BOOL_FIELDS:
        if not isinstance(s.get(name), bool):
            raise ConfigError(f"launcher.{name} must be true or false, got {s.get(name)!r}")
    for name, pattern in FIELD_PATTERNS.items():
        v = s.get(name)
        if v in (None, ""):
            continue
        if not isinstance(v, str) or not pattern.match(v):
            raise ConfigError(
                f"launcher.{name}={v!r} is not a valid value: it lands in an #SBATCH line, which takes one token of "
                f"letters, digits and ._:@%+=,/~- (no spaces, quotes, newlines or $; a job_name also no / and not . or ..); pick another value"
            )
    for i, line in enumerate(s.extra_sbatch):
        if not isinstance(line, str) or not re.match(r"^--?[A-Za-z][A-Za-z0-9-]*(=\S+)?$", line):
            raise ConfigError(
                f"launcher.extra_sbatch[{i}]={line!r} is not one sbatch option: write it as --name or --name=value, without spaces or newlines"
            )
    for name, v in (("srun_args", s.srun_args), ("python", s.python)):
        if v is not None and ("\n" in str(v) or "\r" in str(v)):
            raise ConfigError(f"launcher.{name} holds a newline; write it on one line")
    try:
        words = shlex.split(str(s.srun_args or ""))
    except ValueError as e:
        raise ConfigError(
            f"launcher.srun_args={s.srun_args!r} cannot be split into words ({e}); quote it as a shell would"
        ) from None
    stray = [w for w in words if not w.startswith("-")]
    if stray:  # a bare word would become srun's program, ahead of the training command
        raise ConfigError(
            f"launcher.srun_args takes srun options only, each written --name=value; {stray[0]!r} is not an option"
        )
    for i, line in enumerate(s.setup):
        if not isinstance(line, str) or "\n" in line:
            raise ConfigError(
                f"launcher.setup[{i}] must be one shell line (a string without newlines); give several lines as several items"
            )


def sbatch_lines(s: DictConfig, array: int | None) -> list[str]:
    log = "%A_%a.out" if array else "%j.out"
    lines = [f"--output={Path(str(s.output_root)).resolve()}/{log}", f"--time={s.time}"]
    options = {
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
        "cpus-per-task": s.cpus_per_task,
        "mem": s.mem,
    }
    lines += [f"--{k}={v}" for k, v in options.items() if v not in (None, "")]
    if int(s.gpus_per_node) > 0:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.exclusive:
        lines.append("--exclusive")
    if s.requeue:
        lines += ["--requeue", "--open-mode=append", f"--signal=B:USR1@{s.signal_seconds}"]
    if array:
        lines.append(f"--array=0-{array - 1}")
    return lines + [str(x) for x in s.extra_sbatch]


def template_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.suffix or "/" in name:
        if not p.is_file():
            raise ConfigError(
                f"launcher.template={name}: no such file; use torchrun, srun, ray or a path to a Jinja sbatch template"
            )
        return p.resolve()
    p = TEMPLATE_DIR / f"{name}.sbatch.j2"
    if not p.is_file():
        known = sorted(t.name.removesuffix(".sbatch.j2") for t in TEMPLATE_DIR.glob("*.sbatch.j2"))
        raise ConfigError(
            f"launcher.template={name}: unknown template; choose one of {', '.join(known)} or give a path"
        )
    return p


def job_python(s: DictConfig) -> str:
    """The interpreter the job runs: launcher.python; else `python3` as `launcher.setup` leaves it on
    PATH (a venv or module it activates); else, with no setup, the one running this command."""
    if s.python:
        return str(s.python)
    return "python3" if list(s.setup) else sys.executable


def render(s: DictConfig, train_args: list[str], sweep_file: Path | None = None, array: int | None = None) -> str:
    path = template_path(str(s.template))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(path.parent), str(TEMPLATE_DIR)]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
    )
    context = {k: v for k, v in OmegaConf.to_container(s, resolve=True).items() if k != "vars"}
    context.update(OmegaConf.to_container(s.vars, resolve=True))
    check_launcher(s)
    srun_args = shlex.join(shlex.split(str(s.srun_args or "")))  # its arguments, each quoted: no command can ride along
    context.update(
        sbatch=sbatch_lines(s, array),
        python=shlex.quote(job_python(s)),
        srun_args=srun_args,
        job_name=str(s.job_name),
        output_root=shlex.quote(str(Path(str(s.output_root)).resolve())),
        train_args=shlex.join(train_args),
        sweep_file=shlex.quote(str(sweep_file)) if sweep_file else "",
        setup=list(s.setup),
    )
    try:
        return env.get_template(path.name).render(**context)
    except jinja2.UndefinedError as e:
        name = re.search(r"'(\w+)' is undefined", str(e))
        var = name.group(1) if name else str(e)
        raise ConfigError(
            f"template {path} uses the variable '{var}', which the launcher config does not set: "
            f"pass +launcher.vars.{var}=VALUE (or remove it from the template)"
        ) from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"template {path}: {e}") from None


def prepare(args: list[str], multirun: bool) -> tuple[DictConfig, list[str], list[list[str]] | None]:
    """(slurm config, training overrides, sweep combinations or None), all checked before submitting."""
    args = slurm_args(args)
    train = [a for a in without_launcher(args) if not a.startswith("hydra.run.dir=")]
    combos = expand_sweep(train) if multirun else None
    launcher_args = [a for a in args if a.startswith("launcher")]
    cfg = compose(args if not combos else [*launcher_args, *combos[0]])
    if cfg.launcher.name != "slurm":
        raise ConfigError(f"`moeflow slurm submit` needs launcher=slurm (got launcher={cfg.launcher.name})")
    from ..preflight import check_training_config

    check_launcher(cfg.launcher)  # its own fields first: the training checks read some (nodes, processes)
    for i, combo in enumerate(
        combos or [train]
    ):  # the checks `moeflow train` runs, on every job before any is submitted
        try:
            check_training_config([*launcher_args, *combo])
        except ConfigError as e:
            raise ConfigError(f"sweep point {i} ({shlex.join(combo)}): {e}" if combos else str(e)) from None
    if not any(a.startswith("resume=") for a in train):
        train.append("resume=auto")  # a requeued job continues from its last checkpoint
    return cfg.launcher, train, combos


def write_sweep(folder: Path, tasks: list[list[str]]) -> None:
    """Array task i's overrides in folder/i.args, NUL-separated: the job script reads them with bash's
    `mapfile -d ''` as plain words, so a value holding newlines, quotes or `$(...)` stays one word."""
    folder.mkdir(parents=True)
    for i, words in enumerate(tasks):
        (folder / f"{i}.args").write_bytes(b"".join(w.encode() + b"\0" for w in words))


def submit(args: list[str], dry_run: bool = False, multirun: bool = False) -> int:
    s, train, combos = prepare(args, multirun)
    root = Path(str(s.output_root)).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_file = (
        root / "sbatch" / f"{s.job_name}-{stamp}.sweep" if combos else None
    )  # a folder: task i's overrides in i.args
    script = render(s, [] if combos else train, sweep_file, len(combos) if combos else None)
    resume = [a for a in train if a.startswith("resume=")]
    sweep_lines = [shlex.join([*c, *resume]) for c in combos] if combos else []
    if dry_run:
        print(script, end="")
        for i, line in enumerate(sweep_lines):
            print(f"# array task {i}: {line}", file=sys.stderr)
        return 0
    sbatch = require("sbatch")
    (root / "sbatch").mkdir(parents=True, exist_ok=True)
    path = root / "sbatch" / f"{s.job_name}-{stamp}.sbatch"
    path.write_text(script)
    if sweep_file:
        write_sweep(sweep_file, [[*c, *resume] for c in combos])
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"sbatch rejected {path}: {done.stderr.strip()}")
    job = done.stdout.strip().split(";")[0]
    log = root / (f"{job}_*.out" if combos else f"{job}.out")
    print(f"submitted job {job}" + (f" (array of {len(combos)})" if combos else ""))
    print(f"log: {log}")
    print(f"run dir: {root / (job + '_<task>' if combos else job)}")
    print(f"script: {path}")
    return 0


def submit_from_train(args: list[str]) -> int:
    """`moeflow train launcher=slurm ...` is the same as `moeflow slurm submit ...`."""
    return submit(args)


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (works without accounting, for recent jobs)."""
    done = subprocess.run([require("scontrol"), "show", "job", "-o", job], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return {}
    first = done.stdout.strip().splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", first))


def status(job: str) -> int:
    out = subprocess.run([require("squeue"), "-h", "-j", job, "-o", "%i %T %M %R"], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    if lines:
        for line in lines:
            jid, state, elapsed, where = (line.split(None, 3) + ["", "", ""])[:4]
            print(f"job {jid}: {state} (elapsed {elapsed}, {where})")
        return 0
    info = job_info(job)
    if not info:
        raise RunFailed(
            f"job {job} is not known to Slurm (finished jobs are forgotten after MinJobAge; check `moeflow slurm logs {job}`)"
        )
    print(
        f"job {job}: {info.get('JobState', '?')} (exit code {info.get('ExitCode', '?')}, elapsed {info.get('RunTime', '?')})"
    )
    return 0


def cancel(job: str) -> int:
    done = subprocess.run([require("scancel"), job], capture_output=True, text=True)
    if done.returncode != 0:
        raise RunFailed(f"scancel {job}: {done.stderr.strip()}")
    print(f"cancelled job {job}")
    return 0


def log_path(job: str) -> Path | None:
    out = job_info(job).get("StdOut")
    if out:
        return Path(out)
    found = sorted(Path(str(compose(["launcher=slurm"]).launcher.output_root)).glob(f"{job}*.out"))
    return found[0] if found else None


def logs(job: str, follow: bool) -> int:
    path = log_path(job)
    if path is None or not path.exists():
        raise RunFailed(
            f"no log for job {job} (looked at {path or 'scontrol and ' + 'outputs/slurm'}); it may not have started yet"
        )
    with open(path) as f:
        while True:
            chunk = f.read()
            sys.stdout.write(chunk)
            sys.stdout.flush()
            if not follow or job_info(job).get("JobState", "COMPLETED") not in (
                "PENDING",
                "RUNNING",
                "CONFIGURING",
                "COMPLETING",
                "REQUEUED",
            ):
                sys.stdout.write(f.read())
                return 0
            time.sleep(1.0)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moeflow slurm", description="Run moeflow training on a Slurm cluster.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "submit",
        help="render the sbatch script from config and submit it",
        description="Hydra overrides follow, e.g. launcher.nodes=2 launcher.gpus_per_node=8 trainer.steps=1000",
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("-m", "--multirun", action="store_true", help="sweep (a=1,2 b=x,y) as a job array")
    p.add_argument("overrides", nargs="*")
    for name, help_ in (("status", "show a job's state"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=help_).add_argument("job")
    p = sub.add_parser("logs", help="print a job's log")
    p.add_argument("job")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    a = parser.parse_args(argv)
    if a.cmd == "submit":
        submit(a.overrides, a.dry_run, a.multirun)
    elif a.cmd == "status":
        status(a.job)
    elif a.cmd == "cancel":
        cancel(a.job)
    else:
        logs(a.job, a.follow)
