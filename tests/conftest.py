"""Suite-wide fixtures. Helpers live in tests/helpers/ (importable as `helpers.*`)."""

from __future__ import annotations

import getpass
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported, and some test modules (DeepSpeed's, the GPU
    # ones) import it while being collected: set it before any of them, for the kernel tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# torch.compile's cache stays shared across tests (its default place), whatever TMPDIR a test gets below;
# Ray keeps the machine's temp dir too (it follows TMPDIR, and its socket paths must stay under 108 bytes)
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
)
os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())


@pytest.fixture(scope="session", autouse=True)
def _session_temp_dir(tmp_path_factory):
    """The same for what session- and module-scoped fixtures start (they run before any test's own
    temp dir exists: a multi-process run shared by several tests, say)."""
    private = str(tmp_path_factory.mktemp("session_tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", private)
        mp.setattr(tempfile, "tempdir", private)
        yield


@pytest.fixture(autouse=True)
def _private_temp_dir(tmp_path_factory, monkeypatch):
    """The temp files of the code under test, and of the processes it starts (torchrun's torchelastic_*
    folders, rendezvous files), land in this test's own pytest temp dir, which pytest prunes: a suite
    run once left hundreds of folders in the machine's temp dir."""
    private = str(tmp_path_factory.mktemp("tmp"))
    monkeypatch.setenv("TMPDIR", private)
    monkeypatch.setattr(tempfile, "tempdir", private)


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Tests run in parallel under xdist on 2 cores: one intra-op thread each avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def pytest_sessionfinish(session):
    """Once, in the controlling process (not an xdist worker): stop the Slurm daemons the suite started."""
    if not hasattr(session.config, "workerinput"):
        from helpers.launch import stop_slurm_if_tests_started_it

        stop_slurm_if_tests_started_it()
