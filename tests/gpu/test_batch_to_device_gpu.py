"""The training loop's batch copy does not wait for the GPU (a synchronising copy each step left the
GPU idle while the host did its per-step work)."""

import pytest
import torch

from moeflow.launch.runtime import batch_to_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_the_batch_arrives_whole_without_the_host_waiting_for_queued_work():
    device = torch.device("cuda")
    t = torch.randint(0, 50_000, (8, 2049))
    x, y = t[:, :-1], t[:, 1:]  # the samplers' views: not contiguous
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of queued GPU work: a synchronising copy would wait it out
    x_dev, y_dev = batch_to_device(device, x, y)
    assert not torch.cuda.current_stream().query()  # the host is back while the sleep still runs
    torch.cuda.synchronize()
    assert x_dev.is_cuda and torch.equal(x_dev.cpu(), x) and torch.equal(y_dev.cpu(), y)
    sent = x.clone()
    t.zero_()  # the host batch may be reused once copied: the device copy keeps what was sent
    assert torch.equal(x_dev.cpu(), sent)
