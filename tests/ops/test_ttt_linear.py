"""`ttt_linear` (TTT-Linear) on the torch dual-form path against the float64 token-by-token reference (whose
inner gradient comes from `torch.func.grad`, not the closed form): outputs, final (W, b) and the gradients
of q, k, v, eta, ln_weight, ln_bias, token_scale and the initial (W, b)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, rel_rms
from ipl_layers.ops import delta_rule, ttt_linear, ttt_linear_reference

# Bounds on the relative RMS error against the float64 reference. float64 agrees to rounding (measured
# <= 1.5e-15 over all flag combinations). fp32 measured <= 1e-6 on outputs, final weights and every
# gradient at T <= 200, K = 16, b = 16 with unit keys and eta in (0, 1), but up to 1e-5 with K = 4, LN and
# no residual (LN over 4 features is ill-conditioned: merely rounding the inputs to fp32 moves the exact
# result by 4e-6 there); the bound leaves 10x headroom over the worst.
BOUND_F64 = 1e-10
BOUND_F32 = 1e-4
NAMES = ("q", "k", "v", "eta", "ln_weight", "ln_bias", "token_scale", "W0", "b0")
FLAGS = [dict(use_ln=a, use_residual=b, use_bias=c) for a, b, c in itertools.product([True, False], repeat=3)]


def make_inputs(B, T, H, K, b, dtype, h0=True, scale="none", lengths=None, seed=0):
    """Unit-norm keys and eta in (0, 1), LN parameters near (1, 0); `scale`: "none", "shared" [b] or "head" [H, b]."""
    gen = torch.Generator().manual_seed(seed)
    Bq = 1 if lengths is not None else B
    N = B if lengths is None else len(lengths)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(Bq, T, H, K), F.normalize(rnd(Bq, T, H, K), dim=-1), rnd(Bq, T, H, K)
    eta = torch.sigmoid(rnd(Bq, T, H))
    ln_w, ln_b = 1 + 0.1 * rnd(H, K), 0.1 * rnd(H, K)
    s = {"none": None, "shared": torch.rand(b, generator=gen, dtype=torch.float64),
         "head": torch.rand(H, b, generator=gen, dtype=torch.float64)}[scale]
    W0, b0 = (rnd(N, H, K, K) / K**0.5, rnd(N, H, K)) if h0 else (None, None)
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return [cast(x) for x in (q, k, v, eta, ln_w, ln_b, s, W0, b0)], cu


def run(backend, inputs, cu, b, **flags):
    """Output, final (W, b) and gradients of all inputs for fixed random cotangents."""
    q, k, v, eta, ln_w, ln_b, s, W0, b0 = inputs
    o, (W, bias) = ttt_linear(
        q, k, v, eta, ln_weight=ln_w, ln_bias=ln_b, token_scale=s, mini_batch_size=b,
        initial_state=None if W0 is None else (W0, b0), output_final_state=True, cu_seqlens=cu, backend=backend,
        **flags,
    )
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in (o, W, bias)]
    loss = sum((x * c).sum() for x, c in zip((o, W, bias), cot))
    present = [x for x in inputs if x is not None]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, present, allow_unused=True, materialize_grads=True)
    else:  # no tokens and no initial state: nothing depends on the inputs
        grads = [torch.zeros_like(x) for x in present]
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    return {"o": o, "W": W, "b": bias, **{f"d{n}": d for n, d in zip(names, grads)}}


def reference(inputs, cu, b, **flags):
    return run("reference", [None if x is None else x.detach().double().requires_grad_() for x in inputs], cu, b,
               **flags)


def compare(got, ref, bound):
    assert got.keys() == ref.keys()
    for name in ref:
        assert_rel_rms(name, got[name], ref[name], bound)


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(k[4:] for k, on in f.items() if on) or "plain")
def test_flag_combinations_float64(flags):
    inputs, cu = make_inputs(2, 13, 2, 8, 4, torch.float64, scale="head")
    compare(run("torch", inputs, cu, 4, **flags), reference(inputs, cu, 4, **flags), BOUND_F64)


@pytest.mark.parametrize("T", [0, 1, 15, 32])
@pytest.mark.parametrize("b", [1, 4, 16])
@pytest.mark.parametrize("h0", [False, True])
def test_lengths_and_mini_batch_sizes_float64(T, b, h0):
    inputs, cu = make_inputs(2, T, 2, 8, b, torch.float64, h0=h0)
    compare(run("torch", inputs, cu, b), reference(inputs, cu, b), BOUND_F64)


@pytest.mark.parametrize("scale", ["none", "shared", "head"])
@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[-1]], ids=["ln-residual-bias", "plain"])
def test_float32(scale, flags):
    inputs, cu = make_inputs(2, 45, 2, 16, 16, torch.float32, scale=scale)
    compare(run("torch", inputs, cu, 16, **flags), reference(inputs, cu, 16, **flags), BOUND_F32)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
def test_varlen_with_empty_sequences(dtype, bound):
    inputs, cu = make_inputs(4, 27, 2, 8, 4, dtype, lengths=[9, 0, 18, 0], scale="shared")
    compare(run("torch", inputs, cu, 4), reference(inputs, cu, 4), bound)


@settings(max_examples=6)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    packed=st.booleans(),
    K=st.sampled_from([4, 8]),
    b=st.sampled_from([1, 3, 8]),
    scale=st.sampled_from(["none", "shared", "head"]),
    flags=st.sampled_from(FLAGS),
    h0=st.booleans(),
)
def test_torch_path_hypothesis(lengths, packed, K, b, scale, flags, h0):
    # With LN, zero start weights put a sequence's first gradients at z = 0, where LN's 1 / sqrt(var + eps)
    # is 1000: fp32 loses 3 digits there in any order of evaluation (the fp32 reference too, measured dq
    # 3e-2 at K = 4), and a lone first token without residual has zero gradients in q, k, eta (LN erases
    # the scale of q W_1 + b_1 = -s eta (q . k + 1) G_1). LN cases draw a start state, as the layer's W0 is.
    h0 = h0 or flags["use_ln"]
    if packed:
        inputs, cu = make_inputs(len(lengths), sum(lengths), 2, K, b, torch.float32, h0, scale, lengths=lengths)
    else:
        inputs, cu = make_inputs(1, lengths[0], 2, K, b, torch.float32, h0, scale)
    compare(run("torch", inputs, cu, b, **flags), reference(inputs, cu, b, **flags), BOUND_F32)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_identity_with_the_delta_rule(backend):
    # No LN, residual or bias, b = 1, s = 1: W_t = W_{t-1} - eta_t k_t^T (k_t W_{t-1} - v_t), o_t = q_t W_t,
    # which is the delta rule with beta = eta and scale 1.
    (q, k, v, eta, *_, W0, b0), _ = make_inputs(2, 23, 2, 8, 1, torch.float64)
    o, (W, b) = ttt_linear(q, k, v, eta, mini_batch_size=1, initial_state=(W0, torch.zeros_like(b0)),
                           output_final_state=True, use_ln=False, use_residual=False, use_bias=False, backend=backend)
    o_ref, S = delta_rule(q, k, v, beta=eta, scale=1.0, initial_state=W0, output_final_state=True, backend="reference")
    assert_rel_rms("o", o, o_ref, BOUND_F64)
    assert_rel_rms("W", W, S, BOUND_F64)
    assert torch.equal(b, torch.zeros_like(b))


@pytest.mark.parametrize("split", [8, 12])
def test_state_carries_across_calls(split):
    # A call ending on a mini-batch boundary hands its (W, b) to the next call: the two halves equal one call.
    # Ending inside a mini-batch (split 12 with b = 8) commits the partial mini-batch, so the halves differ.
    (q, k, v, eta, ln_w, ln_b, _, W0, b0), _ = make_inputs(1, 29, 2, 8, 8, torch.float64)
    kw = dict(ln_weight=ln_w, ln_bias=ln_b, mini_batch_size=8, output_final_state=True)
    o, (W, b) = ttt_linear(q, k, v, eta, initial_state=(W0, b0), **kw)
    parts = [x[:, :split] for x in (q, k, v, eta)], [x[:, split:] for x in (q, k, v, eta)]
    o1, state = ttt_linear(*parts[0], initial_state=(W0, b0), **kw)
    o2, (W2, b2) = ttt_linear(*parts[1], initial_state=state, **kw)
    err = rel_rms(torch.cat([o1, o2], 1), o) + rel_rms(W2, W) + rel_rms(b2, b)
    assert err <= BOUND_F64 if split % 8 == 0 else err > 1e-3


def test_zero_eta_keeps_the_initial_weights():
    (q, k, v, eta, ln_w, ln_b, _, W0, b0), _ = make_inputs(2, 19, 2, 8, 4, torch.float64)
    o, (W, b) = ttt_linear(q, k, v, torch.zeros_like(eta), ln_weight=ln_w, ln_bias=ln_b, mini_batch_size=4,
                           initial_state=(W0, b0), output_final_state=True)
    z = torch.einsum("bthk,bhkv->bthv", q, W0) + b0[:, None]
    mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    assert_rel_rms("o", o, q + (z - mu) / (var + 1e-6).sqrt() * ln_w + ln_b, BOUND_F64)
    assert torch.equal(W, W0) and torch.equal(b, b0)


def test_low_precision_inputs_give_v_dtype_and_fp32_state():
    inputs, cu = make_inputs(1, 40, 2, 16, 16, torch.bfloat16)
    got, ref = run("torch", inputs, cu, 16), reference(inputs, cu, 16)
    assert got["o"].dtype == torch.bfloat16 and got["W"].dtype == got["b"].dtype == torch.float32
    for name in ("o", "dq", "dk", "dv", "deta"):  # at most 2x the error of rounding the exact result to bf16
        assert_rel_rms(name, got[name], ref[name], 2 * rel_rms(ref[name].to(torch.bfloat16), ref[name]))


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    (q, k, v, eta, *_), _ = make_inputs(1, 20, 1, 4, 16, torch.float64)
    assert_rel_rms("o", ttt_linear(q, k, v, eta)[0], ttt_linear_reference(q, k, v, eta)[0], BOUND_F64)
    monkeypatch.setenv("IPL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"IPL_BACKEND = 'nonsense' is not one of \('reference', 'torch'\)"):
        ttt_linear(q, k, v, eta)


def test_cuda_without_triton_path_names_the_backends(monkeypatch):
    from ipl_layers.backend import resolve_backend
    from ipl_layers.ops.ttt_linear import BACKENDS

    def _resolve(backend, device):
        return resolve_backend("ttt_linear", backend, device, BACKENDS)

    monkeypatch.delenv("IPL_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match=r"no Triton kernels yet .* \('reference', 'torch'\)"):
        _resolve(None, torch.device("cuda"))
    assert _resolve("torch", torch.device("cuda")) == "torch"


def _qkve(B=2, T=5, H=2, K=4):
    return [torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.rand(B, T, H)]


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (lambda: [torch.randn(2, 5, 4), *_qkve()[1:]], {}, r"q: expected 4-D \[B, T, H, K\], got 3-D"),
        (lambda: [*_qkve()[:2], torch.randn(2, 5, 2, 6), _qkve()[3]], {}, r"v: expected shape \[B, T, H, V \(V == K\)"),
        (lambda: [*_qkve()[:2], _qkve()[2].double(), _qkve()[3]], {}, r"k, v: expected the dtype of q"),
        (lambda: [*_qkve()[:3], torch.rand(2, 5, 3)], {}, r"eta: expected shape \[B, T, H\] = \[2, 5, 2\]"),
        (_qkve, dict(ln_weight=torch.ones(2, 5)), r"ln_weight: expected shape \[H, K\] = \[2, 4\]"),
        (_qkve, dict(ln_bias=torch.ones(4)), r"ln_bias: expected 2-D \[H, K\], got 1-D"),
        (_qkve, dict(token_scale=torch.ones(3)), r"token_scale: expected shape \[b\] = \[16\], got \[3\]"),
        (_qkve, dict(token_scale=torch.ones(3, 16)), r"token_scale: expected shape \[H, b\] = \[2, 16\]"),
        (_qkve, dict(mini_batch_size=0), r"mini_batch_size: expected a positive int, got 0"),
        (_qkve, dict(initial_state=torch.zeros(2, 2, 4, 4)), r"initial_state: expected a tuple"),
        (_qkve, dict(initial_state=(torch.zeros(1, 2, 4, 4), None)), r"initial_state W: expected shape .* = \[2, 2"),
        (_qkve, dict(initial_state=(torch.zeros(2, 2, 4, 4), torch.zeros(2, 4))), r"initial_state b: expected 3-D"),
        (_qkve, dict(cu_seqlens=torch.tensor([0, 3, 5])), r"cu_seqlens: requires batch size B == 1"),
    ],
)
def test_bad_inputs(args, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ttt_linear(*args(), backend="torch", **kw)
