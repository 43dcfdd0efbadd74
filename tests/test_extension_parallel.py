"""The extension's CPU kernels run on torch's threads (built with OpenMP, setup.py)."""
import pytest
import torch

from autofpn.ops.extension import extension_has

pytestmark = pytest.mark.skipif(not extension_has("parallel_for_threads"), reason="autofpn._C not built")


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_for_splits_over_torchs_threads(threads):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert torch.ops.autofpn.parallel_for_threads(64) == threads
    finally:
        torch.set_num_threads(before)
