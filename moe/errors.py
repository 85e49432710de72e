"""The one error convention: a problem the user can fix, said in one line that names the fix.

Every layer raises a `MoeflowError` (or a subclass naming the area) for bad input; the
`moeflow` CLI catches it and prints `moeflow <command>: error: <message>`, exit code 2
(`exit_code` says otherwise). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoeflowError(ValueError):
    """Bad input or state the user can fix; the message is one line and names the fix."""

    exit_code = 2


class ConfigError(MoeflowError):
    """A configuration value or combination that cannot run."""


class CheckpointError(MoeflowError):
    """A checkpoint that is missing, corrupt, untrusted or from another model."""


class DataError(MoeflowError):
    """Training data that is missing, empty or does not fit the model."""


class ConversionError(MoeflowError):
    """A checkpoint that does not map between moeflow and another format (Hugging Face, megatron-core)."""


def need(cond: bool, msg: str, error: type[MoeflowError] = ConfigError) -> None:
    """Raise `error(msg)` unless `cond`: the one-line check every config validation uses."""
    if not cond:
        raise error(msg)


class RunFailed(MoeflowError):
    """A launched run or job that failed or did not finish; its logs say more (exit code 1)."""

    exit_code = 1


class Interrupted(MoeflowError):
    """The run was stopped by Ctrl-C or SIGTERM after saving a checkpoint (exit code 130, as for SIGINT)."""

    exit_code = 130
