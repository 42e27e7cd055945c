"""The C++ CPU extension's TTT-MLP decoding step against the op's float64 reference and its torch path over several
mini-batches (outputs and every state tensor), from a boundary and from mid-mini-batch states, its aliasing and
input checks, and the op's dispatch to it (one token, no autograd, on CPU)."""

import pytest
import torch
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.ops import ttt_mlp
from ipl_layers.ops.ttt_mlp import ttt_mlp_reference
from ipl_layers.state import TTTMLPState

# fp32 state and accumulation (K = 20 and F = 40 terms per dot, tanh GELU and its slope, two LNs, up to C gradient
# sums per mini-batch) after T = 11 tokens (3 mini-batch commits at C = 3), max over 5 seeds, both starts and all
# flags: against the float64 reference measured <= 2.2e-7 (o) and <= 5.4e-7 (states; the torch path's own error is
# <= 4.4e-7), against the fp32 torch path <= 2.8e-7 (o) and <= 7.1e-7 (states).
BOUND = 2e-6
# bf16 outputs of the step and of the torch path: a few round to the neighbouring bf16 value (2^-8 relative each);
# measured <= 3.9e-5 over 3 seeds.
BF16_BOUND = 1e-3
N, H, K, F, C, T = 2, 3, 20, 40, 3, 11  # K, F not multiples of the 16-column tile: the last tiles are partial
FLAGS = [dict(use_ln=ln, use_residual=res) for ln, res in [(True, True), (True, False), (False, True), (False, False)]]
FLAG_IDS = ["ln-res", "ln-only", "res-only", "plain"]


def make_sequence(dtype=torch.float32):
    q, k, v = (torch.randn(N, T, H, K, dtype=dtype) for _ in range(3))  # [N, T, H, K]
    eta = (0.1 * torch.rand(N, T, H)).to(dtype)  # [N, T, H]
    ln_weight, ln_bias = 1 + 0.1 * torch.randn(H, K), 0.1 * torch.randn(H, K)  # [H, K]
    token_scale = 1 / torch.arange(1, C + 1) + 0.05 * torch.randn(H, C)  # [H, C]
    weights = (torch.randn(N, H, K, F) / K**0.5, 0.1 * torch.randn(N, H, F),  # W1 [N, H, K, F], b1 [N, H, F]
               torch.randn(N, H, F, K) / F**0.5, 0.1 * torch.randn(N, H, K))  # W2 [N, H, F, K], b2 [N, H, K]
    return (q, k, v, eta), dict(ln_weight=ln_weight, ln_bias=ln_bias, token_scale=token_scale), weights


def mid_mini_batch(weights):
    """A state with open mini-batches: sequence 0 one token in, sequence 1 two (sums of that many gradients' size)."""
    sums = [0.05 * torch.randn_like(w) for w in weights]
    return TTTMLPState(*weights, *sums, torch.tensor([1, 2]))


def decode(inputs, params, state, flags):
    """The op one token at a time from `state` under no_grad; returns o [N, T, H, K] and the final state."""
    q, k, v, eta = inputs
    outs = []
    with torch.no_grad():
        for t in range(T):
            tok = slice(t, t + 1)
            o, state = ttt_mlp(q[:, tok], k[:, tok], v[:, tok], eta[:, tok], **params, mini_batch_size=C,
                               initial_state=state, output_final_state=True, backend="torch", **flags)
            outs.append(o)
    return torch.cat(outs, dim=1), state


def assert_states_close(state, ref):
    for name, x, r in zip(TTTMLPState._fields[:8], state, ref):
        assert x.dtype == torch.float32, f"{name}: {x.dtype}"
        assert_rel_rms(name, x, r, BOUND)
    assert state.position.dtype == torch.long
    assert torch.equal(state.position, ref.position)


@pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("start", ["at-boundary", "mid-mini-batch"])
def test_op_decodes_through_the_step_and_follows_reference_and_torch_path(flags, start, monkeypatch):
    # T tokens decoded one call at a time (dispatching to the C++ step) equal the reference over the sequence:
    # gradients accumulate within each open mini-batch and commit at its end, 3 times
    inputs, params, weights = make_sequence()
    state = weights if start == "at-boundary" else mid_mini_batch(weights)
    o_ref, final_ref = ttt_mlp_reference(*(x.double() for x in inputs), **{n: p.double() for n, p in params.items()},
                                         mini_batch_size=C, initial_state=tuple(x.double() if x.is_floating_point()
                                                                                else x for x in state),
                                         output_final_state=True, **flags)
    calls = []
    step = _ext.ttt_mlp_step
    monkeypatch.setattr(_ext, "ttt_mlp_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    before = [x.clone() for x in state]
    o, final = decode(inputs, params, state, flags)
    assert len(calls) == T, "the op did not decode through the C++ step"
    assert all(torch.equal(x, b) for x, b in zip(state, before)), "the initial state was modified"
    assert_rel_rms("o", o, o_ref, BOUND)
    assert_states_close(final, final_ref)
    monkeypatch.setattr(_ext, "available", lambda: False)  # the torch path on the same tokens
    o_torch, final_torch = decode(inputs, params, state, flags)
    assert len(calls) == T, "the torch path reached the C++ step"
    assert_rel_rms("o vs torch path", o, o_torch, BOUND)
    assert_states_close(final, final_torch)


def test_bf16_inputs_follow_the_fp32_torch_path(monkeypatch):
    # bf16 inputs are staged to fp32 as the torch path does: the two agree to fp32 rounding
    inputs, params, weights = make_sequence(torch.bfloat16)
    o, final = decode(inputs, params, weights, FLAGS[0])
    monkeypatch.setattr(_ext, "available", lambda: False)
    o_ref, final_ref = decode(inputs, params, weights, FLAGS[0])
    assert o.dtype == torch.bfloat16
    assert_rel_rms("o", o.float(), o_ref.float(), BF16_BOUND)
    assert_states_close(final, final_ref)


def _step_args():
    inputs, params, weights = make_sequence()
    q, k, v, eta = (x[:, 1] for x in inputs)  # [N, H, K], [N, H]: views with T strides
    return (q, k, v, eta, params["ln_weight"], params["ln_bias"], params["token_scale"]), mid_mini_batch(weights)


def test_strided_inputs_and_no_aliasing():
    args, state = _step_args()
    strided = TTTMLPState(state.W1.transpose(2, 3).contiguous().transpose(2, 3), *state[1:])
    assert not args[0].is_contiguous() and not strided.W1.is_contiguous()
    before = [x.clone() for x in strided]
    o, new = _ext.ttt_mlp_step(*args, strided)
    assert all(torch.equal(x, b) for x, b in zip(strided, before)), "the input state was modified"
    o_ref, new_ref = _ext.ttt_mlp_step(*(x.contiguous() for x in args), state)
    assert torch.equal(o, o_ref)
    for name, x, r, old in zip(TTTMLPState._fields, new, new_ref, state):
        assert torch.equal(x, r), name
        assert x.untyped_storage().data_ptr() != old.untyped_storage().data_ptr(), f"{name} aliases its input"


@pytest.mark.parametrize("position", [0, C - 1], ids=["open", "commit"])
def test_in_place_writes_the_same_state_over_the_input(position):
    # the new state written over the state's own tensors (returned as they are) equals the out-of-place step's
    args, state = _step_args()
    state = state._replace(position=torch.full((N,), position))
    o_ref, new_ref = _ext.ttt_mlp_step(*args, state)
    own = TTTMLPState(*(x.clone() for x in state))
    o, new = _ext.ttt_mlp_step(*args, own, in_place=True)
    assert torch.equal(o, o_ref)
    for name, x, mine, r in zip(TTTMLPState._fields[:8], new, own, new_ref):
        assert x is mine or x.data_ptr() == mine.data_ptr(), f"{name}: not written in place"
        assert torch.equal(mine, r), name
    assert torch.equal(new.position, new_ref.position)


@pytest.mark.parametrize("change, match", [
    (lambda s: s._replace(W1=s.W1.transpose(2, 3).contiguous().transpose(2, 3)),
     r"W1: in_place needs a contiguous float32 tensor, got Float \(non-contiguous\)"),
    (lambda s: s._replace(b2=s.b2.double()), "b2: in_place needs a contiguous float32 tensor, got Double"),
    (lambda s: s._replace(sum_b1=s.b1), "sum_b1: in_place needs state tensors that do not share memory, but it "
                                        "overlaps b1"),
], ids=["strided", "float64", "aliased"])
def test_in_place_refuses_states_it_cannot_write_over(change, match):
    args, state = _step_args()
    with pytest.raises(ValueError, match=match):
        _ext.ttt_mlp_step(*args, change(state), in_place=True)


def test_op_updates_a_state_in_place_only_when_asked_and_it_can(monkeypatch):
    inputs, params, weights = make_sequence()
    state = mid_mini_batch(weights)
    tok = [x[:, :1] for x in inputs]
    kw = dict(**params, mini_batch_size=C, output_final_state=True, backend="torch")
    with torch.no_grad():
        o_ref, ref = ttt_mlp(*tok, initial_state=state, **kw)
        own = TTTMLPState(*(x.clone() for x in state))
        o, new = ttt_mlp(*tok, initial_state=own, update_state_in_place=True, **kw)
        assert torch.equal(o, o_ref)
        assert all(x.data_ptr() == mine.data_ptr() for x, mine in zip(new[:8], own[:8]))
        assert_states_close(TTTMLPState(*own[:8], new.position), ref)  # the position is a new [N] tensor
        # a state the step cannot write over (one weight shared by the whole batch) is left as it is
        shared = TTTMLPState(state.W1[:1].expand(N, -1, -1, -1), *state[1:])
        before = [x.clone() for x in shared]
        ttt_mlp(*tok, initial_state=shared, update_state_in_place=True, **kw)
        assert all(torch.equal(x, b) for x, b in zip(shared, before))
        # nor are start weights given as a tuple (not an earlier call's state)
        before = [w.clone() for w in weights]
        ttt_mlp(*tok, initial_state=weights, update_state_in_place=True, **kw)
        assert all(torch.equal(w, b) for w, b in zip(weights, before))


def test_commit_zeroes_the_sums():
    # position C - 1: this token closes the mini-batch, so the new sums are zero and the position wraps to 0
    args, state = _step_args()
    state = state._replace(position=torch.full((N,), C - 1))
    _, new = _ext.ttt_mlp_step(*args, state)
    for name, x in zip(TTTMLPState._fields[4:8], new[4:8]):
        assert torch.equal(x, torch.zeros_like(x)), name
    assert torch.equal(new.position, torch.zeros(N, dtype=torch.long))


def test_op_keeps_the_differentiable_path_under_autograd(monkeypatch):
    inputs, params, weights = make_sequence()
    monkeypatch.setattr(_ext, "ttt_mlp_step", lambda *a, **kw: pytest.fail("autograd call reached the step"))
    W1 = weights[0].requires_grad_()
    o, _ = ttt_mlp(*(x[:, :1] for x in inputs), **params, mini_batch_size=C, initial_state=(W1, *weights[1:]),
                   backend="torch")
    assert o.requires_grad


def _bad(**change):
    (q, k, v, eta, ln_weight, ln_bias, scale), state = _step_args()
    args = dict(q=q, k=k, v=v, eta=eta, ln_weight=ln_weight, ln_bias=ln_bias, scale=scale, **state._asdict())
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(q=torch.randn(N, H * K)), ValueError, r"q: expected 3-D \[N, H, K\], got 2-D"),
        (_bad(q=torch.randn(N, H, K, device="meta")), ValueError, "q: expected a CPU tensor, got device meta"),
        (_bad(v=torch.randn(N, H, K + 1)), ValueError, r"v: expected shape \[N, H, K\] = \[2, 3, 20\]"),
        (_bad(eta=torch.rand(N, 1, H)), ValueError, r"eta: expected 2-D \[N, H\], got 3-D"),
        (_bad(ln_weight=torch.ones(K)), ValueError, r"ln_weight: expected 2-D \[H, K\]"),
        (_bad(scale=torch.ones(H + 1, C)), ValueError, r"scale: expected shape \[H, C\] with H = 3"),
        (_bad(W1=torch.randn(N, H, K * F)), ValueError, r"W1: expected 4-D \[N, H, K, F\], got 3-D"),
        (_bad(W2=torch.randn(N, H, K, F)), ValueError,
         r"W2: expected shape \[N, H, F, K\] = \[2, 3, 40, 20\], got \[2, 3, 20, 40\]"),
        (_bad(b1=torch.randn(N, H, K)), ValueError, r"b1: expected shape \[N, H, F\] = \[2, 3, 40\]"),
        (_bad(sum_W1=torch.randn(N, H, K, F + 1)), ValueError, r"sum_W1: expected shape \[N, H, K, F\]"),
        (_bad(sum_b2=torch.randn(N, K)), ValueError, r"sum_b2: expected 3-D \[N, H, K\]"),
        (_bad(position=torch.zeros(N, dtype=torch.int32)), TypeError, "position: expected int64, got Int"),
        (_bad(position=torch.tensor([0, C])), ValueError, r"position: expected values in \[0, C = 3\), got 3"),
        (_bad(k=torch.ones(N, H, K, dtype=torch.int64)), TypeError, "k: expected a floating dtype"),
    ],
    ids=["q-rank", "q-device", "v-shape", "eta-rank", "ln-rank", "scale-heads", "W1-rank", "W2-transposed",
         "b1-shape", "sum_W1-shape", "sum_b2-rank", "position-dtype", "position-range", "k-dtype"],
)
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        _ext._require().ttt_mlp_step(**args, use_ln=True, use_residual=True, in_place=False)
