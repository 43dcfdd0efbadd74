"""autofpn.ops.pooling.max_pool2d: the separable CPU max pool equals torch's max_pool2d."""
import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from autofpn.models.backbone import Backbone
from autofpn.ops.pooling import max_pool2d


@pytest.mark.parametrize("shape", [(2, 64, 160, 240), (1, 3, 17, 9), (2, 5, 2, 3), (1, 1, 1, 1)])
@pytest.mark.parametrize("kernel_stride_padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (1, 2, 0)])
def test_separable_max_pool_equals_torch(shape, kernel_stride_padding):
    k, s, p = kernel_stride_padding
    if min(shape[-2:]) + 2 * p < k:
        return
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0] = float("nan")  # max_pool2d propagates NaN; so must the separable one
    x.view(-1)[1 % x.numel()] = float("-inf")
    ours, theirs = max_pool2d(x, k, s, p), F.max_pool2d(x, k, s, p)
    assert ours.shape == theirs.shape and ours.is_contiguous()
    assert torch.equal(ours.nan_to_num(nan=7.0), theirs.nan_to_num(nan=7.0))
    assert torch.equal(ours.isnan(), theirs.isnan())


def test_float64_and_ties_equal_torch():
    x = torch.randint(0, 3, (2, 4, 11, 12)).double()  # many ties
    assert torch.equal(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))


def test_gradient_and_other_layouts_take_torchs_pool():
    """Where a gradient flows the result and its backward are torch's (a tie's gradient to one
    input), and channels-last input comes back channels-last, as from max_pool2d."""
    x = torch.ones(1, 2, 6, 6, requires_grad=True)  # every window a tie
    max_pool2d(x, 3, 2, 1).sum().backward()
    expected = torch.ones(1, 2, 6, 6, requires_grad=True)
    F.max_pool2d(expected, 3, 2, 1).sum().backward()
    assert torch.equal(x.grad, expected.grad)
    cl = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    out = max_pool2d(cl, 3, 2, 1)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, F.max_pool2d(cl, 3, 2, 1))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_resnet_stem_uses_it_with_the_same_features():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", "none", frozen_stages=1).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        with _OpNames() as ops:
            ours = backbone(x)
        assert "max_pool2d_with_indices" not in ops.names and "maximum" in ops.names
        b = backbone.body
        y = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        for i, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4)):
            y = layer(y)
            assert torch.equal(ours[f"c{i + 2}"], y)


def test_a_padding_torch_refuses_is_refused_alike():
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        max_pool2d(torch.randn(1, 2, 8, 8), 3, 2, 2)
