"""Suite-wide fixtures. Helpers live in tests/helpers/ (importable as `helpers.*`)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Tests run in parallel under xdist on 2 cores: one intra-op thread each avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
