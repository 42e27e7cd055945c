"""`titans_memory` (the Titans neural memory) on the torch chunked path against the float64 token-by-token
reference (whose gradients at the chunk-start weights come from `torch.func.grad`): outputs, final state and
the gradients of q, k, v, theta, eta, alpha, ln_weight, ln_bias and every part of the initial state; the
delta-rule identity; state across calls and decoding."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, compare, rel_rms
from ipl_layers.ops import delta_rule, titans_memory, titans_memory_reference
from ipl_layers.state import TitansState

# Bounds on the relative RMS error against the float64 reference. float64 agrees to rounding (measured
# <= 7.4e-13 over depths 1-3 and all flags). fp32 measured <= 2.2e-5 on outputs, states and every gradient
# (T = 45, K = 8, F = 32, chunk 16; dalpha and deta the worst: they sum products of gates over a chunk);
# the bound leaves 4.5x headroom over the worst.
BOUND_F64 = 1e-10
BOUND_F32 = 1e-4
INPUTS = ("q", "k", "v", "theta", "eta", "alpha", "ln_weight", "ln_bias")
FLAGS = [dict(use_ln=False, use_residual=False), dict(use_ln=True, use_residual=True),
         dict(use_ln=True, use_residual=False), dict(use_ln=False, use_residual=True)]


def make_inputs(B, T, H, K, depth, dtype, expand=2, lengths=None, seed=0, positions=None):
    """Unit-norm keys, theta in (0, 0.5), eta in (0, 1), alpha in (0, 0.25), LN parameters near (1, 0), start
    weights with unit-scale activations; `positions` (one per sequence): a state mid-chunk (random momentum and
    current weights besides the start weights)."""
    gen = torch.Generator().manual_seed(seed)
    Bq = 1 if lengths is not None else B
    N = B if lengths is None else len(lengths)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(Bq, T, H, K), F.normalize(rnd(Bq, T, H, K), dim=-1), rnd(Bq, T, H, K)
    theta, eta, alpha = (c * torch.sigmoid(rnd(Bq, T, H)) for c in (0.5, 1.0, 0.25))
    ln_w, ln_b = 1 + 0.1 * rnd(H, K), 0.1 * rnd(H, K)
    dims = (K, *[expand * K] * (depth - 1), K)
    weights = [rnd(N, H, a, b) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
    state = weights
    if positions is not None:
        state = [*weights, *[0.1 * rnd(*w.shape) for w in weights], *[w + 0.1 * rnd(*w.shape) for w in weights]]
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cast = lambda x: x.to(dtype).requires_grad_()  # noqa: E731
    inputs = [cast(x) for x in (q, k, v, theta, eta, alpha, ln_w, ln_b, *state)]
    return inputs + [None if positions is None else torch.tensor(positions)], cu


def initial_state(state, position):
    return tuple(state) if position is None else TitansState(*state, position)


def run(backend, inputs, cu, C, dtype=None, **flags):
    """Output, final state and gradients of all inputs for fixed random cotangents, rounded as the torch path's
    outputs are for inputs of `dtype` (o in that dtype, the state in fp32) so that both runs get the same."""
    q, k, v, theta, eta, alpha, ln_w, ln_b, *state, position = inputs
    o, final = titans_memory(
        q, k, v, theta, eta, alpha, ln_weight=ln_w, ln_bias=ln_b, chunk_size=C,
        initial_state=initial_state(state, position), output_final_state=True, cu_seqlens=cu, backend=backend,
        **flags,
    )
    gen = torch.Generator().manual_seed(1)
    outs = (o, *final[:-1])
    dtype = dtype or q.dtype
    rounded = [dtype] + [torch.float64 if dtype == torch.float64 else torch.float32] * (len(outs) - 1)
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(r).to(x.dtype) for x, r in zip(outs, rounded)]
    loss = sum((x * c).sum() for x, c in zip(outs, cot))
    grads = torch.autograd.grad(loss, inputs[:-1], allow_unused=True, materialize_grads=True)
    L = final.depth
    names = [*INPUTS, *[f"state{i}" for i in range(len(state))]]
    return {"o": o, **{f"start{l}": x for l, x in enumerate(final.start)},
            **{f"momentum{l}": x for l, x in enumerate(final.momentum)},
            **{f"weights{l}": x for l, x in enumerate(final.weights)}, "position": final.position,
            **{f"d{n}": d for n, d in zip(names, grads)}, "depth": torch.tensor(L)}


def reference(inputs, cu, C, **flags):
    leaves = [x.detach().double().requires_grad_() for x in inputs[:-1]]
    return run("reference", leaves + inputs[-1:], cu, C, inputs[0].dtype, **flags)


@pytest.mark.parametrize("normalize_step", [False, True], ids=["", "normalized"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(k[4:] for k, on in f.items() if on) or "plain")
def test_depths_and_flags_float64(depth, flags, normalize_step):
    inputs, cu = make_inputs(2, 13, 2, 4, depth, torch.float64)
    flags = dict(flags, normalize_step=normalize_step)
    compare(run("torch", inputs, cu, 4, **flags), reference(inputs, cu, 4, **flags), BOUND_F64)


@pytest.mark.parametrize("T", [0, 1, 9])
@pytest.mark.parametrize("C", [1, 4])
def test_lengths_and_chunk_sizes_float64(T, C):
    inputs, cu = make_inputs(2, T, 1, 4, 2, torch.float64)
    compare(run("torch", inputs, cu, C), reference(inputs, cu, C), BOUND_F64)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[1], dict(FLAGS[0], normalize_step=True),
                                   dict(FLAGS[1], normalize_step=True)],
                         ids=["plain", "ln-residual", "plain-normalized", "ln-residual-normalized"])
def test_float32(flags):
    inputs, cu = make_inputs(2, 45, 2, 8, 2, torch.float32, expand=4)
    compare(run("torch", inputs, cu, 16, **flags), reference(inputs, cu, 16, **flags), BOUND_F32)


@pytest.mark.parametrize("normalize_step", [False, True], ids=["", "normalized"])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
def test_varlen_with_empty_sequences_mid_chunk(dtype, bound, normalize_step):
    inputs, cu = make_inputs(4, 27, 2, 4, 2, dtype, lengths=[9, 0, 15, 3], positions=[3, 1, 0, 2])
    flags = dict(normalize_step=normalize_step)
    compare(run("torch", inputs, cu, 4, **flags), reference(inputs, cu, 4, **flags), bound)


@settings(max_examples=6)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=3),
    packed=st.booleans(),
    depth=st.sampled_from([1, 2]),
    C=st.sampled_from([1, 3, 8]),
    flags=st.sampled_from(FLAGS),
    mid=st.booleans(),
    normalize_step=st.booleans(),
)
def test_torch_path_hypothesis(lengths, packed, depth, C, flags, mid, normalize_step):
    flags = dict(flags, normalize_step=normalize_step)
    positions = [(3 * n + 1) % C for n in range(len(lengths) if packed else 1)] if mid else None
    if packed:
        inputs, cu = make_inputs(len(lengths), sum(lengths), 2, 4, depth, torch.float32, lengths=lengths,
                                 positions=positions)
    else:
        inputs, cu = make_inputs(1, lengths[0], 2, 4, depth, torch.float32, positions=positions)
    compare(run("torch", inputs, cu, C, **flags), reference(inputs, cu, C, **flags), BOUND_F32)


@pytest.mark.parametrize("lengths,positions", [(None, None), ([9, 0, 15, 3], [3, 1, 3, 2])])
def test_runs_of_chunks(lengths, positions, monkeypatch):
    # The torch path runs SEGMENT_CHUNKS chunks at a time (2 here), each run from the states the one before
    # ended with: chunk 4 makes T = 21 six chunks (three runs), and a longest sequence of 15 after 3 open
    # positions five (runs of 2, 2, 1). Autograd keeps one run's intermediates at a time: the backward runs
    # each run's forward again (last run first).
    chunk_module = importlib.import_module("ipl_layers.ops.titans_chunk")
    calls, real = [], chunk_module._run
    monkeypatch.setattr(chunk_module, "_run", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(chunk_module, "SEGMENT_CHUNKS", 2)
    T = 21 if lengths is None else sum(lengths)
    inputs, cu = make_inputs(2, T, 2, 4, 2, torch.float64, lengths=lengths, positions=positions)
    got = run("torch", inputs, cu, 4)
    runs = [2, 2, 2] if lengths is None else [2, 2, 1]
    assert calls == runs + runs[::-1]
    compare(got, reference(inputs, cu, 4), BOUND_F64)


@pytest.mark.parametrize("normalize_step", [False, True], ids=["", "normalized"])
def test_gradcheck(normalize_step):
    # the whole op, float64, every differentiable input at once (mid-chunk state): finite differences
    inputs, _ = make_inputs(1, 6, 1, 2, 2, torch.float64, positions=[1])
    *xs, position = inputs

    def f(*xs):
        o, final = titans_memory(*xs[:6], ln_weight=xs[6], ln_bias=xs[7], chunk_size=4, use_ln=True,
                                 use_residual=True, initial_state=TitansState(*xs[8:], position),
                                 output_final_state=True, normalize_step=normalize_step, backend="torch")
        return (o, *final[:-1])

    assert torch.autograd.gradcheck(f, xs)


@pytest.mark.parametrize("C", [1, 4])
def test_delta_rule_identity(C):
    # L = 1, no wrapper, eta = alpha = 0, chunk 1: M_t = M_t-1 + 2 theta_t k_t^T (v_t - k_t M_t-1) and
    # y_t = q_t M_t, the delta rule with beta = 2 theta and scale 1 (reading the state after the token's
    # update). With chunks of 4 the gradients are taken at the chunk's start weights instead, and it is not.
    (q, k, v, theta, eta, alpha, *_, W, _), _ = make_inputs(2, 11, 2, 4, 1, torch.float64)
    zero = torch.zeros_like(eta)
    o, final = titans_memory(q, k, v, theta, zero, zero, chunk_size=C, initial_state=(W,), output_final_state=True)
    o_delta, S = delta_rule(q, k, v, beta=2 * theta, scale=1.0, initial_state=W, output_final_state=True)
    if C == 1:
        assert_rel_rms("o", o, o_delta, BOUND_F64)
        assert_rel_rms("M", final.weights[0], S, BOUND_F64)
    else:
        assert rel_rms(o, o_delta) > 1e-3


def test_normalized_step_removes_the_step_fraction_of_the_error():
    # L = 1, no wrapper, one token read at its own key: M' = M - theta / (1 + 2 |k|^2) 2 k^T r, so the error
    # M'(k) - v = r (1 - theta 2 |k|^2 / (1 + 2 |k|^2)) exactly (a linear memory is its own linearisation),
    # whatever the key's norm; unscaled it is r (1 - 2 theta |k|^2) and overshoots once theta |k|^2 > 1
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.1, 1.0, 10.0]).view(1, 1, 3, 1)
    v = torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64)
    W = torch.randn(1, 3, 4, 4, generator=gen, dtype=torch.float64)
    theta, zero = torch.full((1, 1, 3), 0.9, dtype=torch.float64), torch.zeros(1, 1, 3, dtype=torch.float64)
    kk = k.pow(2).sum(-1)  # [1, 1, 3]
    r = torch.einsum("bthk,bhkv->bthv", k, W) - v
    for backend in ("reference", "torch"):
        for normalize_step, kept in ((True, 1 - theta * 2 * kk / (1 + 2 * kk)), (False, 1 - 2 * theta * kk)):
            o, _ = titans_memory(k, k, v, theta, zero, zero, chunk_size=1, initial_state=(W,),
                                 normalize_step=normalize_step, backend=backend)
            assert_rel_rms(f"{backend} error", o - v, r * kept[..., None], BOUND_F64)


@pytest.mark.parametrize("normalize_step,momentum_scaled,converges", [(True, True, True), (False, True, False),
                                                                      (True, False, False)])
def test_repeated_key_converges_with_normalized_averaged_steps(normalize_step, momentum_scaled, converges):
    # The step of the layers: theta = (1 - eta) / C with normalize_step, on one key/value pair repeated for 1024
    # tokens (chunk 16, momentum 0.9, a depth-2 memory with hidden activations ~3x unit scale): the error falls
    # to rounding. Without the normalisation the memory overshoots (its GELUs die); without the (1 - eta) the
    # momentum adds up 10 steps and it never settles. Both stay at the error they started with.
    gen = torch.Generator().manual_seed(0)
    H, K, T, C = 2, 8, 1024, 16
    k = F.normalize(torch.randn(1, 1, H, K, generator=gen, dtype=torch.float64), dim=-1).expand(1, T, H, K)
    v = torch.randn(1, 1, H, K, generator=gen, dtype=torch.float64).expand(1, T, H, K)
    W = (3 * torch.randn(1, H, K, 4 * K, generator=gen, dtype=torch.float64) / K**0.5,
         torch.randn(1, H, 4 * K, K, generator=gen, dtype=torch.float64) / (4 * K)**0.5)
    eta = torch.full((1, T, H), 0.9, dtype=torch.float64)
    theta = (1 - eta if momentum_scaled else torch.ones_like(eta)) / C
    o, _ = titans_memory(k, k, v, theta, eta, torch.zeros_like(eta), chunk_size=C, initial_state=W,
                         normalize_step=normalize_step)
    error = (o[0, -1] - v[0, -1]).norm(dim=-1).max().item()  # [H] -> worst head
    assert (error < 1e-6) == converges, f"error after {T} tokens: {error:.3g}"


@pytest.mark.parametrize("split", [0, 3, 4, 7, 13])
def test_state_carries_across_calls(split):
    # two calls split anywhere, on a chunk boundary or inside one, equal one call
    (q, k, v, theta, eta, alpha, ln_w, ln_b, *weights, _), _ = make_inputs(2, 13, 2, 4, 2, torch.float64)
    kw = dict(ln_weight=ln_w, ln_bias=ln_b, chunk_size=4, output_final_state=True, use_ln=True, use_residual=True)
    gates = (q, k, v, theta, eta, alpha)
    o, final = titans_memory(*gates, initial_state=weights, **kw)
    o1, state = titans_memory(*(x[:, :split] for x in gates), initial_state=weights, **kw)
    assert state.position.tolist() == [split % 4] * 2
    o2, final2 = titans_memory(*(x[:, split:] for x in gates), initial_state=state, **kw)
    assert_rel_rms("o", torch.cat([o1, o2], 1), o, BOUND_F64)
    for i, (x, y) in enumerate(zip(final2[:-1], final[:-1])):
        assert_rel_rms(f"state[{i}]", x, y, BOUND_F64)
    assert torch.equal(final2.position, final.position)


def test_prefill_then_decode_equals_one_call():
    # varlen prefill (one sequence empty), then token-by-token decode of all sequences as a batch
    (q, k, v, theta, eta, alpha, ln_w, ln_b, *weights, _), _ = make_inputs(3, 11, 2, 4, 2, torch.float64)
    kw = dict(ln_weight=ln_w, ln_bias=ln_b, chunk_size=4, output_final_state=True, use_ln=True)
    gates = (q, k, v, theta, eta, alpha)
    o, final = titans_memory(*gates, initial_state=weights, **kw)
    lengths = [5, 0, 7]
    cu = torch.tensor([0, 5, 5, 12])
    packed = [torch.cat([x[n, :L] for n, L in enumerate(lengths)])[None] for x in gates]
    o_pre, state = titans_memory(*packed, initial_state=weights, cu_seqlens=cu, **kw)
    outs = [list(o_pre[0, cu[n]:cu[n + 1]].unbind(0)) for n in range(3)]
    for t in range(11 - min(lengths)):
        rows = [min(lengths[n] + t, 10) for n in range(3)]  # sequences already at the end repeat their last token
        step = [torch.stack([x[n, r] for n, r in enumerate(rows)])[:, None] for x in gates]
        o_t, new = titans_memory(*step, initial_state=state, **kw)
        live = torch.tensor([lengths[n] + t < 11 for n in range(3)])
        state = TitansState(*(torch.where(live.view(-1, *[1] * (x.dim() - 1)), y, x) for x, y in zip(state, new)))
        for n in range(3):
            if live[n]:
                outs[n].append(o_t[n, 0])
    assert_rel_rms("o", torch.stack([torch.stack(x) for x in outs]), o, BOUND_F64)
    for i, (x, y) in enumerate(zip(state[:-1], final[:-1])):
        assert_rel_rms(f"state[{i}]", x, y, BOUND_F64)
    assert torch.equal(state.position, final.position)


def test_last_output_reads_the_final_weights():
    # y_T = M_T(q_T): the final state's weights are those after the last token's own update
    (q, k, v, theta, eta, alpha, *_, W1, W2, _), _ = make_inputs(2, 11, 2, 4, 2, torch.float64)
    o, final = titans_memory(q, k, v, theta, eta, alpha, chunk_size=4, initial_state=(W1, W2), output_final_state=True)
    assert final.position.tolist() == [3, 3]
    M1, M2 = final.weights
    y = torch.einsum("bhf,bhfv->bhv", F.gelu(torch.einsum("bhk,bhkf->bhf", q[:, -1], M1)), M2)
    assert_rel_rms("o", o[:, -1], y, BOUND_F64)


def test_no_step_no_momentum_no_forgetting_keeps_the_weights():
    (q, k, v, theta, eta, alpha, *_, W1, W2, _), _ = make_inputs(2, 9, 2, 4, 2, torch.float64)
    zero = torch.zeros_like(eta)
    _, final = titans_memory(q, k, v, zero, eta, zero, chunk_size=4, initial_state=(W1, W2), output_final_state=True)
    for x, y in zip(final.weights, (W1, W2)):
        assert torch.equal(x, y)
    assert not any(x.any() for x in final.momentum)


def test_full_forgetting_keeps_only_the_last_momentum():
    # alpha = 1 drops the weights at every token: M_t = S_t
    (q, k, v, theta, eta, alpha, *_, W1, W2, _), _ = make_inputs(1, 7, 2, 4, 2, torch.float64)
    _, final = titans_memory(q, k, v, theta, eta, torch.ones_like(alpha), chunk_size=4, initial_state=(W1, W2),
                             output_final_state=True)
    for M, S in zip(final.weights, final.momentum):
        assert_rel_rms("M", M, S, BOUND_F64)


def test_long_sequence_is_finite():
    # T = 65,536 with large steps, momentum ~ 1 and little forgetting: the LN wrapper bounds the gradients,
    # the gates multiply only within a chunk; output and state must be finite
    (q, k, v, theta, eta, alpha, ln_w, ln_b, *weights, _), _ = make_inputs(1, 65536, 1, 16, 2, torch.float32)
    with torch.no_grad():
        o, final = titans_memory(q, k, v, theta, torch.sigmoid(torch.randn_like(eta) + 6), 1e-3 * alpha,
                                 ln_weight=ln_w, ln_bias=ln_b, initial_state=weights, output_final_state=True,
                                 use_ln=True, use_residual=True)
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in final[:-1])


@pytest.mark.slow
def test_long_sequence_gradients_finite():
    # T = 65,536, fwd and every gradient, at gates whose dynamics are contractive (theta < 0.05, alpha < 0.0025,
    # residual without LN). With the LN wrapper the backward grows with the context as the dynamics dictate
    # (measured x1e9 over 16K tokens alike in float64 and fp32: the memory's sensitivity to early tokens, not
    # rounding; see the README), so it is not the case to test for overflow.
    inputs, cu = make_inputs(1, 65536, 1, 16, 2, torch.float32)
    with torch.no_grad():
        inputs[3].mul_(0.1)  # theta
        inputs[5].mul_(0.01)  # alpha
    for name, x in run("torch", inputs, cu, 64, use_residual=True).items():
        assert torch.isfinite(x.float()).all(), name


def test_low_precision_inputs_give_v_dtype_and_fp32_state():
    inputs, cu = make_inputs(1, 40, 2, 8, 2, torch.bfloat16)
    got, ref = run("torch", inputs, cu, 16), reference(inputs, cu, 16)
    assert got["o"].dtype == torch.bfloat16 and got["weights0"].dtype == torch.float32
    for name in ("o", "dq", "dk", "dv", "dtheta"):  # at most 2x the error of rounding the exact result to bf16
        assert_rel_rms(name, got[name], ref[name], 2 * rel_rms(ref[name].to(torch.bfloat16), ref[name]))


def test_default_backend_and_bad_backend(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    (q, k, v, theta, eta, alpha, *_, W1, W2, _), _ = make_inputs(1, 9, 1, 4, 2, torch.float64)
    args, kw = (q, k, v, theta, eta, alpha), dict(chunk_size=4, initial_state=(W1, W2))
    assert_rel_rms("o", titans_memory(*args, **kw)[0], titans_memory_reference(*args, **kw)[0], BOUND_F64)
    monkeypatch.setenv("IPL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"IPL_BACKEND = 'nonsense' is not one of \('reference', 'torch'\)"):
        titans_memory(*args, **kw)


def _args(B=2, T=5, H=2, K=4, V=4):
    return [torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V), *torch.rand(3, B, T, H)]


def _weights(N=2, H=2, K=4, Fd=8):
    return [torch.zeros(N, H, K, Fd), torch.zeros(N, H, Fd, K)]


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (lambda: [*_args()[:3], torch.rand(2, 5, 3), *_args()[4:]], {},
         r"theta: expected shape \[B, T, H\] = \[2, 5, 2\]"),
        (lambda: [*_args()[:5], torch.rand(2, 5)], {}, r"alpha: expected 3-D \[B, T, H\], got 2-D"),
        (lambda: _args(V=6), dict(use_residual=True),
         r"v: use_residual adds the query .* V must equal K = 4, got V = 6"),
        (lambda: _args(V=6), dict(ln_weight=torch.ones(2, 4)), r"ln_weight: expected shape \[H, V\] = \[2, 6\]"),
        (_args, dict(chunk_size=0), r"chunk_size: expected a positive int, got 0"),
        (_args, dict(depth=0), r"depth: expected a positive int, got 0"),
        (_args, dict(initial_state=torch.zeros(2, 2, 4, 4)), r"initial_state: expected a TitansState or a tuple"),
        (_args, dict(initial_state=[torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 4)]),
         r"initial_state\[1\]: expected shape \[N, H, d_in, d_out\] = \[2, 2, 8, 4\], got \[2, 2, 4, 4\]"),
        (_args, dict(initial_state=[torch.zeros(2, 2, 4, 4, dtype=torch.int64)]),
         r"initial_state: expected a TitansState"),
        (_args, dict(initial_state=TitansState(*_weights() * 3, torch.tensor([0, 64]))),
         r"initial_state position: expected values in \[0, chunk_size = 64\), got \[0, 64\]"),
        (_args, dict(initial_state=TitansState(*_weights() * 3, torch.zeros(3, dtype=torch.long))),
         r"initial_state position: expected shape \[N\] = \[2\], got \[3\]"),
        (_args, dict(cu_seqlens=torch.tensor([0, 5])), r"cu_seqlens: requires batch size B == 1"),
    ],
)
def test_bad_inputs(args, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        titans_memory(*args(), backend="torch", **kw)
