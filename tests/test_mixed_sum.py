"""Fused mixed sum (autofpn._C, cuda_ext/) against a float64 ground truth, plus its autograd,
fake (torch.compile) registration, input validation and the pure PyTorch fallback."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from autofpn.ops.mixed_sum import MAX_MIXED_INPUTS, backend_name, mixed_sum, reference_mixed_sum

# Unless the build was told to skip it, the extension must be built and in use.
EXTENSION_EXPECTED = os.environ.get("AUTOFPN_NO_EXT") != "1"
needs_extension = pytest.mark.skipif(backend_name() != "extension", reason="autofpn._C not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Absolute tolerance on values of order 1 (inputs ~N(0,1), weights softmaxed) for each dtype.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def ground_truth(xs, w, grad_out):
    """out, grad_xs, grad_w in float64."""
    xs64 = [x.double() for x in xs]
    w64, g64 = w.double(), grad_out.double()
    out = sum(w64[k] * x for k, x in enumerate(xs64))
    grad_xs = [w64[k] * g64 for k in range(len(xs))]
    grad_w = torch.stack([(g64 * x).sum() for x in xs64])
    return out, grad_xs, grad_w


def run_forward_backward(fn, xs, w, grad_out):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    w = w.detach().clone().requires_grad_()
    out = fn(xs, w)
    out.backward(grad_out)
    return out, [x.grad for x in xs], w.grad


def make_inputs(shape, num_inputs, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(num_inputs)]
    w = torch.softmax(torch.randn(num_inputs, generator=gen, dtype=torch.float64), 0).to(device, dtype)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return xs, w, grad_out


def assert_matches_ground_truth(fn, xs, w, grad_out):
    dtype = xs[0].dtype
    tol = TOLERANCE[dtype]
    out, grad_xs, grad_w = run_forward_backward(fn, xs, w, grad_out)
    ref_out, ref_grad_xs, ref_grad_w = ground_truth(xs, w, grad_out)
    assert out.dtype == dtype and out.shape == xs[0].shape
    # Inputs and weights are rounded to dtype already, so the only error is the kernel's.
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=tol)
    for k, (grad, ref) in enumerate(zip(grad_xs, ref_grad_xs)):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=tol, msg=lambda m: f"grad xs[{k}]: {m}")
    # grad_w is a sum of numel products: its error grows with sqrt(numel) of the terms' scale.
    dot_atol = tol * max(1.0, grad_out.numel() ** 0.5)
    torch.testing.assert_close(grad_w.double(), ref_grad_w, rtol=tol, atol=dot_atol)


def test_backend_is_the_extension_when_built():
    built = importlib.util.find_spec("autofpn._C") is not None
    if built:  # a built library must load, whatever AUTOFPN_NO_EXT says now
        assert backend_name() == "extension"
    else:
        assert not EXTENSION_EXPECTED, "autofpn._C is not built; run `make ext` (or set AUTOFPN_NO_EXT=1)"
        assert backend_name() == "reference"


def _cuda_toolkit_present():
    """nvcc plus a toolkit root with libcudart: then setup.py must have compiled the CUDA kernel."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None and any(
        root and glob.glob(os.path.join(root, lib, "libcudart.so*")) for root in roots for lib in ("lib64", "lib"))


@needs_extension
def test_cuda_kernel_is_compiled_in_when_nvcc_is_present():
    if not _cuda_toolkit_present():
        pytest.skip("no nvcc / CUDA toolkit: the extension is CPU-only")
    for op in ("autofpn::mixed_sum", "autofpn::mixed_sum_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"


SHAPES = [(5,), (3, 7), (2, 3, 5, 7), (3, 50, 701)]  # the last spans several CPU chunks + a tail


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_ground_truth(shape, dtype):
    for num_inputs in (1, 2, 7):
        xs, w, grad_out = make_inputs(shape, num_inputs, dtype, seed=num_inputs)
        assert_matches_ground_truth(mixed_sum, xs, w, grad_out)


@pytest.mark.parametrize("num_inputs", range(1, 9))
def test_every_k_from_1_to_8(num_inputs):
    for dtype in (torch.float64, torch.float32):
        xs, w, grad_out = make_inputs((2, 5, 6, 7), num_inputs, dtype, seed=10 + num_inputs)
        assert_matches_ground_truth(mixed_sum, xs, w, grad_out)


def test_reference_backend_matches_ground_truth():
    for dtype in TOLERANCE:
        xs, w, grad_out = make_inputs((2, 4, 9, 9), 7, dtype, seed=3)
        assert_matches_ground_truth(reference_mixed_sum, xs, w, grad_out)


def test_non_contiguous_and_channels_last_inputs():
    xs, w, grad_out = make_inputs((2, 6, 9, 11), 4, torch.float64, seed=5)
    channels_last = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    out = mixed_sum(channels_last, w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches_ground_truth(mixed_sum, channels_last, w, grad_out)
    # grads come back in the inputs' layout
    _, grads, _ = run_forward_backward(mixed_sum, channels_last, w, grad_out)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)

    transposed = [x.transpose(1, 3) for x in xs]  # strided views, neither layout
    grad_t = grad_out.transpose(1, 3)
    assert_matches_ground_truth(mixed_sum, transposed, w, grad_t)
    sliced = [x[:, ::2, 1:, :] for x in xs]
    assert_matches_ground_truth(mixed_sum, sliced, w, grad_out[:, ::2, 1:, :])
    mixed_layouts = [xs[0], channels_last[1], transposed[2].transpose(1, 3), xs[3]]
    assert_matches_ground_truth(mixed_sum, mixed_layouts, w, grad_out.contiguous(memory_format=torch.channels_last))
    # non-contiguous weights (a strided view of a larger tensor)
    w_strided = torch.stack([w, w], 1)[:, 0]
    assert not w_strided.is_contiguous()
    assert_matches_ground_truth(mixed_sum, xs, w_strided, grad_out)


def test_only_weights_or_only_inputs_require_grad():
    xs, w, grad_out = make_inputs((3, 4, 5), 3, torch.float64, seed=8)
    _, _, ref_grad_w = ground_truth(xs, w, grad_out)
    w_leaf = w.clone().requires_grad_()
    mixed_sum(xs, w_leaf).backward(grad_out)
    torch.testing.assert_close(w_leaf.grad, ref_grad_w, rtol=0, atol=1e-12)

    leaves = [x.clone().requires_grad_() for x in xs[:2]] + [xs[2]]
    mixed_sum(leaves, w).backward(grad_out)
    for k in range(2):
        torch.testing.assert_close(leaves[k].grad, w[k] * grad_out, rtol=0, atol=1e-12)
    assert leaves[2].grad is None


@needs_extension
def test_weight_grad_is_independent_of_the_thread_count():
    xs, w, grad_out = make_inputs((4, 64, 33, 17), 7, torch.float32, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, single = run_forward_backward(mixed_sum, xs, w, grad_out)
        torch.set_num_threads(max(2, threads))
        _, _, multi = run_forward_backward(mixed_sum, xs, w, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def test_gradcheck_float64():
    xs, w, _ = make_inputs((2, 3, 4, 5), 3, torch.float64, seed=11)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *xs: mixed_sum(list(xs), w), (w, *xs))
    channels_last = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for x in xs]
    assert torch.autograd.gradcheck(lambda w, *xs: mixed_sum(list(xs), w), (w, *channels_last))


@pytest.mark.parametrize("fn", [mixed_sum, reference_mixed_sum], ids=["active_backend", "reference"])
def test_gradgradcheck_float64(fn):
    xs, w, _ = make_inputs((2, 3, 4), 3, torch.float64, seed=16)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda w, *xs: fn(list(xs), w), (w, *xs))


@needs_extension
def test_opcheck():
    for dtype, shape in [(torch.float64, (2, 3, 4, 5)), (torch.float32, (7, 9))]:
        xs, w, _ = make_inputs(shape, 3, dtype, seed=12)
        torch.library.opcheck(torch.ops.autofpn.mixed_sum.default,
                              ([x.requires_grad_() for x in xs], w.requires_grad_()))
    xs, w, _ = make_inputs((2, 3, 4, 5), 2, torch.float32, seed=13)
    channels_last = [x.contiguous(memory_format=torch.channels_last).requires_grad_() for x in xs]
    torch.library.opcheck(torch.ops.autofpn.mixed_sum.default, (channels_last, w.requires_grad_()))
    xs, w, grad_out = make_inputs((3, 5), 2, torch.float32, seed=14)
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.autofpn.mixed_sum_backward.default, (grad_out, xs, w, *flags))


def test_torch_compile_traces_the_op():
    xs, w, grad_out = make_inputs((2, 4, 6, 6), 3, torch.float32, seed=15)

    def mixed_then_relu(xs, w):
        return torch.relu(mixed_sum(xs, w) * 2.0)

    compiled = torch.compile(mixed_then_relu, backend="aot_eager", fullgraph=True)
    out, grads, grad_w = run_forward_backward(compiled, xs, w, grad_out)
    ref_out, ref_grads, ref_grad_w = run_forward_backward(mixed_then_relu, xs, w, grad_out)
    torch.testing.assert_close(out, ref_out)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)
    torch.testing.assert_close(grad_w, ref_grad_w)


def _direct_ops():
    """Both the Python entry point and the raw operator must reject bad inputs."""
    ops = [("mixed_sum", mixed_sum)]
    if backend_name() == "extension":
        ops.append(("torch.ops.autofpn.mixed_sum", torch.ops.autofpn.mixed_sum))
    return ops


@pytest.mark.parametrize("fn", [mixed_sum, reference_mixed_sum], ids=["active backend", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_weights_with_half_inputs(fn, dtype):
    """What a mixed op gets under autocast: half-precision op outputs, float32 softmax weights.
    The output and input gradients keep the inputs' dtype, the weight gradient the weights'."""
    for shape, channels_last in [((2, 3, 5, 7), False), ((2, 6, 9, 11), True), ((3, 50, 701), False)]:
        xs, w, grad_out = make_inputs(shape, 4, dtype, seed=31)
        w = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(32)), 0)  # float32
        if channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        out, grad_xs, grad_w = run_forward_backward(fn, xs, w, grad_out)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grad_xs) and grad_w.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        ref_out, ref_grad_xs, ref_grad_w = ground_truth(xs, w, grad_out)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=tol)
        for grad, ref in zip(grad_xs, ref_grad_xs):
            torch.testing.assert_close(grad.double(), ref, rtol=0, atol=tol)
        torch.testing.assert_close(grad_w.double(), ref_grad_w, rtol=tol, atol=tol * grad_out.numel() ** 0.5)
    # the weights are used at float32 precision, not rounded to the inputs' dtype: weights
    # 1e-4 apart (below bfloat16's spacing of 5e-4 at 0.125) still give their difference
    ones = torch.ones(4, 8, dtype=dtype)
    out = fn([ones, -ones], torch.tensor([0.1251, 0.1250]))
    torch.testing.assert_close(out.float(), torch.full((4, 8), 1e-4), rtol=0.02, atol=0)


def test_a_supernet_mixed_op_under_autocast_trains_alpha_in_float32():
    from autofpn.models.operations import NECK_OPS, MixedOp
    torch.manual_seed(0)
    op = MixedOp(8, NECK_OPS)
    alpha = torch.zeros(len(NECK_OPS), requires_grad=True)
    x = torch.randn(2, 8, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, torch.softmax(alpha, 0))
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert alpha.grad.dtype == torch.float32 and torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in op.parameters())


@pytest.mark.parametrize("name,op", _direct_ops())
def test_wrong_inputs_raise_clear_errors(name, op):
    x = torch.randn(2, 3, 4)
    w2 = torch.tensor([0.5, 0.5])
    errors = (ValueError, RuntimeError)
    with pytest.raises(errors, match=r"xs\[1\] has shape \[2, 3, 5\] but xs\[0\] has shape \[2, 3, 4\]"):
        op([x, torch.randn(2, 3, 5)], w2)
    with pytest.raises(errors, match=r"w must have shape \[K\] = \[2\]"):
        op([x, x], torch.ones(3))
    with pytest.raises(errors, match=r"w must have shape \[K\] = \[2\]"):
        op([x, x], torch.ones(1, 2))
    with pytest.raises(errors, match=r"xs\[1\] is (torch\.)?[Dd]ouble|xs\[1\] is torch\.float64"):
        op([x, x.double()], w2)
    with pytest.raises(errors, match=r"w has dtype"):
        op([x, x], w2.double())
    with pytest.raises(errors, match=r"w has dtype"):  # only float32 weights may differ from half xs
        op([x.bfloat16(), x.bfloat16()], w2.half())
    with pytest.raises(errors, match=r"expected 1 to 16 input tensors in xs, got 0"):
        op([], torch.ones(0))
    with pytest.raises(errors, match=rf"expected 1 to {MAX_MIXED_INPUTS} input tensors in xs, got 17"):
        op([x] * 17, torch.ones(17))
    with pytest.raises(errors, match=r"floating point"):
        op([torch.ones(3, dtype=torch.int64)] * 2, torch.ones(2, dtype=torch.int64))
    with pytest.raises(errors, match=r"one device, xs\[1\] is on meta"):
        op([x, torch.empty(2, 3, 4, device="meta")], w2)
    with pytest.raises(errors, match=r"w is on meta but xs are on cpu"):
        op([x, x], torch.empty(2, device="meta"))


def _run_python(code):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


_LOGGING_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
{prelude}
import torch
from autofpn.ops.mixed_sum import mixed_sum, backend_name
xs = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
for _ in range(3):
    out = mixed_sum(xs, w)
    out.sum().backward()
expected = sum(w[k] * xs[k] for k in range(3))
assert torch.allclose(out, expected, rtol=0, atol=1e-12)
assert torch.allclose(w.grad, 3 * torch.stack([x.sum() for x in xs]), rtol=0, atol=1e-12)
print(backend_name())
"""


def test_fallback_to_reference_and_single_log_line():
    # Blocking the import of autofpn._C simulates a build with AUTOFPN_NO_EXT=1.
    blocked = _run_python(_LOGGING_SCRIPT.format(prelude="sys.modules['autofpn._C'] = None"))
    assert blocked.stdout.strip() == "reference"
    assert blocked.stderr.count("autofpn mixed_sum backend: reference") == 1, blocked.stderr
    if backend_name() == "extension":
        normal = _run_python(_LOGGING_SCRIPT.format(prelude=""))
        assert normal.stdout.strip() == "extension"
        assert normal.stderr.count("autofpn mixed_sum backend: extension") == 1, normal.stderr


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_ground_truth(dtype):
    for shape, num_inputs in [((2, 3, 5, 7), 7), ((3, 50, 701), 3), ((5,), 1)]:
        xs, w, grad_out = make_inputs(shape, num_inputs, dtype, device="cuda", seed=num_inputs)
        assert_matches_ground_truth(mixed_sum, xs, w, grad_out)
    xs, w, grad_out = make_inputs((2, 6, 9, 11), 4, dtype, device="cuda", seed=21)
    channels_last = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    assert_matches_ground_truth(mixed_sum, channels_last, w, grad_out)
    if dtype in (torch.bfloat16, torch.float16):  # float32 weights, as under autocast
        out, _, grad_w = run_forward_backward(mixed_sum, xs, w.float(), grad_out)
        ref_out, _, ref_grad_w = ground_truth(xs, w.float(), grad_out)
        assert out.dtype == dtype and grad_w.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=TOLERANCE[dtype])


@needs_cuda
@needs_extension
def test_cuda_gradcheck_and_opcheck():
    xs, w, _ = make_inputs((2, 3, 4, 5), 3, torch.float64, device="cuda", seed=22)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *xs: mixed_sum(list(xs), w), (w, *xs))
    torch.library.opcheck(torch.ops.autofpn.mixed_sum.default, (xs, w))
    with pytest.raises((ValueError, RuntimeError), match="one device"):
        mixed_sum([xs[0], xs[1].cpu()], w[:2])
