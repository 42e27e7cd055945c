"""The C++ CPU extension's Titans-memory decoding step against the op's float64 reference over several chunks
(outputs and states), its input checks, and the op's dispatch to it (one token, no autograd, on CPU)."""

import pytest
import torch
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.ops import titans_memory
from ipl_layers.ops.titans_memory import titans_memory_reference
from ipl_layers.state import TitansState

# fp32 state and accumulation (an MLP of depth <= 3 with F = 2 K = 40, exact GELU and its derivative, two LNs)
# against the float64 reference after T = 8 tokens (2 chunk commits at C = 3); measured <= 8.9e-7 (depth 3).
BOUND = 2e-6
N, H, K, C, T = 2, 3, 20, 3, 8  # K not a multiple of the 16-column tile: the last tile is partial
FLAGS = [dict(use_ln=True, use_residual=True), dict(use_ln=False, use_residual=False),
         dict(use_ln=True, use_residual=True, normalize_step=True), dict(use_ln=False, use_residual=False,
                                                                        normalize_step=True)]


def make_sequence(depth, dtype=torch.float32):
    q, k, v = (torch.randn(N, T, H, K, dtype=dtype) for _ in range(3))  # [N, T, H, K] (V = K)
    theta, eta, alpha = 0.02 * torch.rand(N, T, H), torch.rand(N, T, H), 0.1 * torch.rand(N, T, H)  # [N, T, H]
    ln = dict(ln_weight=1 + 0.1 * torch.randn(H, K), ln_bias=0.1 * torch.randn(H, K))  # [H, V]
    dims = [K] + [2 * K] * (depth - 1) + [K]
    weights = tuple(torch.randn(N, H, a, b) / a**0.5 for a, b in zip(dims, dims[1:]))  # [N, H, d_l, d_{l+1}]
    return (q, k, v, theta.to(dtype), eta.to(dtype), alpha.to(dtype)), ln, weights


def decode(inputs, ln, state, flags):
    outs = []
    for t in range(T):
        o, state = titans_memory(*(x[:, t:t + 1] for x in inputs), **ln, chunk_size=C, initial_state=state,
                                 output_final_state=True, backend="torch", **flags)
        outs.append(o)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("flags", FLAGS, ids=["ln-residual", "plain", "ln-residual-normalized", "plain-normalized"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_op_decodes_through_the_step_and_follows_its_reference(depth, flags, monkeypatch):
    inputs, ln, weights = make_sequence(depth)
    o_ref, final_ref = titans_memory_reference(*(x.double() for x in inputs), **{n: p.double() for n, p in
                                               ln.items()}, chunk_size=C, initial_state=tuple(w.double() for w in
                                               weights), output_final_state=True, **flags)
    calls = []
    step = _ext.titans_step
    monkeypatch.setattr(_ext, "titans_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    before = [w.clone() for w in weights]
    o, final = decode(inputs, ln, weights, flags)
    assert len(calls) == T, "the op did not decode through the C++ step"
    assert all(torch.equal(w, b) for w, b in zip(weights, before)), "the initial state was modified"
    assert_rel_rms("o", o, o_ref, BOUND)
    for i, (x, r) in enumerate(zip(final[:-1], final_ref[:-1])):
        assert x.dtype == torch.float32
        assert_rel_rms(f"state[{i}]", x, r, BOUND)
    assert torch.equal(final[-1], final_ref[-1])


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[2]], ids=["ln-residual", "ln-residual-normalized"])
def test_matches_the_torch_step_on_strided_bf16_inputs(flags, monkeypatch):
    inputs, ln, weights = make_sequence(2, torch.bfloat16)
    strided = tuple(x.transpose(0, 2).contiguous().transpose(0, 2) for x in inputs)  # same values, other strides
    assert not strided[0].is_contiguous()
    o, final = decode(strided, ln, weights, flags)
    monkeypatch.setattr(_ext, "available", lambda: False)  # the torch step on the same tokens
    o_ref, final_ref = decode(inputs, ln, weights, flags)
    assert o.dtype == torch.bfloat16
    assert_rel_rms("o", o.float(), o_ref.float(), 1e-2)  # one bf16 rounding of o (2^-8 relative)
    for i, (x, r) in enumerate(zip(final[:-1], final_ref[:-1])):
        assert_rel_rms(f"state[{i}]", x, r, BOUND)


def _mid_chunk_state(weights, position):
    """(start, momentum, weights, position): momentum, weights moved from the start weights, every sequence at
    `position`."""
    momentum = [0.1 * torch.randn_like(w) for w in weights]
    current = [w + 0.1 * torch.randn_like(w) for w in weights]
    return list(weights), momentum, current, torch.full((N,), position)


@pytest.mark.parametrize("position", [1, C - 1], ids=["open", "chunk-end"])
def test_in_place_writes_the_same_state_over_the_input(position):
    inputs, ln, weights = make_sequence(2)
    tokens = [x[:, 0] for x in inputs]
    state = _mid_chunk_state(weights, position)
    o_ref, new_ref = _ext.titans_step(*tokens, *ln.values(), state, C, normalize_step=True)
    own = [[x.clone() for x in group] for group in state[:3]] + [state[3]]
    o, new = _ext.titans_step(*tokens, *ln.values(), own, C, normalize_step=True, in_place=True)
    assert torch.equal(o, o_ref)
    for group, mine, ref in zip(new[:3], own[:3], new_ref[:3]):
        for x, m, r in zip(group, mine, ref):
            assert x.data_ptr() == m.data_ptr(), "not written in place"
            assert torch.equal(m, r)
    assert torch.equal(new[3], new_ref[3])


@pytest.mark.parametrize("depth, change, match", [
    (2, lambda s: ([s[0][0].transpose(2, 3).contiguous().transpose(2, 3), s[0][1]], *s[1:]),
     r"start\[0\]: in_place needs a contiguous float32 tensor, got Float \(non-contiguous\)"),
    (1, lambda s: (s[0], s[1], s[0], s[3]),  # the weights are the start weights' tensor
     r"weights\[0\]: in_place needs state tensors that do not share memory, but it overlaps start\[0\]"),
], ids=["strided", "aliased"])
def test_in_place_refuses_states_it_cannot_write_over(depth, change, match):
    inputs, ln, weights = make_sequence(depth)
    with pytest.raises(ValueError, match=match):
        _ext.titans_step(*(x[:, 0] for x in inputs), *ln.values(), change(_mid_chunk_state(weights, 1)), C,
                         in_place=True)


def test_op_updates_a_state_in_place_only_when_asked_and_it_can():
    inputs, ln, weights = make_sequence(2)
    tok = [x[:, :1] for x in inputs]
    kw = dict(**ln, chunk_size=C, output_final_state=True, normalize_step=True, backend="torch")
    with torch.no_grad():
        # at a chunk boundary the start entries are not read: in place they are set to the weights
        start, momentum, current, position = _mid_chunk_state(weights, 0)
        state = TitansState.of(start, momentum, current, position)
        o_ref, ref = titans_memory(*tok, initial_state=state, **kw)
        own = TitansState(*(x.clone() for x in state))
        o, new = titans_memory(*tok, initial_state=own, update_state_in_place=True, **kw)
        assert torch.equal(o, o_ref)
        assert all(x.data_ptr() == m.data_ptr() for x, m in zip(new[:-1], own[:-1]))
        for x, r in zip(own[:-1], ref[:-1]):
            assert torch.equal(x, r)
        # weights given as a tuple (start, weights the same tensors, momentum zeros) are left as they are
        before = [w.clone() for w in weights]
        titans_memory(*tok, initial_state=weights, update_state_in_place=True, **kw)
        assert all(torch.equal(w, b) for w, b in zip(weights, before))


def test_op_keeps_the_differentiable_path_under_autograd(monkeypatch):
    inputs, ln, weights = make_sequence(2)
    monkeypatch.setattr(_ext, "titans_step", lambda *a, **kw: pytest.fail("autograd call reached the step"))
    theta = inputs[3][:, :1].requires_grad_()
    o, _ = titans_memory(*(x[:, :1] for x in inputs[:3]), theta, *(x[:, :1] for x in inputs[4:]), chunk_size=C,
                         initial_state=weights, backend="torch")
    assert o.requires_grad


def _bad(**change):
    inputs, ln, weights = make_sequence(2)
    q, k, v, theta, eta, alpha = (x[:, 0] for x in inputs)
    args = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, ln_weight=ln["ln_weight"], ln_bias=ln["ln_bias"],
                start=list(weights), momentum=[torch.zeros_like(w) for w in weights], weights=list(weights),
                position=torch.zeros(N, dtype=torch.long), C=C)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(q=torch.randn(N, H * K)), ValueError, r"q: expected 3-D \[N, H, K\], got 2-D"),
        (_bad(v=torch.randn(N, H, K + 1)), ValueError, "the residual needs V == K"),
        (_bad(alpha=torch.rand(N, H, 1)), ValueError, r"alpha: expected 2-D \[N, H\], got 3-D"),
        (_bad(start=[torch.randn(N, H, K + 1, 2 * K), torch.randn(N, H, 2 * K, K)]), ValueError,
         r"start\[0\]: expected shape \[N, H, d_in, d_out\] = \[2, 3, 20, 40\], got \[2, 3, 21, 40\]"),
        (_bad(momentum=[torch.zeros(N, H, K, 2 * K)]), ValueError, "expected L >= 1 matrices each"),
        (_bad(start=[torch.randn(N, H, K, 2 * K), torch.randn(N, H, 2 * K, K + 1)]), ValueError,
         r"momentum\[1\]: expected shape"),
        (_bad(position=torch.zeros(N, dtype=torch.int32)), TypeError, "position: expected int64, got Int"),
        (_bad(position=torch.tensor([0, C])), ValueError, r"position: expected values in \[0, C = 3\), got 3"),
        (_bad(eta=torch.ones(N, H, dtype=torch.int64)), TypeError, "eta: expected a floating dtype"),
    ],
    ids=["q-rank", "residual-dims", "alpha-rank", "start-dims", "depth-mismatch", "momentum-shape",
         "position-dtype", "position-range", "eta-dtype"],
)
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        _ext._require().titans_step(**args, use_ln=True, use_residual=True, normalize_step=False, in_place=False)
