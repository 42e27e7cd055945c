"""The Triton kernels of `embedding_bag` (kernels/memory/) under the interpreter, fp32, against the float64
bag-by-bag reference: the forward, the weights' gradient (fused into the table's kernel, and the weights-only
kernel), the table's gradient dense and sparse; repeats within and across bags, n = 1, empty bags and
batches, int32 indices, odd D and D over one column block, determinism, drawn shapes and the dispatch.
bf16/fp16 are not run here (the interpreter's bf16 arithmetic is wrong); they are checked by compiling
(tests/kernels/test_compile.py) and, with CUDA, by the gpu test at the end."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, rel_rms
from ipl_layers.backend import resolve_backend
from ipl_layers.kernels.memory import embedding_bag_bwd, embedding_bag_bwd_weights
from ipl_layers.ops import embedding_bag, embedding_bag_reference, product_key_memory
from ipl_layers.ops.embedding_bag import BACKENDS

# fp32 kernels against float64: measured <= 1.4e-7 (output, dweights) and 2.4e-7 (dvalues: runs of up to ~150
# entries per row) over these shapes; the bound leaves >= 40x headroom.
BOUND = 1e-5


def make_inputs(lead, n, N, D, seed=0, index_dtype=torch.int64):
    """fp32 leaves; indices drawn from a small table so that rows repeat within and across bags."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, N, (*lead, n), generator=gen).to(index_dtype)
    weights = torch.softmax(torch.randn(*lead, n, generator=gen, dtype=torch.float64), -1).float()
    values = torch.randn(N, D, generator=gen, dtype=torch.float64).float()
    return indices, weights.requires_grad_(), values.requires_grad_()


def run(fn, indices, weights, values, need=(True, True), **kw):
    """Output and the gradients of the leaves in `need` (weights, values), the table's made dense."""
    out = fn(indices, weights, values, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dout = dout.to(out.device, out.dtype)
    leaves = [x for x, want in zip((weights, values), need) if want]
    grads = iter(torch.autograd.grad(out, leaves, dout, materialize_grads=True))
    return [out] + [next(grads).to_dense() if want else None for want in need]


def reference(indices, weights, values):
    leaves = [x.detach().double().requires_grad_() for x in (weights, values)]
    return run(embedding_bag_reference, indices.long(), *leaves)


def triton_bag(indices, weights, values, **kw):
    return embedding_bag(indices, weights, values, backend="triton", **kw)


def check(got, ref):
    for name, x, y in zip(("out", "dweights", "dvalues"), got, ref):
        if x is not None:
            assert x.dtype == torch.float32, name
            assert_rel_rms(name, x, y, BOUND)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("D", [37, 200])  # odd, in one column block; two blocks of 128 (partial dweights summed)
def test_matches_reference(D, sparse_grad, index_dtype):
    inputs = make_inputs((3, 5), 8, 12, D, index_dtype=index_dtype)
    check(run(triton_bag, *inputs, sparse_grad=sparse_grad), reference(*inputs))


def test_float64_accumulates_in_float64():
    indices, weights, values = make_inputs((3, 4), 9, 11, 140)
    leaves = [x.detach().double().requires_grad_() for x in (weights, values)]
    got = run(triton_bag, indices, *leaves)
    for name, x, y in zip(("out", "dweights", "dvalues"), got, reference(indices, weights, values)):
        assert x.dtype == torch.float64
        assert_rel_rms(name, x, y, 1e-12)  # float64 rounding (measured <= 2.2e-16)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_one_gradient(need):
    # (True, False): a frozen table, the weights-only kernel; (False, True): the table's kernel without dweights
    indices, weights, values = make_inputs((4, 3), 6, 10, 150)
    leaves = (weights.detach().requires_grad_(need[0]), values.detach().requires_grad_(need[1]))
    check(run(triton_bag, indices, *leaves, need=need), reference(indices, weights, values))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_weights_kernel(index_dtype):
    indices, _, values = make_inputs((5,), 7, 9, 300, index_dtype=index_dtype)  # 300: three column blocks
    dout = torch.randn(5, 300)
    dw = embedding_bag_bwd_weights(indices, values.detach(), dout, torch.float32)
    ref = torch.einsum("bjd,bd->bj", values.detach().double()[indices.long()], dout.double()).flatten()
    assert_rel_rms("dweights", dw, ref, BOUND)


def test_value_gradient_sums_repeats():
    # row 3 twice in a bag and once in another: its gradient is the sum of the three contributions
    indices = torch.tensor([[3, 3], [3, 0]])
    weights = torch.tensor([[0.25, 0.5], [2.0, 1.0]], requires_grad=True)
    values = torch.randn(4, 2, requires_grad=True)
    dout = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    dw, dv = torch.autograd.grad(triton_bag(indices, weights, values), (weights, values), dout)
    assert torch.equal(dv[3], 0.75 * dout[0] + 2.0 * dout[1]) and torch.equal(dv[0], dout[1])
    assert not dv[1:3].any()
    assert torch.allclose(dw, torch.stack([values[[3, 3]] @ dout[0], values[[3, 0]] @ dout[1]]), rtol=1e-6)


@pytest.mark.parametrize("lead,n", [((6,), 1), ((0,), 4), ((3,), 0), ((2, 0, 5), 3)])
def test_single_slot_empty_bags_and_batches(lead, n):
    inputs = make_inputs(lead, n, 5, 4)
    got, ref = run(triton_bag, *inputs), reference(*inputs)
    for x, y in zip(got, ref):
        assert x.shape == y.shape
    if n and 0 not in lead:
        check(got, ref)
    else:
        assert not any(x.any() for x in got)


def test_sparse_gradient_holds_only_the_touched_rows():
    indices, weights, values = make_inputs((4, 5), 3, 1000, 8)
    (grad,) = torch.autograd.grad(triton_bag(indices, weights, values, sparse_grad=True).sum(), values)
    assert grad.is_sparse and grad.is_coalesced()
    assert grad.indices()[0].tolist() == sorted(set(indices.flatten().tolist()))


def test_gradients_are_deterministic(monkeypatch):
    # 64 bags x 16 slots over 7 rows: runs of ~150 entries per row, rows in blocks of 4 of unequal length
    inputs = make_inputs((64,), 16, 7, 33)
    first = run(triton_bag, *inputs)
    assert all(torch.equal(x, y) for x, y in zip(run(triton_bag, *inputs), first))  # bitwise
    check(first, reference(*inputs))
    # runs split into segments of at most 5 entries (two passes): as deterministic, the same dweights
    monkeypatch.setattr(embedding_bag_bwd, "SEGMENT", 5)
    split = run(triton_bag, *inputs)
    assert all(torch.equal(x, y) for x, y in zip(run(triton_bag, *inputs), split))
    assert torch.equal(split[0], first[0]) and torch.equal(split[1], first[1])
    check(split, reference(*inputs))


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(0, 4), min_size=1, max_size=2), n=st.integers(0, 12), N=st.integers(1, 30),
       D=st.integers(1, 300), sparse_grad=st.booleans(), int32=st.booleans())
def test_shapes_hypothesis(lead, n, N, D, sparse_grad, int32):
    inputs = make_inputs(lead, n, N, D, index_dtype=torch.int32 if int32 else torch.int64)
    got, ref = run(triton_bag, *inputs, sparse_grad=sparse_grad), reference(*inputs)
    for name, x, y in zip(("out", "dweights", "dvalues"), got, ref):
        assert x.shape == y.shape, name
        assert rel_rms(x, y) <= BOUND, name  # 0 == 0 for empty or all-zero results


def test_product_key_memory_passes_the_backend_through():
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(3, 2, 8, generator=gen)
    keys, values = torch.randn(2, 2, 6, 4, generator=gen), torch.randn(36, 20, generator=gen)
    got = product_key_memory(query, keys, values, 3, backend="triton")
    ref = product_key_memory(query.double(), keys.double(), values.double(), 3, backend="reference")
    assert_rel_rms("out", got, ref, BOUND)


def test_dispatch_defaults():
    assert resolve_backend("embedding_bag", None, torch.device("cuda"), BACKENDS) == "triton"
    assert resolve_backend("embedding_bag", None, torch.device("cpu"), BACKENDS) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cuda(dtype):
    indices, weights, values = make_inputs((64, 4), 32, 500, 256)
    leaves = [x.detach().to("cuda", dtype).requires_grad_() for x in (weights, values)]
    got = [x.cpu() for x in run(embedding_bag, indices.cuda(), *leaves)]  # default backend on CUDA: triton
    ref = reference(indices, *(x.detach().cpu() for x in leaves))  # exact on the rounded inputs
    for name, x, y in zip(("out", "dweights", "dvalues"), got, ref):
        assert x.dtype == dtype
        assert_rel_rms(name, x, y, 2 * rel_rms(y.to(dtype), y))  # within 2x of rounding the exact result
