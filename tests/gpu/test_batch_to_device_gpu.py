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
    sent_x, sent_y = x.clone(), y.clone()
    x_dev, y_dev = batch_to_device(device, x, y)
    assert not torch.cuda.current_stream().query()  # the host is back while the sleep still runs
    t.zero_()  # the sampler's buffer reused while the copies are still queued: they must keep what was sent
    torch.cuda.synchronize()
    assert x_dev.is_cuda and torch.equal(x_dev.cpu(), sent_x) and torch.equal(y_dev.cpu(), sent_y)
