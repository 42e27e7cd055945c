"""`product_key_topk` (the k x k candidate search) against brute force over all n^2 slots, and
`product_key_memory` against its reference composition: selected slots exactly, scores, outputs and the
gradients of the query, the sub-keys and the value table."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms
from ipl_layers.ops import product_key_memory, product_key_topk, product_key_topk_reference

# float64 agrees to rounding (measured <= 3.5e-16); fp32 measured <= 2e-7 (scores, outputs and every gradient:
# sums of Dk / 2 products, softmax over k); the bounds leave >= 50x headroom.
BOUND_F64 = 1e-12
BOUND_F32 = 1e-5


def make_inputs(lead, H, n, Dk, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return rnd(*lead, H, Dk), rnd(H, 2, n, Dk // 2), rnd(n * n, D)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
@pytest.mark.parametrize("k", [1, 4, 7, 16, 32])
def test_search_equals_brute_force(dtype, bound, k):
    # k = n = 32: every pair with (u + 1)(v + 1) <= k is a candidate, the pruning must still find the top k
    query, keys, _ = make_inputs((3, 5), 2, 32, 8, 4, dtype)
    scores, slots = product_key_topk(query, keys, k)
    ref_scores, ref_slots = product_key_topk_reference(query, keys, k)
    assert torch.equal(slots, ref_slots)
    assert_rel_rms("scores", scores, ref_scores, bound)
    w = torch.randn(scores.shape, dtype=dtype)
    got = torch.autograd.grad((scores * w).sum(), (query, keys))
    ref = torch.autograd.grad((ref_scores * w).sum(), (query, keys))
    for name, x, y in zip(("dquery", "dkeys"), got, ref):
        assert_rel_rms(name, x, y, bound)


@settings(max_examples=10, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), H=st.integers(1, 3), n=st.integers(1, 12),
       half=st.integers(1, 6), k=st.integers(1, 12))
def test_search_hypothesis(lead, H, n, half, k):
    k = min(k, n)
    query, keys, _ = make_inputs(lead, H, n, 2 * half, 1, torch.float64)
    scores, slots = product_key_topk(query, keys, k)
    ref_scores, ref_slots = product_key_topk_reference(query, keys, k)
    assert torch.equal(slots, ref_slots)
    assert_rel_rms("scores", scores, ref_scores, BOUND_F64)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_memory_read_matches_reference(dtype, bound, sparse_grad):
    query, keys, values = make_inputs((2, 7), 4, 8, 16, 12, dtype)
    out = product_key_memory(query, keys, values, 4, sparse_grad=sparse_grad)
    ref = product_key_memory(query, keys, values, 4, backend="reference")
    assert out.shape == (2, 7, 12)
    assert_rel_rms("out", out, ref, bound)
    w = torch.randn(out.shape, dtype=dtype)
    got = torch.autograd.grad((out * w).sum(), (query, keys, values))
    want = torch.autograd.grad((ref * w).sum(), (query, keys, values))
    for name, x, y in zip(("dquery", "dkeys", "dvalues"), got, want):
        assert_rel_rms(name, x.to_dense(), y, bound)


def test_huge_table_with_sparse_gradient_never_densifies():
    # N = 1024^2 rows of dim 2: the gradient holds only the rows the 6 queries x 2 heads x 8 slots touched
    query, keys, values = make_inputs((6,), 2, 1024, 4, 2, torch.float32)
    out = product_key_memory(query, keys, values, 8, sparse_grad=True)
    (grad,) = torch.autograd.grad(out.sum(), values)
    assert grad.is_sparse and grad.shape == (1024 * 1024, 2)
    assert grad.values().shape[0] <= 6 * 2 * 8


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda q, c, v: (q[..., :7], c, v, 2), r"query: the key dim Dk is split into two halves, so it must be even"),
        (lambda q, c, v: (q, c[:1], v, 2),
         r"keys: expected shape \[H, 2, n, Dk / 2\] = \[2, 2, 4, 4\], got \[1, 2, 4, 4\]"),
        (lambda q, c, v: (q, c, v, 5), r"topk: expected at most the number of sub-keys per half n = 4, got 5"),
        (lambda q, c, v: (q, c, v, 0), r"topk: expected a positive int, got 0"),
        (lambda q, c, v: (q, c, v[:15], 2), r"values: expected N = n\^2 = 16 rows \(n = 4 sub-keys per half\), got 15"),
        (lambda q, c, v: (q[0, 0], c, v, 2), r"query: expected a tensor \[\*, H, Dk\] \(at least 2-D\), got 1-D"),
    ],
)
def test_bad_inputs(args, match):
    query, keys, values = make_inputs((3,), 2, 4, 8, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        product_key_memory(*args(query.detach(), keys.detach(), values.detach()))


@pytest.mark.parametrize("lead", [(0,), (3, 0), ()])
def test_empty_and_single_queries(lead):
    query, keys, values = make_inputs(lead, 2, 6, 8, 5, torch.float64)
    out = product_key_memory(query, keys, values, 3)
    ref = product_key_memory(query, keys, values, 3, backend="reference")
    assert out.shape == (*lead, 5)
    if out.numel():
        assert_rel_rms("out", out, ref, BOUND_F64)
    grads = torch.autograd.grad(out.sum(), (query, keys, values), allow_unused=True, materialize_grads=True)
    assert all(torch.isfinite(g.to_dense()).all() for g in grads)
