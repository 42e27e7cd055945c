"""`ttt_mlp` (TTT-MLP) on the torch dual-form path against the float64 token-by-token reference (whose inner
gradients come from `torch.func.grad`, not the closed form): outputs, final state and the gradients of q,
k, v, eta, ln_weight, ln_bias, token_scale and every part of the initial state."""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, compare, rel_rms
from ipl_layers.ops import ttt_mlp, ttt_mlp_reference
from ipl_layers.state import TTTMLPState

# Bounds on the relative RMS error against the float64 reference. float64 agrees to rounding (measured
# <= 1e-13 over all flag combinations). fp32 measured <= 6.5e-6 on outputs, states and every gradient at
# T = 45, K = 8, F = 32 (unit keys, eta in (0, 1), start weights with unit-scale activations; dtoken_scale
# the worst), and up to 9.4e-6 with K = 4, LN and no residual (LN over 4 features is ill-conditioned, as in
# `ttt_linear`'s tests); the bound leaves 10x headroom over the worst.
BOUND_F64 = 1e-10
BOUND_F32 = 1e-4
NAMES = ("q", "k", "v", "eta", "ln_weight", "ln_bias", "token_scale", "W1", "b1", "W2", "b2",
         "sum_W1", "sum_b1", "sum_W2", "sum_b2")
STATE = TTTMLPState._fields[:8]
FLAGS = [dict(use_ln=a, use_residual=b) for a, b in itertools.product([True, False], repeat=2)]


def make_inputs(B, T, H, K, b, dtype, expand=4, scale="none", lengths=None, seed=0, positions=None):
    """Unit-norm keys, eta in (0, 1), LN parameters near (1, 0), start weights with unit-scale activations;
    `scale`: "none", "shared" [b] or "head" [H, b]; `positions` (one per sequence): start mid-mini-batch with
    random gradient sums (zero at position 0)."""
    gen = torch.Generator().manual_seed(seed)
    Bq = 1 if lengths is not None else B
    N = B if lengths is None else len(lengths)
    Fd = expand * K
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(Bq, T, H, K), F.normalize(rnd(Bq, T, H, K), dim=-1), rnd(Bq, T, H, K)
    eta = torch.sigmoid(rnd(Bq, T, H))
    ln_w, ln_b = 1 + 0.1 * rnd(H, K), 0.1 * rnd(H, K)
    s = {"none": None, "shared": torch.rand(b, generator=gen, dtype=torch.float64),
         "head": torch.rand(H, b, generator=gen, dtype=torch.float64)}[scale]
    weights = [rnd(N, H, K, Fd), 0.1 * rnd(N, H, Fd), rnd(N, H, Fd, K) / Fd**0.5, 0.1 * rnd(N, H, K)]
    sums = [None] * 4
    if positions is not None:
        opened = (torch.tensor(positions) > 0).double()  # [N]
        sums = [0.1 * x * opened.view(-1, *[1] * (x.dim() - 1)) for x in (rnd(*w.shape) for w in weights)]
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    inputs = [cast(x) for x in (q, k, v, eta, ln_w, ln_b, s, *weights, *sums)]
    return inputs + [None if positions is None else torch.tensor(positions)], cu


def initial_state(*state):
    return tuple(state[:4]) if state[-1] is None else TTTMLPState(*state)


def run(backend, inputs, cu, b, **flags):
    """Output, final state and gradients of all inputs for fixed random cotangents."""
    q, k, v, eta, ln_w, ln_b, s, *state = inputs
    o, final = ttt_mlp(
        q, k, v, eta, ln_weight=ln_w, ln_bias=ln_b, token_scale=s, mini_batch_size=b,
        initial_state=initial_state(*state), output_final_state=True, cu_seqlens=cu, backend=backend, **flags,
    )
    gen = torch.Generator().manual_seed(1)
    outs = (o, *final[:8])
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in outs]
    loss = sum((x * c).sum() for x, c in zip(outs, cot))
    present = [x for x in inputs[:-1] if x is not None]
    grads = torch.autograd.grad(loss, present, allow_unused=True, materialize_grads=True)
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    return {"o": o, **dict(zip(STATE, final[:8])), "position": final.position,
            **{f"d{n}": d for n, d in zip(names, grads)}}


def reference(inputs, cu, b, **flags):
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs[:-1]]
    return run("reference", leaves + inputs[-1:], cu, b, **flags)


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(k[4:] for k, on in f.items() if on) or "plain")
def test_flag_combinations_float64(flags):
    inputs, cu = make_inputs(2, 13, 2, 4, 4, torch.float64, scale="head")
    compare(run("torch", inputs, cu, 4, **flags), reference(inputs, cu, 4, **flags), BOUND_F64)


@pytest.mark.parametrize("T", [0, 1, 9])
@pytest.mark.parametrize("b", [1, 4])
def test_lengths_and_mini_batch_sizes_float64(T, b):
    inputs, cu = make_inputs(2, T, 1, 4, b, torch.float64, expand=2)
    compare(run("torch", inputs, cu, b), reference(inputs, cu, b), BOUND_F64)


@pytest.mark.parametrize("scale", ["none", "head"])
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["ln-residual", "plain"])
def test_float32(scale, flags):
    inputs, cu = make_inputs(2, 45, 2, 8, 16, torch.float32, scale=scale)
    compare(run("torch", inputs, cu, 16, **flags), reference(inputs, cu, 16, **flags), BOUND_F32)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
def test_varlen_with_empty_sequences_mid_mini_batch(dtype, bound):
    inputs, cu = make_inputs(4, 27, 2, 4, 4, dtype, lengths=[9, 0, 15, 3], positions=[3, 1, 0, 2], scale="shared")
    compare(run("torch", inputs, cu, 4), reference(inputs, cu, 4), bound)


@settings(max_examples=6)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=3),
    packed=st.booleans(),
    expand=st.sampled_from([1, 2]),
    b=st.sampled_from([1, 3, 8]),
    scale=st.sampled_from(["none", "shared", "head"]),
    flags=st.sampled_from(FLAGS),
    mid=st.booleans(),
)
def test_torch_path_hypothesis(lengths, packed, expand, b, scale, flags, mid):
    positions = [(3 * n + 1) % b for n in range(len(lengths) if packed else 1)] if mid else None
    if packed:
        inputs, cu = make_inputs(len(lengths), sum(lengths), 2, 4, b, torch.float32, expand, scale, lengths=lengths,
                                 positions=positions)
    else:
        inputs, cu = make_inputs(1, lengths[0], 2, 4, b, torch.float32, expand, scale, positions=positions)
    compare(run("torch", inputs, cu, b, **flags), reference(inputs, cu, b, **flags), BOUND_F32)


@pytest.mark.parametrize("lengths,positions", [(None, None), ([9, 0, 15, 3], [3, 1, 3, 2])])
def test_inference_forward_runs_in_segments(lengths, positions, monkeypatch):
    # Without gradients the torch path runs SEGMENT_CHUNKS mini-batches at a time (2 here), each from the
    # weights the one before ended with: b = 4 makes T = 21 six mini-batches (three runs), and a longest
    # sequence of 15 after 3 open positions five (runs of 2, 2, 1).
    chunk_module = importlib.import_module("ipl_layers.ops.ttt_mlp_chunk")
    calls, real = [], chunk_module._run
    monkeypatch.setattr(chunk_module, "_run", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(chunk_module, "SEGMENT_CHUNKS", 2)
    T = 21 if lengths is None else sum(lengths)
    inputs, cu = make_inputs(2, T, 2, 4, 4, torch.float64, lengths=lengths, positions=positions)
    q, k, v, eta, ln_w, ln_b, s, *state = (x.detach() if x is not None else None for x in inputs)
    kw = dict(ln_weight=ln_w, ln_bias=ln_b, token_scale=s, mini_batch_size=4, initial_state=initial_state(*state),
              output_final_state=True, cu_seqlens=cu)
    o, final = ttt_mlp(q, k, v, eta, backend="torch", **kw)
    assert calls == [2, 2, 2] if lengths is None else calls == [2, 2, 1]
    o_ref, final_ref = ttt_mlp(q, k, v, eta, backend="reference", **kw)
    assert_rel_rms("o", o, o_ref, BOUND_F64)
    for name, x, y in zip(STATE, final, final_ref):
        assert_rel_rms(name, x, y, BOUND_F64)
    assert torch.equal(final.position, final_ref.position)


def test_gradcheck():
    # the whole op, float64, every differentiable input at once: finite differences against autograd
    inputs, cu = make_inputs(1, 6, 1, 2, 4, torch.float64, expand=2, scale="shared", positions=[1])
    q, k, v, eta, ln_w, ln_b, s, *state = inputs

    def f(*xs):
        o, final = ttt_mlp(*xs[:4], ln_weight=xs[4], ln_bias=xs[5], token_scale=xs[6], mini_batch_size=4,
                           initial_state=TTTMLPState(*xs[7:], state[-1]), output_final_state=True, backend="torch")
        return (o, *final[:8])

    assert torch.autograd.gradcheck(f, [q, k, v, eta, ln_w, ln_b, s, *state[:-1]])


@pytest.mark.parametrize("split", [0, 3, 4, 7, 13])
def test_state_carries_across_calls(split):
    # two calls split anywhere, on a mini-batch boundary or inside one, equal one call
    (q, k, v, eta, ln_w, ln_b, _, *weights), _ = make_inputs(2, 13, 2, 4, 4, torch.float64)
    kw = dict(ln_weight=ln_w, ln_bias=ln_b, mini_batch_size=4, output_final_state=True)
    o, final = ttt_mlp(q, k, v, eta, initial_state=weights[:4], **kw)
    parts = [x[:, :split] for x in (q, k, v, eta)], [x[:, split:] for x in (q, k, v, eta)]
    o1, state = ttt_mlp(*parts[0], initial_state=weights[:4], **kw)
    assert state.position.tolist() == [split % 4] * 2
    o2, final2 = ttt_mlp(*parts[1], initial_state=state, **kw)
    assert_rel_rms("o", torch.cat([o1, o2], 1), o, BOUND_F64)
    for name, x, y in zip(STATE, final2, final):
        assert_rel_rms(name, x, y, BOUND_F64)
    assert torch.equal(final2.position, final.position)


def test_prefill_then_decode_equals_one_call():
    # varlen prefill (one sequence empty), then token-by-token decode of all sequences as a batch
    (q, k, v, eta, ln_w, ln_b, _, *weights), _ = make_inputs(3, 11, 2, 4, 4, torch.float64)
    kw = dict(ln_weight=ln_w, ln_bias=ln_b, mini_batch_size=4, output_final_state=True)
    o, final = ttt_mlp(q, k, v, eta, initial_state=weights[:4], **kw)
    lengths = [5, 0, 7]
    cu = torch.tensor([0, 5, 5, 12])
    packed = [torch.cat([x[n, :L] for n, L in enumerate(lengths)])[None] for x in (q, k, v, eta)]
    o_pre, state = ttt_mlp(*packed, initial_state=weights[:4], cu_seqlens=cu, **kw)
    outs = [list(o_pre[0, cu[n]:cu[n + 1]].unbind(0)) for n in range(3)]
    for t in range(11 - min(lengths)):
        rows = [min(lengths[n] + t, 10) for n in range(3)]  # sequences already at the end repeat their last token
        step = [torch.stack([x[n, r] for n, r in enumerate(rows)])[:, None] for x in (q, k, v, eta)]
        o_t, new = ttt_mlp(*step, initial_state=state, **kw)
        live = torch.tensor([lengths[n] + t < 11 for n in range(3)])
        state = TTTMLPState(*(torch.where(live.view(-1, *[1] * (x.dim() - 1)), y, x) for x, y in zip(state, new)))
        for n in range(3):
            if live[n]:
                outs[n].append(o_t[n, 0])
    assert_rel_rms("o", torch.stack([torch.stack(x) for x in outs]), o, BOUND_F64)
    for name, x, y in zip(STATE, state, final):
        assert_rel_rms(name, x, y, BOUND_F64)
    assert torch.equal(state.position, final.position)


def test_weights_are_those_of_the_last_output():
    # o_T = q_T + LN(gelu(q_T W1 + b1) W2 + b2) with the final state's weights(token_scale)
    (q, k, v, eta, ln_w, ln_b, s, *weights), _ = make_inputs(2, 11, 2, 4, 4, torch.float64, scale="head")
    o, final = ttt_mlp(q, k, v, eta, ln_weight=ln_w, ln_bias=ln_b, token_scale=s, mini_batch_size=4,
                       initial_state=weights[:4], output_final_state=True)
    assert final.position.tolist() == [3, 3]
    W1, b1, W2, b2 = final.weights(s)
    z = torch.einsum("bhf,bhfk->bhk", F.gelu(torch.einsum("bhk,bhkf->bhf", q[:, -1], W1) + b1, approximate="tanh"),
                     W2) + b2
    assert_rel_rms("o", o[:, -1], q[:, -1] + F.layer_norm(z, (4,), eps=1e-6) * ln_w + ln_b, BOUND_F64)


def test_zero_eta_keeps_the_initial_weights():
    (q, k, v, eta, _, _, _, W1, b1, W2, b2, *_), _ = make_inputs(2, 9, 2, 4, 4, torch.float64)
    o, final = ttt_mlp(q, k, v, torch.zeros_like(eta), mini_batch_size=4, initial_state=(W1, b1, W2, b2),
                       output_final_state=True)
    for x, y in zip(final[:4], (W1, b1, W2, b2)):
        assert torch.equal(x, y)
    assert not any(x.any() for x in final[4:8])


def test_long_sequence_large_learning_rate_is_finite():
    # T = 65,536 with eta ~ 1 (every step a full gradient step): through the LN the inner gradients shrink as
    # the weights grow, so they stay bounded; the output and final state must be finite.
    (q, k, v, eta, ln_w, ln_b, _, *weights), _ = make_inputs(1, 65536, 1, 16, 16, torch.float32)
    with torch.no_grad():
        o, final = ttt_mlp(q, k, v, torch.sigmoid(torch.randn_like(eta) + 6), ln_weight=ln_w, ln_bias=ln_b,
                           initial_state=weights[:4], output_final_state=True)
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in final[:8])


@pytest.mark.slow
def test_long_sequence_gradients_finite():
    inputs, cu = make_inputs(1, 65536, 1, 16, 16, torch.float32)
    with torch.no_grad():
        inputs[3].copy_(torch.sigmoid(torch.randn_like(inputs[3]) + 6))  # eta
    for name, x in run("torch", inputs, cu, 16).items():
        assert torch.isfinite(x.float()).all(), name


def test_low_precision_inputs_give_v_dtype_and_fp32_state():
    inputs, cu = make_inputs(1, 40, 2, 8, 16, torch.bfloat16)
    got, ref = run("torch", inputs, cu, 16), reference(inputs, cu, 16)
    assert got["o"].dtype == torch.bfloat16 and got["W1"].dtype == torch.float32
    for name in ("o", "dq", "dk", "dv", "deta"):  # at most 2x the error of rounding the exact result to bf16
        assert_rel_rms(name, got[name], ref[name], 2 * rel_rms(ref[name].to(torch.bfloat16), ref[name]))


def test_default_backend_and_bad_backend(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    (q, k, v, eta, _, _, _, W1, b1, W2, b2, *_), _ = make_inputs(1, 9, 1, 4, 4, torch.float64)
    kw = dict(mini_batch_size=4, initial_state=(W1, b1, W2, b2))
    assert_rel_rms("o", ttt_mlp(q, k, v, eta, **kw)[0], ttt_mlp_reference(q, k, v, eta, **kw)[0], BOUND_F64)
    monkeypatch.setenv("IPL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"IPL_BACKEND = 'nonsense' is not one of \('reference', 'torch'\)"):
        ttt_mlp(q, k, v, eta, **kw)


def _qkve(B=2, T=5, H=2, K=4):
    return [torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.rand(B, T, H)]


def _weights(N=2, H=2, K=4, Fd=16):
    return [torch.zeros(N, H, K, Fd), torch.zeros(N, H, Fd), torch.zeros(N, H, Fd, K), torch.zeros(N, H, K)]


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (lambda: [*_qkve()[:2], torch.randn(2, 5, 2, 6), _qkve()[3]], {}, r"v: expected shape \[B, T, H, V \(V == K\)"),
        (lambda: [*_qkve()[:3], torch.rand(2, 5, 3)], {}, r"eta: expected shape \[B, T, H\] = \[2, 5, 2\]"),
        (_qkve, dict(token_scale=torch.ones(3)), r"token_scale: expected shape \[b\] = \[16\], got \[3\]"),
        (_qkve, dict(expand=0), r"expand: expected a positive int, got 0"),
        (_qkve, dict(initial_state=torch.zeros(2, 2, 4, 16)), r"initial_state: expected a TTTMLPState or a tuple"),
        (_qkve, dict(initial_state=_weights()[:3]), r"initial_state: expected a TTTMLPState or a tuple"),
        (_qkve, dict(initial_state=[*_weights()[:2], torch.zeros(2, 2, 8, 4), _weights()[3]]),
         r"initial_state W2: expected shape \[N, H, F, K\] = \[2, 2, 16, 4\]"),
        (_qkve, dict(initial_state=[torch.zeros(2, 2, 4, 16, dtype=torch.int64), *_weights()[1:]]),
         r"initial_state W1: expected a floating dtype"),
        (_qkve, dict(initial_state=TTTMLPState(*_weights(), *_weights(), torch.tensor([0, 16]))),
         r"initial_state position: expected values in \[0, mini_batch_size = 16\), got \[0, 16\]"),
        (_qkve, dict(initial_state=TTTMLPState(*_weights(), *_weights()[:3], torch.zeros(2, 4), torch.zeros(2))),
         r"initial_state sum_b2: expected 3-D"),
    ],
)
def test_bad_inputs(args, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ttt_mlp(*args(), backend="torch", **kw)
