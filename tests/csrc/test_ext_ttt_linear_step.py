"""The C++ CPU extension's TTT-Linear decoding step against the op's float64 reference over several mini-batches
(outputs and states), its input checks, and the op's dispatch to it (one token, no autograd, on CPU)."""

import pytest
import torch
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.ops import ttt_linear
from ipl_layers.ops.ttt_linear import ttt_linear_reference
from ipl_layers.state import TTTLinearState

# fp32 state and accumulation (K = 20 terms per dot, two LNs, up to C gradient sums per mini-batch) against
# the float64 reference after T = 11 tokens (3 mini-batch commits at C = 3); measured <= 2.0e-7.
BOUND = 2e-6
N, H, K, C = 2, 3, 20, 3  # K not a multiple of the 16-column tile: the last tile is partial
FLAGS = [dict(use_ln=ln, use_residual=res, use_bias=bias) for ln, res, bias in
         [(True, True, True), (True, False, False), (False, True, True), (False, False, True)]]
FLAG_IDS = ["ln-res-bias", "ln-only", "res-bias", "bias-only"]


def make_sequence(T, dtype=torch.float32):
    q, k, v = (torch.randn(N, T, H, K, dtype=dtype) for _ in range(3))  # [N, T, H, K]
    eta = (0.1 * torch.rand(N, T, H)).to(dtype)  # [N, T, H]
    ln_weight, ln_bias = 1 + 0.1 * torch.randn(H, K), 0.1 * torch.randn(H, K)  # [H, K]
    token_scale = 1 / torch.arange(1, C + 1) + 0.05 * torch.randn(H, C)  # [H, C]
    W0, b0 = 0.1 * torch.randn(N, H, K, K), 0.1 * torch.randn(N, H, K)
    return (q, k, v, eta), dict(ln_weight=ln_weight, ln_bias=ln_bias, token_scale=token_scale), (W0, b0)


def decode(inputs, params, state, flags, T):
    """The op one token at a time from `state`; returns o [N, T, H, K] and the final state."""
    q, k, v, eta = inputs
    outs = []
    for t in range(T):
        tok = slice(t, t + 1)
        o, state = ttt_linear(q[:, tok], k[:, tok], v[:, tok], eta[:, tok], **params, mini_batch_size=C,
                              initial_state=state, output_final_state=True, backend="torch", **flags)
        outs.append(o)
    return torch.cat(outs, dim=1), state


def assert_states_close(state, ref):
    for name, x, r in zip(TTTLinearState._fields[:4], state, ref):
        assert x.dtype == torch.float32, f"{name}: {x.dtype}"
        if r.abs().max() == 0:  # without bias b, sum_b are zeros; sums are zeros right after a commit
            assert torch.equal(x, torch.zeros_like(x)), f"{name}: expected zeros"
        else:
            assert_rel_rms(name, x, r, BOUND)
    assert torch.equal(state.position, ref.position)


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("T", [9, 11], ids=["at-boundary", "mid-mini-batch"])
def test_op_decodes_through_the_step_and_follows_its_reference(flags, T, monkeypatch):
    # T tokens decoded one call at a time (dispatching to the C++ step) equal the reference over the sequence:
    # gradients accumulate within each open mini-batch and commit at its end, 3 times
    inputs, params, (W0, b0) = make_sequence(T)
    o_ref, final_ref = ttt_linear_reference(*(x.double() for x in inputs), **{n: p.double() for n, p in
                                            params.items()}, mini_batch_size=C,
                                            initial_state=(W0.double(), b0.double()), output_final_state=True,
                                            **flags)
    calls = []
    step = _ext.ttt_linear_step
    monkeypatch.setattr(_ext, "ttt_linear_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    before = W0.clone()
    o, final = decode(inputs, params, (W0, b0), flags, T)
    assert len(calls) == T, "the op did not decode through the C++ step"
    assert torch.equal(W0, before), "the initial state was modified"
    assert_rel_rms("o", o, o_ref, BOUND)
    assert_states_close(final, final_ref)


def test_bf16_inputs_follow_the_fp32_torch_path(monkeypatch):
    # bf16 inputs are staged to fp32 as the torch path does: the two agree to fp32 rounding
    inputs, params, state = make_sequence(5, torch.bfloat16)
    o, final = decode(inputs, params, state, FLAGS[0], 5)
    monkeypatch.setattr(_ext, "available", lambda: False)  # the torch path on the same tokens
    o_ref, final_ref = decode(inputs, params, state, FLAGS[0], 5)
    assert o.dtype == torch.bfloat16
    assert_rel_rms("o", o.float(), o_ref.float(), 1e-2)  # one bf16 rounding of o (2^-8 relative)
    assert_states_close(final, final_ref)


def test_strided_inputs():
    inputs, params, (W0, b0) = make_sequence(2)
    q, k, v, eta = (x[:, 1] for x in inputs)  # [N, H, K], [N, H]: views with T strides
    args = (q, k, v, eta, params["ln_weight"], params["ln_bias"], params["token_scale"])
    state = TTTLinearState(W0.transpose(2, 3).contiguous().transpose(2, 3), b0, torch.randn(N, H, K, K),
                           torch.randn(N, H, K), torch.tensor([0, 2]))
    assert not q.is_contiguous() and not state.W.is_contiguous()
    o, new = _ext.ttt_linear_step(*args, state)
    o_ref, new_ref = _ext.ttt_linear_step(*(x.contiguous() for x in args), TTTLinearState(
        *(x.contiguous() for x in state)))
    assert torch.equal(o, o_ref)
    for x, r in zip(new, new_ref):
        assert torch.equal(x, r)


@pytest.mark.parametrize("position", [0, C - 1], ids=["open", "commit"])
def test_in_place_writes_the_same_state_over_the_input(position):
    inputs, params, (W0, b0) = make_sequence(1)
    args = (*(x[:, 0] for x in inputs), params["ln_weight"], params["ln_bias"], params["token_scale"])
    state = TTTLinearState(W0, b0, 0.1 * torch.randn(N, H, K, K), 0.1 * torch.randn(N, H, K),
                           torch.full((N,), position))
    o_ref, new_ref = _ext.ttt_linear_step(*args, state)
    own = TTTLinearState(*(x.clone() for x in state))
    o, new = _ext.ttt_linear_step(*args, own, in_place=True)
    assert torch.equal(o, o_ref)
    for name, x, mine, r in zip(TTTLinearState._fields[:4], new, own, new_ref):
        assert x.data_ptr() == mine.data_ptr(), f"{name}: not written in place"
        assert torch.equal(mine, r), name
    with pytest.raises(ValueError, match="sum_W: in_place needs state tensors that do not share memory, but it "
                                         "overlaps W"):
        _ext.ttt_linear_step(*args, state._replace(sum_W=state.W), in_place=True)


def test_op_updates_a_state_in_place_only_when_asked_and_it_can():
    inputs, params, (W0, b0) = make_sequence(1)
    state = TTTLinearState(W0, b0, 0.1 * torch.randn(N, H, K, K), 0.1 * torch.randn(N, H, K), torch.tensor([1, 2]))
    kw = dict(**params, mini_batch_size=C, output_final_state=True, backend="torch")
    with torch.no_grad():
        o_ref, ref = ttt_linear(*inputs, initial_state=state, **kw)
        own = TTTLinearState(*(x.clone() for x in state))
        o, new = ttt_linear(*inputs, initial_state=own, update_state_in_place=True, **kw)
        assert torch.equal(o, o_ref)
        for x, mine, r in zip(new[:4], own[:4], ref[:4]):
            assert x.data_ptr() == mine.data_ptr() and torch.equal(mine, r)
        before = [W0.clone(), b0.clone()]  # weights given as a tuple: the op's zero sums are its own, W0 is not
        ttt_linear(*inputs, initial_state=(W0, b0), update_state_in_place=True, **kw)
        assert torch.equal(W0, before[0]) and torch.equal(b0, before[1])


def test_op_keeps_the_differentiable_path_under_autograd(monkeypatch):
    inputs, params, (W0, b0) = make_sequence(1)
    monkeypatch.setattr(_ext, "ttt_linear_step", lambda *a, **kw: pytest.fail("autograd call reached the step"))
    W0.requires_grad_()
    o, _ = ttt_linear(*inputs, **params, mini_batch_size=C, initial_state=(W0, b0), backend="torch")
    assert o.requires_grad


def _bad(**change):
    inputs, params, (W0, b0) = make_sequence(1)
    q, k, v, eta = (x[:, 0] for x in inputs)
    args = dict(q=q, k=k, v=v, eta=eta, ln_weight=params["ln_weight"], ln_bias=params["ln_bias"],
                scale=params["token_scale"], W=W0, b=b0, sum_W=torch.zeros_like(W0), sum_b=torch.zeros_like(b0),
                position=torch.zeros(N, dtype=torch.long))
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(q=torch.randn(N, H * K)), ValueError, r"q: expected 3-D \[N, H, K\], got 2-D"),
        (_bad(v=torch.randn(N, H, K + 1)), ValueError, r"v: expected shape \[N, H, K\] = \[2, 3, 20\]"),
        (_bad(eta=torch.rand(N, 1, H)), ValueError, r"eta: expected 2-D \[N, H\], got 3-D"),
        (_bad(ln_weight=torch.ones(K)), ValueError, r"ln_weight: expected 2-D \[H, K\]"),
        (_bad(scale=torch.ones(H + 1, C)), ValueError, r"scale: expected shape \[H, C\] with H = 3"),
        (_bad(W=torch.randn(N, H, K, K + 1)), ValueError, r"W: expected shape \[N, H, K, K\] = \[2, 3, 20, 20\]"),
        (_bad(sum_b=torch.randn(N, K)), ValueError, r"sum_b: expected 3-D \[N, H, K\]"),
        (_bad(position=torch.zeros(N, dtype=torch.int32)), TypeError, "position: expected int64, got Int"),
        (_bad(position=torch.tensor([0, C])), ValueError, r"position: expected values in \[0, C = 3\), got 3"),
        (_bad(k=torch.ones(N, H, K, dtype=torch.int64)), TypeError, "k: expected a floating dtype"),
    ],
    ids=["q-rank", "v-shape", "eta-rank", "ln-rank", "scale-heads", "W-shape", "sum_b-rank", "position-dtype",
         "position-range", "k-dtype"],
)
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        _ext._require().ttt_linear_step(**args, use_ln=True, use_residual=True, use_bias=True, in_place=False)
