"""Suite-wide fixtures. Helpers live in tests/helpers/ (importable as `helpers.*`)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported, and some test modules (DeepSpeed's, the GPU
    # ones) import it while being collected: set it before any of them, for the kernel tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
