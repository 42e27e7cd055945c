"""`TTTLinearChunkFunction` (the torch path of `ttt_linear` on padded mini-batch chunks, hand-written backward)
against a float64 position-by-position implementation of the same recurrence differentiated by autograd:
outputs, returned states (W, b, sum_W, sum_b at chunk `last`) and the gradients of every input. Also the
closed-form inner gradient `ln_l2_grad` and its VJP against autograd."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_rel_rms
from ipl_layers.ops.ttt_linear_chunk import TTTLinearChunkFunction, chunk_forward, layer_norm, ln_l2_grad
from ipl_layers.ops.ttt_linear_chunk_bwd import ln_l2_grad_vjp

# Bounds on the relative RMS error against the float64 reference. float64 agrees to rounding (measured
# <= 1.2e-15 over all flag combinations). fp32 measured <= 5e-7 on outputs, states and every gradient at
# K = 16, C = 8, unit keys, eta in (0, 1), over all flag combinations and 3 seeds, except dscale (16
# entries, each a sum over every token: up to 2e-6). bf16 inputs (computed in fp32, results rounded to
# bf16) measured <= 4e-3 against the float64 reference on the same rounded inputs. 5-12x headroom.
BOUND_F64 = 1e-10
BOUND_F32 = 1e-5
BOUND_BF16 = 5e-2
INPUTS = ("q", "k", "v", "eta", "ln_weight", "ln_bias", "scale", "W0", "b0", "sum_W0", "sum_b0")
OUTPUTS = ("o", "W", "b", "sum_W", "sum_b")
FLAGS = [dict(use_ln=a, use_residual=b, bias=c) for a, b, c in itertools.product([True, False], repeat=3)]


def flag_id(flags):
    return "-".join(k.replace("use_", "") for k, on in flags.items() if on) or "plain"


def make_inputs(N, NC, H, K, C, dtype, bias=True, fronts=None, ends=None, seed=0, state=True):
    """Padded inputs [N, NC * C, H, *] as `ttt_linear` makes them: sequence n holds real tokens in rows
    [fronts[n], ends[n]) and zero q/k/v/eta elsewhere. Unit-norm keys, eta in (0, 1), LN parameters near
    (1, 0), random start weights and open sums (zeros with state=False)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    Tp = NC * C
    q, k, v = rnd(N, Tp, H, K), F.normalize(rnd(N, Tp, H, K), dim=-1), rnd(N, Tp, H, K)
    eta = torch.sigmoid(rnd(N, Tp, H))
    fronts = fronts or [0] * N
    ends = ends or [Tp] * N
    pos = torch.arange(Tp)
    real = ((pos[None] >= torch.tensor(fronts)[:, None]) & (pos[None] < torch.tensor(ends)[:, None])).double()
    q, k, v = (x * real[..., None, None] for x in (q, k, v))
    tensors = dict(
        q=q, k=k, v=v, eta=eta * real[..., None], ln_weight=1 + 0.1 * rnd(H, K), ln_bias=0.1 * rnd(H, K),
        scale=torch.rand(H, C, generator=gen, dtype=torch.float64),
        W0=rnd(N, H, K, K) / K**0.5, b0=rnd(N, H, K) if bias else None,
        sum_W0=0.3 * rnd(N, H, K, K) / K**0.5, sum_b0=0.3 * rnd(N, H, K) if bias else None,
    )
    if not state:
        tensors.update({n: None if tensors[n] is None else torch.zeros_like(tensors[n])
                        for n in ("W0", "b0", "sum_W0", "sum_b0")})
    return {name: None if x is None else x.to(dtype).requires_grad_() for name, x in tensors.items()}


def inner_grad(z, target, gamma, beta, use_ln):
    """dl/dz of l = 1/2 ||LN(z) - target||^2 (or of 1/2 ||z - target||^2) by autograd, differentiable."""
    if not use_ln:
        return z - target
    loss = 0.5 * ((layer_norm(z, gamma, beta) - target) ** 2).sum()
    return torch.autograd.grad(loss, z, create_graph=True)[0]


def reference(inputs, last, C, use_ln, use_residual):
    """Position by position in float64: inside chunk c, W_i = W_c - s_i (S_c + sum_{j<=i} eta_j k_j^T G_j)
    with every G_j taken at the chunk's start weights (S_c: the open sums, chunk 0 only)."""
    x = {n: None if t is None else t.double() for n, t in inputs.items()}
    q, k, v, eta, gamma, beta, s = (x[n] for n in ("q", "k", "v", "eta", "ln_weight", "ln_bias", "scale"))
    N, Tp, H, K = q.shape
    bias = x["b0"] is not None
    zeros = torch.zeros(N, H, K, dtype=torch.float64)
    W, b = x["W0"], x["b0"] if bias else zeros  # [N, H, K, K], [N, H, K]
    sum_W, sum_b = x["sum_W0"], x["sum_b0"] if bias else zeros
    rows, states = [], []
    for c in range(Tp // C):
        W_start, b_start = W, b
        for i in range(C):
            t = c * C + i
            qt, kt, vt, et = q[:, t], k[:, t], v[:, t], eta[:, t, :, None]  # [N, H, K], eta [N, H, 1]
            z = torch.einsum("nhk,nhkv->nhv", kt, W_start) + b_start
            G = inner_grad(z, vt - kt if use_residual else vt, gamma, beta, use_ln)
            sum_W = sum_W + (et * kt)[..., None] * G[..., None, :]
            sum_b = sum_b + et * G if bias else sum_b
            W, b = W_start - s[:, i, None, None] * sum_W, b_start - s[:, i, None] * sum_b
            X = torch.einsum("nhk,nhkv->nhv", qt, W) + b
            out = layer_norm(X, gamma, beta) if use_ln else X
            rows.append(out + qt if use_residual else out)
        states.append((W_start, b_start, sum_W, sum_b))  # chunk c's start weights and its gradient sums
        sum_W, sum_b = torch.zeros_like(sum_W), torch.zeros_like(sum_b)  # W, b: the next chunk's start
    states.append((W, b, sum_W, sum_b))  # after the last chunk: no open sums
    n = torch.arange(N)
    W, b, sum_W, sum_b = (torch.stack(z)[last, n] for z in zip(*states))
    return torch.stack(rows, 1), W, b if bias else None, sum_W, sum_b if bias else None


def outputs_and_grads(fn, inputs):
    """A dict of the outputs and the gradients of every input for fixed random cotangents."""
    outputs = fn(inputs)
    gen = torch.Generator().manual_seed(1)
    loss = sum((y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
               for y in outputs if y is not None)
    names = [n for n in INPUTS if inputs[n] is not None]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True, materialize_grads=True)
    result = {n: y for n, y in zip(OUTPUTS, outputs) if y is not None}
    return {**result, **{f"d{n}": g for n, g in zip(names, grads)}}


def check(inputs, last, C, use_ln=True, use_residual=True, bound=BOUND_F64):
    last = torch.tensor(last)

    def ours(x):
        return TTTLinearChunkFunction.apply(*(x[n] for n in INPUTS), last, C, use_ln, use_residual)

    got = outputs_and_grads(ours, inputs)
    ref_inputs = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}
    ref = outputs_and_grads(lambda x: reference(x, last, C, use_ln, use_residual), ref_inputs)
    assert got.keys() == ref.keys()
    for name in ref:
        assert_rel_rms(name, got[name], ref[name], bound)
    assert got["o"].dtype == inputs["v"].dtype
    for n in INPUTS:
        if inputs[n] is not None:
            assert got[f"d{n}"].dtype == inputs[n].dtype, n
    return got


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
def test_flag_combinations_float64(flags):
    inputs = make_inputs(4, 4, 2, 8, 4, torch.float64, flags["bias"], fronts=[0, 3, 1, 0], ends=[13, 16, 8, 4])
    check(inputs, [3, 4, 2, 1], 4, flags["use_ln"], flags["use_residual"])


@pytest.mark.parametrize("last", [[0, 0, 0], [1, 2, 3], [3, 0, 2]])
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=flag_id)
def test_returned_chunk_float64(last, flags):
    # last = 0 returns the open sums plus chunk 0's; last = NC the weights after the final chunk, zero sums
    inputs = make_inputs(3, 3, 2, 8, 3, torch.float64, flags["bias"], fronts=[2, 0, 1])
    check(inputs, last, 3, flags["use_ln"], flags["use_residual"])


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=flag_id)
def test_empty_sequence_and_zero_state_float64(flags):
    # an empty sequence continuing an open mini-batch (rows [2, 2)) returns its start weights and sums; zero
    # start state: the first gradients at z = b (z = 0 without bias), LN's 1 / sqrt(var + eps) at 1000
    for state in (True, False):
        inputs = make_inputs(3, 2, 2, 8, 4, torch.float64, flags["bias"], fronts=[0, 2, 1], ends=[7, 2, 8],
                             state=state)
        check(inputs, [1, 0, 2], 4, flags["use_ln"], flags["use_residual"])


@pytest.mark.parametrize("C,NC", [(1, 1), (1, 5), (5, 1), (16, 2)])
def test_chunk_sizes_float64(C, NC):
    inputs = make_inputs(2, NC, 2, 8, C, torch.float64, fronts=[0, C // 2], ends=[NC * C, NC * C - C // 3])
    check(inputs, [NC, NC - 1], C)


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=flag_id)
def test_float32(flags):
    inputs = make_inputs(2, 6, 2, 16, 8, torch.float32, flags["bias"], fronts=[0, 5], ends=[45, 48])
    check(inputs, [5, 6], 8, flags["use_ln"], flags["use_residual"], bound=BOUND_F32)


@given(
    data=st.data(),
    N=st.integers(1, 3),
    NC=st.integers(1, 4),
    C=st.sampled_from([1, 2, 5, 8]),
    K=st.sampled_from([4, 8]),
    flags=st.sampled_from(FLAGS),
    state=st.booleans(),
)
def test_hypothesis_float64(data, N, NC, C, K, flags, state):
    Tp = NC * C
    fronts = data.draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N))
    ends = [data.draw(st.integers(f, Tp)) for f in fronts]
    last = data.draw(st.lists(st.integers(0, NC), min_size=N, max_size=N))
    inputs = make_inputs(N, NC, 2, K, C, torch.float64, flags["bias"], fronts, ends, state=state)
    check(inputs, last, C, flags["use_ln"], flags["use_residual"])


@pytest.mark.parametrize("segment_chunks", [1, 2, 3])
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=flag_id)
def test_inference_runs_float64(segment_chunks, flags):
    # the inference forward (runs of segment_chunks chunks, nothing saved) against the reference; `last`
    # on run boundaries, inside runs, 0 (the open sums) and NC
    inputs = make_inputs(4, 5, 2, 8, 3, torch.float64, flags["bias"], fronts=[2, 0, 1, 0], ends=[15, 7, 15, 3])
    last = torch.tensor([5, 2, 3, 0])
    with torch.no_grad():
        *got, saved = chunk_forward(*(inputs[n] for n in INPUTS), last, 3, flags["use_ln"], flags["use_residual"],
                                    segment_chunks=segment_chunks)
    ref = reference(inputs, last, 3, flags["use_ln"], flags["use_residual"])
    assert saved is None
    for name, x, y in zip(OUTPUTS, got, ref):
        assert (x is None) == (y is None), name
        if y is not None:
            assert_rel_rms(name, x, y, BOUND_F64)


def test_bfloat16_inputs():
    inputs = make_inputs(2, 3, 2, 16, 8, torch.bfloat16, fronts=[0, 2], ends=[24, 21])
    check(inputs, [3, 2], 8, bound=BOUND_BF16)


def test_ln_l2_grad_and_vjp_against_autograd():
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    z, t = rnd(3, 5, 8).requires_grad_(), rnd(3, 5, 8).requires_grad_()
    gamma, beta, u = rnd(3, 1, 8), rnd(3, 1, 8), rnd(3, 5, 8)
    ref = inner_grad(z, t, gamma, beta, True)
    dz_ref, dt_ref = torch.autograd.grad(ref, (z, t), u)
    f = ln_l2_grad(z.detach(), gamma * (beta - t.detach()), gamma * gamma)
    G = f.g * f.r
    assert_rel_rms("G", G, ref, BOUND_F64)
    dz, gxbar = torch.empty_like(u), torch.empty_like(u)
    ln_l2_grad_vjp(u, f, G, gamma * gamma, dz, gxbar)
    assert_rel_rms("dz", dz, dz_ref, BOUND_F64)
    assert_rel_rms("dt", -gamma * gxbar, dt_ref, BOUND_F64)  # gxbar: the cotangent of gx = gamma (LN(z) - t)
