"""`embedding_bag` on the torch path against the float64 bag-by-bag reference: output and the gradients of the
weights and the value table (dense and sparse), repeats within and across bags, empty bags and batches,
determinism, low precision and input errors."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, rel_rms
from ipl_layers.ops import embedding_bag, embedding_bag_reference

embedding_bag_module = importlib.import_module("ipl_layers.ops.embedding_bag")

# float64 agrees to rounding (measured <= 1e-15); fp32 measured <= 3.8e-7 on the output and both gradients
# (sums of up to 40 products per entry); the bounds leave >= 25x headroom.
BOUND_F64 = 1e-12
BOUND_F32 = 1e-5


def make_inputs(lead, n, N, D, dtype, seed=0):
    """Indices drawn from a small table so that rows repeat within and across bags."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, N, (*lead, n), generator=gen)
    weights = torch.softmax(torch.randn(*lead, n, generator=gen, dtype=torch.float64), -1).to(dtype)
    values = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    return indices, weights.requires_grad_(), values.requires_grad_()


def run(fn, indices, weights, values, **kw):
    out = fn(indices, weights, values, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    dw, dv = torch.autograd.grad(out, (weights, values), dout, allow_unused=True, materialize_grads=True)
    return out, dw, dv.to_dense()


def reference(indices, weights, values):
    leaves = [x.detach().double().requires_grad_() for x in (weights, values)]
    return run(embedding_bag_reference, indices, *leaves)


def check(got, ref, bound):
    for name, x, y in zip(("out", "dweights", "dvalues"), got, ref):
        assert_rel_rms(name, x, y, bound)


@pytest.fixture(params=["ext", "no_ext"])
def ext(request, monkeypatch):
    """The torch path's fp32 CPU backward runs the C++ extension's row pass when it is built, else torch ops:
    both are checked."""
    if request.param == "no_ext":
        monkeypatch.setattr(embedding_bag_module._ext, "available", lambda: False)
    else:
        assert embedding_bag_module._ext.available(), "the C++ extension is not built (make builds it)"
    return request.param


@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_matches_reference(dtype, bound, sparse_grad, ext):
    inputs = make_inputs((2, 7, 3), 8, 20, 16, dtype)
    check(run(embedding_bag, *inputs, sparse_grad=sparse_grad), reference(*inputs), bound)


@settings(max_examples=10, deadline=None)
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=3), n=st.integers(1, 40), N=st.integers(1, 50),
       D=st.integers(1, 24), sparse_grad=st.booleans())
def test_shapes_hypothesis(lead, n, N, D, sparse_grad):  # fp32: the extension's backward
    inputs = make_inputs(lead, n, N, D, torch.float32)
    check(run(embedding_bag, *inputs, sparse_grad=sparse_grad), reference(*inputs), BOUND_F32)


def test_sparse_gradient_holds_only_the_touched_rows():
    indices, weights, values = make_inputs((4, 5), 3, 1000, 8, torch.float32)
    out = embedding_bag(indices, weights, values, sparse_grad=True)
    (grad,) = torch.autograd.grad(out.sum(), values)
    assert grad.is_sparse and grad.is_coalesced()
    assert grad.indices()[0].tolist() == sorted(set(indices.flatten().tolist()))
    dense = torch.autograd.grad(embedding_bag(indices, weights, values).sum(), values)[0]
    assert torch.equal(grad.to_dense(), dense)


def test_value_gradient_sums_repeats():
    # one row picked twice in a bag and once in another: its gradient is the sum of the three contributions
    indices = torch.tensor([[3, 3], [3, 0]])
    weights = torch.tensor([[0.25, 0.5], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    dout = torch.tensor([[1.0, 2.0], [10.0, 20.0]], dtype=torch.float64)
    (dv,) = torch.autograd.grad(embedding_bag(indices, weights, values), values, dout)
    assert torch.equal(dv[3], 0.75 * dout[0] + 2.0 * dout[1])
    assert torch.equal(dv[0], dout[1])
    assert not dv[1:3].any()


def test_gradients_are_deterministic(ext):
    inputs = make_inputs((64,), 16, 7, 32, torch.float32)
    first = run(embedding_bag, *inputs)
    for got in (run(embedding_bag, *inputs), run(embedding_bag, *inputs, sparse_grad=True)):
        assert all(torch.equal(x, y) for x, y in zip(got, first))  # bitwise: no order-dependent accumulation


def test_low_precision_blocked_gathers_agree(monkeypatch):
    inputs = make_inputs((64,), 16, 7, 32, torch.bfloat16)
    first = run(embedding_bag, *inputs)
    monkeypatch.setattr(embedding_bag_module, "GATHER_BLOCK", 16 * 32 * 5)  # blocks of 5 bags, the last of 4
    assert all(torch.equal(x, y) for x, y in zip(run(embedding_bag, *inputs), first))


@pytest.mark.parametrize("lead,n", [((0,), 4), ((3,), 0), ((2, 0, 5), 3)])
def test_empty_bags_and_batches(lead, n):
    inputs = make_inputs(lead, n, 5, 4, torch.float64)
    got, ref = run(embedding_bag, *inputs), reference(*inputs)
    for x, y in zip(got, ref):
        assert x.shape == y.shape and torch.equal(x, y) and not x.any()


def test_low_precision_values():
    indices, weights, values = make_inputs((3, 9), 6, 30, 16, torch.bfloat16)
    got, ref = run(embedding_bag, indices, weights, values), reference(indices, weights, values)
    assert got[0].dtype == got[2].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    for name, x, y in zip(("out", "dweights", "dvalues"), got, ref):  # within 2x of rounding the exact result
        assert_rel_rms(name, x, y, 2 * rel_rms(y.to(torch.bfloat16), y))


def test_int32_indices_and_reference_backend():
    indices, weights, values = make_inputs((2, 3), 4, 10, 8, torch.float64)
    ref = embedding_bag(indices, weights, values, backend="reference")
    assert_rel_rms("out", embedding_bag(indices.int(), weights, values), ref, BOUND_F64)


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda i, w, v: (i, w, v[0]), r"values: expected 2-D \[N, D\], got 1-D"),
        (lambda i, w, v: (i.float(), w, v), r"indices: expected dtype int32 or int64, got torch.float32"),
        (lambda i, w, v: (i, w[..., :2], v),
         r"weights: expected the shape of indices \[\*, n\] = \[2, 3\], got \[2, 2\]"),
        (lambda i, w, v: (i + 10, w, v), r"indices: expected values in \[0, N = 10\), got min 10"),
        (lambda i, w, v: (i - 5, w, v), r"indices: expected values in \[0, N = 10\), got min -5"),
        (lambda i, w, v: (i, w.long(), v), r"weights: expected a floating dtype"),
        (lambda i, w, v: (i, w, v.to("meta")), r"indices: expected device meta"),
        (lambda i, w, v: (i[0, 0], w[0, 0], v), r"indices: expected at least 1-D"),
    ],
)
def test_bad_inputs(args, match):
    indices = torch.randint(0, 10, (2, 3))
    with pytest.raises((ValueError, TypeError), match=match):
        embedding_bag(*args(indices, torch.rand(2, 3), torch.randn(10, 4)), backend="torch")


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_cpp_backend_matches_reference(sparse_grad):
    inputs = make_inputs((5, 9), 12, 40, 20, torch.float32)
    check(run(embedding_bag, *inputs, sparse_grad=sparse_grad, backend="cpp"), reference(*inputs), BOUND_F32)


def test_cpp_backend_is_deterministic_across_thread_counts():
    inputs = make_inputs((300,), 16, 9, 33, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(embedding_bag, *inputs, backend="cpp")
        torch.set_num_threads(2)
        two = run(embedding_bag, *inputs, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_cpp_backend_low_precision_and_float64_error():
    indices, weights, values = make_inputs((3, 9), 6, 30, 16, torch.bfloat16)
    got, ref = run(embedding_bag, indices, weights, values, backend="cpp"), reference(indices, weights, values)
    for name, x, y in zip(("out", "dweights", "dvalues"), got, ref):
        assert x.dtype == torch.bfloat16
        assert_rel_rms(name, x, y, 2 * rel_rms(y.to(torch.bfloat16), y))
    with pytest.raises(ValueError, match=r"backend 'cpp' computes in fp32; use backend='torch' for float64"):
        embedding_bag(*make_inputs((2,), 3, 5, 4, torch.float64), backend="cpp")
