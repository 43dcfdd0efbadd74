"""A residual mixed op's skip term (the convolutions' weights summed, times x) added inside the
fused sum's pointwise epilogue (``MixedOp.forward`` since 027bd30) against a second full-size pass
after it (``_fused_weighted_sum`` then ``add_weighted``, the code before): one residual neck mixed
op, 32 channels, 4 x 56 x 56 channels-last, forward + backward, one thread, median of 15
interleaved pairs; prints both times and their ratio (docs/BENCHMARKS.md).

    taskset -c 1 python bench/bench_residual_skip.py
"""
import time, torch, statistics
from autofpn.models.operations import MixedOp, NECK_OPS, _fused_weighted_sum
from autofpn.ops.pointwise import add_weighted
torch.set_num_threads(1); torch.manual_seed(0)
op = MixedOp(32, NECK_OPS, residual=True)
x0 = torch.randn(4, 32, 56, 56).contiguous(memory_format=torch.channels_last)
a = torch.randn(len(NECK_OPS), requires_grad=True)
def new():
    x = x0.clone().requires_grad_(); w = torch.softmax(a, 0)
    op(x, w).sum().backward()
def old():
    x = x0.clone().requires_grad_(); w = torch.softmax(a, 0)
    wi = w.index_select(0, op.op_index)
    skip = wi.masked_fill(~op.conv_mask, 0).sum()
    y = _fused_weighted_sum(op.kinds, list(op.ops.values()), x, wi)
    add_weighted(y, x, skip).sum().backward()
for f in (new, old): f()
t = {"new": [], "old": []}
for _ in range(15):
    for name, f in (("new", new), ("old", old)):
        s = time.perf_counter(); f(); t[name].append(time.perf_counter() - s)
m = {k: statistics.median(v) for k, v in t.items()}
print(f"median fwd+bwd: old {m['old']*1e3:.1f} ms, new {m['new']*1e3:.1f} ms, new/old {m['new']/m['old']:.3f}")
