"""`delta_rule` (DeltaNet, Gated DeltaNet) on the torch chunked path and the Triton paths (interpreter, fp32)
against the float64 token-by-token reference: outputs, final states and the gradients of q, k, v, beta, g and
initial_state."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, compare, rel_rms
from ipl_layers.ops import delta_rule, delta_rule_reference

# Bounds on the relative RMS error against the float64 reference. float64 agrees to rounding (measured
# <= 2e-15). fp32 measured <= 1e-6 on outputs and gradients at T <= 300 with unit keys and beta in (0, 1)
# (the triangular solve stays well conditioned there), and dg <= 2e-5 under log-decays of -15..-25 per
# step (dg is then ~exp(-15) times the terms it sums); the bound leaves 5x headroom over the worst.
BOUND_F64 = 1e-10
BOUND_F32 = 1e-4
NAMES = ("q", "k", "v", "beta", "g", "initial_state")
TRITON_BACKENDS = ("triton_chunk", "triton_recurrent")


def make_inputs(B, T, H, K, V, gated, h0, dtype, lengths=None, seed=0, unit_keys=True, beta_shift=0.0, g_range=None):
    """Keys of unit norm (unless `unit_keys=False`) and beta in (0, 1): the regime where the state stays bounded."""
    gen = torch.Generator().manual_seed(seed)
    Bq = 1 if lengths is not None else B
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(Bq, T, H, K), rnd(Bq, T, H, K), rnd(Bq, T, H, V)
    if unit_keys:
        k = F.normalize(k, dim=-1)
    beta = torch.sigmoid(rnd(Bq, T, H) + beta_shift)
    g = F.logsigmoid(rnd(Bq, T, H) + 2) if gated else None
    if gated and g_range is not None:  # uniform log-decay in [lo, hi]
        g = torch.rand(g.shape, generator=gen, dtype=torch.float64) * (g_range[1] - g_range[0]) + g_range[0]
    N = B if lengths is None else len(lengths)
    s0 = rnd(N, H, K, V) if h0 else None
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return [cast(x) for x in (q, k, v, beta, g, s0)], cu


def run(backend, inputs, cu, chunk_size=16, normalize_outside=False, **kw):
    """Output, final state and gradients of all inputs for a fixed random cotangent."""
    q, k, v, beta, g, s0 = inputs
    if normalize_outside:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    o, final = delta_rule(
        q, k, v, beta, g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=chunk_size,
        backend=backend, **kw,
    )
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    present = [x for x in inputs if x is not None]
    loss = (o * do).sum() + (final * dfinal).sum()
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, present, allow_unused=True, materialize_grads=True)
    else:  # no tokens and no initial state: nothing depends on the inputs
        grads = [torch.zeros_like(x) for x in present]
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    return {"o": o, "final_state": final, **{f"d{n}": d for n, d in zip(names, grads)}}


def reference(inputs, cu, **kw):
    return run("reference", [None if x is None else x.detach().double().requires_grad_() for x in inputs], cu, **kw)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [0, 1, 15, 16, 47])
@pytest.mark.parametrize("h0", [False, True])
def test_torch_path_float64(gated, T, h0):
    inputs, cu = make_inputs(2, T, 2, 8, 12, gated, h0, torch.float64)
    compare(run("torch", inputs, cu), reference(inputs, cu), BOUND_F64)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32)])
def test_varlen_with_empty_sequences(gated, dtype, bound):
    inputs, cu = make_inputs(4, 41, 2, 16, 16, gated, True, dtype, lengths=[9, 0, 32, 0])
    compare(run("torch", inputs, cu), reference(inputs, cu), bound)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("lengths", [None, [30, 0, 70]])
def test_inference_forward_runs_in_segments(gated, lengths, monkeypatch):
    # Without gradients the torch path runs segments of SEGMENT_CHUNKS = 8 chunks one after the other:
    # chunk 4 makes T = 77 (or a longest sequence of 70) three segments, the last partial, each starting
    # from the state the previous one left.
    chunk_module = importlib.import_module("ipl_layers.ops.delta_rule_chunk")
    calls, real = [], chunk_module.chunk_forward
    monkeypatch.setattr(chunk_module, "chunk_forward", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    T = 77 if lengths is None else sum(lengths)
    inputs, cu = make_inputs(2, T, 2, 8, 8, gated, True, torch.float64, lengths=lengths)
    with torch.no_grad():
        o, final = delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True, cu_seqlens=cu,
                              chunk_size=4)
    o_ref, final_ref = delta_rule_reference(*inputs[:5], initial_state=inputs[5], output_final_state=True,
                                            cu_seqlens=cu)
    assert_rel_rms("o", o, o_ref, BOUND_F64)
    assert_rel_rms("final_state", final, final_ref, BOUND_F64)
    assert calls == ([32, 32, 16] if lengths is None else [32, 32, 8])


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("T,h0", [(1, True), (37, False), (64, True)])
def test_triton_paths(gated, backend, T, h0):
    inputs, cu = make_inputs(1, T, 2, 16, 32, gated, h0, torch.float32)
    compare(run(backend, inputs, cu), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_triton_varlen_with_empty_sequences_and_qk_l2norm(backend):
    inputs, cu = make_inputs(4, 41, 2, 16, 16, True, True, torch.float32, lengths=[9, 0, 32, 0], unit_keys=False)
    compare(run(backend, inputs, cu, use_qk_l2norm=True), reference(inputs, cu, use_qk_l2norm=True), BOUND_F32)


def test_triton_backend_chunks_from_chunk_size_on(monkeypatch):
    """backend="triton": the fused recurrent kernels below chunk_size tokens, the chunked ones from there on."""
    # the module, not the package's re-exported function of the same name
    chunk_fwd_module = importlib.import_module("ipl_layers.kernels.delta_rule.chunk_fwd")
    lengths, real = [], chunk_fwd_module.chunk_fwd
    monkeypatch.setattr(chunk_fwd_module, "chunk_fwd", lambda *a: lengths.append(a[0].shape[1]) or real(*a))
    for T in (15, 16):
        inputs, cu = make_inputs(1, T, 1, 8, 8, True, True, torch.float32)
        compare(run("triton", inputs, cu, chunk_size=16), reference(inputs, cu), BOUND_F32)
    assert lengths == [16]


@settings(max_examples=10)
@given(
    T=st.integers(1, 200),
    H=st.integers(1, 2),
    K=st.sampled_from([4, 16]),
    V=st.sampled_from([4, 8]),
    gated=st.booleans(),
    h0=st.booleans(),
    chunk_size=st.sampled_from([16, 64]),
)
def test_torch_path_hypothesis(T, H, K, V, gated, h0, chunk_size):
    inputs, cu = make_inputs(1, T, H, K, V, gated, h0, torch.float32)
    compare(run("torch", inputs, cu, chunk_size), reference(inputs, cu), BOUND_F32)


@settings(max_examples=8)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4), gated=st.booleans(), h0=st.booleans())
def test_torch_path_varlen_hypothesis(lengths, gated, h0):
    inputs, cu = make_inputs(len(lengths), sum(lengths), 2, 8, 8, gated, h0, torch.float32, lengths=lengths)
    compare(run("torch", inputs, cu), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("g_range", [(-25.0, -15.0), (-25.0, 0.0), (-1.2, -1.1)])
def test_strong_decay_stays_exact(g_range):
    # Per-step log-decay down to -25: exp(-b) would overflow fp32 within a few tokens, so every exponent
    # the chunked form takes is <= 0; dg keeps its relative accuracy because the diagonal terms, which
    # cancel exactly, are never added.
    inputs, cu = make_inputs(1, 150, 2, 16, 16, True, True, torch.float32, g_range=g_range)
    compare(run("torch", inputs, cu, chunk_size=64), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_qk_l2norm_equals_normalising_outside(backend):
    inputs, cu = make_inputs(2, 30, 2, 8, 8, True, True, torch.float64, unit_keys=False)
    inside = run(backend, inputs, cu, use_qk_l2norm=True)
    compare(inside, run("reference", inputs, cu, normalize_outside=True), BOUND_F64)


@pytest.mark.parametrize("gated", [False, True])
def test_zero_beta_only_decays_the_state(gated):
    # beta = 0: nothing is learnt, S_t = exp(b_t) S_0 (b the cumsum of g) and o_t = scale q_t S_t.
    (q, k, v, beta, g, s0), _ = make_inputs(2, 37, 2, 8, 8, gated, True, torch.float64)
    o, final = delta_rule(q, k, v, torch.zeros_like(beta), g, initial_state=s0, output_final_state=True, chunk_size=16)
    b = torch.zeros_like(beta) if g is None else g.cumsum(1)  # [B, T, H]
    expected = torch.einsum("bthk,bhkv->bthv", q * b.exp()[..., None], s0) * 8**-0.5
    assert_rel_rms("o", o, expected, BOUND_F64)
    assert_rel_rms("final_state", final, s0 * b[:, -1].exp()[..., None, None], BOUND_F64)


def test_bf16_inputs_as_accurate_as_rounding():
    # Rule: error at most 2x that of rounding the exact output to bf16 (inputs rounded to bf16 first).
    inputs, cu = make_inputs(1, 100, 2, 16, 16, True, True, torch.bfloat16)
    got = run("torch", inputs, cu)
    ref = reference(inputs, cu)
    assert got["o"].dtype == torch.bfloat16 and got["final_state"].dtype == torch.float32
    for name in ("o", "dq", "dk", "dv", "dbeta"):
        floor = rel_rms(ref[name].to(torch.bfloat16), ref[name])
        assert_rel_rms(name, got[name], ref[name], 2 * floor)


@pytest.mark.parametrize("gated", [False, True])
def test_long_sequence_beta_near_one_is_finite(gated):
    # T = 65,536, beta ~ 0.998 and strong decay: every exponent in the chunked form is <= 0 and
    # I - beta k^T k with unit keys is a contraction, so nothing may overflow.
    T = 65536
    (q, k, v, beta, g, s0), _ = make_inputs(1, T, 1, 8, 8, gated, True, torch.float32, unit_keys=False, beta_shift=6)
    g = None if g is None else g.detach() * 30
    with torch.no_grad():
        o, final = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, use_qk_l2norm=True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()


@pytest.mark.parametrize("gated", [False, True])
def test_long_sequence_gradients_finite(gated):
    # ~1 s each on 2 cores: the hand-written backward keeps it out of the slow set.
    inputs, cu = make_inputs(1, 65536, 1, 64, 64, gated, True, torch.float32, beta_shift=6)
    for name, x in run("torch", inputs, cu, chunk_size=64).items():
        assert torch.isfinite(x).all(), name


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    (q, k, v, beta, g, _), _ = make_inputs(1, 20, 1, 4, 4, True, False, torch.float64)
    got = delta_rule(q, k, v, beta, g)[0]
    ref = delta_rule_reference(q, k, v, beta, g)[0]
    assert_rel_rms("o", got, ref, BOUND_F64)
    monkeypatch.setenv("IPL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"IPL_BACKEND = 'nonsense' is not one of \('reference', 'torch', 'triton'"):
        delta_rule(q, k, v, beta, g)


def test_triton_is_the_default_on_cuda_and_needs_it_outside_the_interpreter(monkeypatch):
    from ipl_layers.backend import resolve_backend
    from ipl_layers.ops.delta_rule import BACKENDS

    monkeypatch.delenv("IPL_BACKEND", raising=False)
    assert resolve_backend("delta_rule", None, torch.device("cuda"), BACKENDS) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    (q, k, v, beta, g, _), _ = make_inputs(1, 4, 1, 4, 4, True, False, torch.float32)
    with pytest.raises(RuntimeError, match=r"backend 'triton_chunk' needs CUDA tensors \(got device cpu\)"):
        delta_rule(q, k, v, beta, g, backend="triton_chunk")


def _inputs(B=2, T=5, H=2, K=4, V=4, **kw):
    return [torch.randn(B, T, H, K, **kw), torch.randn(B, T, H, K, **kw), torch.randn(B, T, H, V, **kw),
            torch.rand(B, T, H, **kw)]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: [torch.randn(2, 5, 4), *_inputs()[1:]], r"q: expected 4-D \[B, T, H, K\], got 3-D"),
        (lambda: [_inputs()[0], torch.randn(2, 5, 3, 4), *_inputs()[2:]], r"k: expected shape .* = \[2, 5, 2, 4\]"),
        (lambda: [*_inputs()[:2], torch.randn(2, 5, 3, 4), _inputs()[3]], r"v: expected shape"),
        (lambda: [*_inputs()[:2], _inputs()[2].double(), _inputs()[3]], r"k, v: expected the dtype of q"),
        (lambda: [*_inputs()[:3], torch.rand(2, 5, 3)], r"beta: expected shape \[B, T, H\] = \[2, 5, 2\]"),
        (lambda: [*_inputs()[:3], torch.rand(2, 5, 2, 4)], r"beta: expected 3-D \[B, T, H\], got 4-D"),
        (lambda: [*_inputs()[:3], torch.rand(2, 5, 2, device="meta")], r"beta: expected device cpu"),
        (lambda: [*_inputs(), torch.randn(2, 5, 2, 4)], r"g: expected 3-D \[B, T, H\], got 4-D"),
        (lambda: [*_inputs(), torch.randn(2, 4, 2)], r"g: expected shape \[B, T, H\] = \[2, 5, 2\], got \[2, 4, 2\]"),
        (lambda: [*_inputs(), torch.ones(2, 5, 2, dtype=torch.int64)], r"g: expected a floating dtype"),
    ],
)
def test_bad_inputs(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        delta_rule(*make(), backend="torch")


def test_bad_state_offsets_and_chunk_size():
    q, k, v, beta = _inputs()
    with pytest.raises(ValueError, match=r"initial_state: expected shape .* = \[2, 2, 4, 4\], got \[1, 2, 4, 4\]"):
        delta_rule(q, k, v, beta, initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"cu_seqlens: requires batch size B == 1"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 3, 5]))
    q1, k1, v1, beta1 = _inputs(B=1)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected to end at T = 5, got 4"):
        delta_rule(q1, k1, v1, beta1, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int, got 0"):
        delta_rule(q, k, v, beta, chunk_size=0)
