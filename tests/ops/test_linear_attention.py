"""`linear_attention` on every path against the float64 token-by-token reference: outputs, final states
and the gradients of q, k, v, g and initial_state."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_rel_rms, compare, rel_rms
from ipl_layers.ops import linear_attention, linear_attention_reference

# Bounds on the relative RMS error against the float64 reference. float64 paths agree to rounding
# (measured <= 5e-15). fp32 paths (torch, and Triton kernels in the interpreter) measured <= 3e-6 on
# outputs and gradients at T <= 300; the bound leaves 30x headroom for longer sums and other seeds.
BOUND_F64 = 1e-12
BOUND_F32 = 1e-4
G_FORMS = ("none", "scalar", "key")
TRITON_BACKENDS = ("triton_chunk", "triton_recurrent")


def make_inputs(B, T, H, K, V, g_form, h0, dtype, lengths=None, decay=1.0, seed=0, g_range=None):
    gen = torch.Generator().manual_seed(seed)
    Bq = 1 if lengths is not None else B
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(Bq, T, H, K), rnd(Bq, T, H, K), rnd(Bq, T, H, V)
    g = None
    if g_form == "scalar":
        g = F.logsigmoid(rnd(Bq, T, H) + 2) * decay
    elif g_form == "key":
        g = F.logsigmoid(rnd(Bq, T, H, K) + 2) * decay
    if g is not None and g_range is not None:  # uniform log-decay in [lo, hi]
        g = torch.rand(g.shape, generator=gen, dtype=torch.float64) * (g_range[1] - g_range[0]) + g_range[0]
    N = B if lengths is None else len(lengths)
    s0 = rnd(N, H, K, V) if h0 else None
    cu = None
    if lengths is not None:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return [cast(x) for x in (q, k, v, g, s0)], cu


def run(backend, inputs, cu, chunk_size=16):
    """Output, final state and gradients of all inputs for a fixed random cotangent."""
    q, k, v, g, s0 = inputs
    o, final = linear_attention(
        q, k, v, g, initial_state=s0, output_final_state=True, cu_seqlens=cu, chunk_size=chunk_size, backend=backend
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
    names = [n for n, x in zip(("q", "k", "v", "g", "initial_state"), inputs) if x is not None]
    return {"o": o, "final_state": final, **{f"d{n}": d for n, d in zip(names, grads)}}


def reference(inputs, cu):
    return run("reference", [None if x is None else x.detach().double().requires_grad_() for x in inputs], cu)


@pytest.mark.parametrize("g_form", G_FORMS)
@pytest.mark.parametrize("T", [0, 1, 15, 16, 47])
@pytest.mark.parametrize("h0", [False, True])
def test_torch_path_float64(g_form, T, h0):
    inputs, cu = make_inputs(2, T, 2, 8, 12, g_form, h0, torch.float64)
    compare(run("torch", inputs, cu), reference(inputs, cu), BOUND_F64)


@pytest.mark.parametrize("g_form", G_FORMS)
@pytest.mark.parametrize("backend", ("torch",) + TRITON_BACKENDS)
def test_varlen_with_empty_sequences(g_form, backend):
    inputs, cu = make_inputs(4, 41, 2, 16, 16, g_form, True, torch.float32, lengths=[9, 0, 32, 0])
    compare(run(backend, inputs, cu), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("g_form", G_FORMS)
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("T,h0", [(1, True), (37, False), (64, True)])
def test_triton_paths(g_form, backend, T, h0):
    inputs, cu = make_inputs(1, T, 2, 16, 32, g_form, h0, torch.float32)
    compare(run(backend, inputs, cu), reference(inputs, cu), BOUND_F32)


@given(
    T=st.integers(1, 300),
    H=st.integers(1, 3),
    K=st.sampled_from([4, 16, 32]),
    V=st.sampled_from([4, 8, 32]),
    g_form=st.sampled_from(G_FORMS),
    h0=st.booleans(),
    chunk_size=st.sampled_from([16, 64]),
)
def test_torch_path_hypothesis(T, H, K, V, g_form, h0, chunk_size):
    inputs, cu = make_inputs(1, T, H, K, V, g_form, h0, torch.float32)
    compare(run("torch", inputs, cu, chunk_size), reference(inputs, cu), BOUND_F32)


@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    g_form=st.sampled_from(G_FORMS),
    h0=st.booleans(),
)
def test_torch_path_varlen_hypothesis(lengths, g_form, h0):
    inputs, cu = make_inputs(len(lengths), sum(lengths), 2, 8, 8, g_form, h0, torch.float32, lengths=lengths)
    compare(run("torch", inputs, cu), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("g_form", ("scalar", "key"))
@pytest.mark.parametrize("g_range", [(-25.0, -15.0), (-25.0, 0.0)])
def test_strong_decay_stays_exact(g_form, g_range):
    # g around -20 per step: exp(-b) for b the in-chunk cumsum would overflow fp32 after ~4 tokens, and dg
    # (~exp(g) times the terms of the global identity) keeps its relative accuracy (measured <= 2e-5).
    inputs, cu = make_inputs(1, 100, 2, 16, 16, g_form, True, torch.float32, g_range=g_range)
    compare(run("torch", inputs, cu, chunk_size=64), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("g_form", ("scalar", "key"))
@pytest.mark.parametrize("span_max", [0.0, None, float("inf")])
def test_factored_and_explicit_decay_forms(g_form, span_max, monkeypatch):
    # The torch path factors the decays around each chunk's mid log-decay when the in-chunk span is
    # <= SPAN_MAX (80), else keeps them explicit (sub-chunks for per-key g). g in [-1.2, -1.1] over
    # 64-token chunks spans 70-77: the edge of the factored form, where its factors reach exp(+-38).
    from ipl_layers.ops import linear_attention_chunk

    if span_max is not None:
        monkeypatch.setattr(linear_attention_chunk, "SPAN_MAX", span_max)
    inputs, cu = make_inputs(2, 150, 2, 16, 16, g_form, True, torch.float32, g_range=(-1.2, -1.1))
    compare(run("torch", inputs, cu, chunk_size=64), reference(inputs, cu), BOUND_F32)


@pytest.mark.parametrize("g_form", ("scalar", "key"))
def test_bf16_inputs_as_accurate_as_rounding(g_form):
    # Rule: error at most 2x that of rounding the exact output to bf16 (inputs rounded to bf16 first).
    inputs, cu = make_inputs(1, 100, 2, 16, 16, g_form, True, torch.bfloat16)
    got = run("torch", inputs, cu)
    ref = reference(inputs, cu)
    assert got["o"].dtype == torch.bfloat16 and got["final_state"].dtype == torch.float32
    for name in ("o", "dq", "dk", "dv"):
        floor = rel_rms(ref[name].to(torch.bfloat16), ref[name])
        assert_rel_rms(name, got[name], ref[name], 2 * floor)


@pytest.mark.parametrize("g_form", G_FORMS)
def test_cpu_decode_step_uses_the_extension(g_form, monkeypatch):
    import ipl_layers._ext as ext

    calls = []
    step = ext.linear_attention_step
    monkeypatch.setattr(ext, "linear_attention_step", lambda *a: calls.append(1) or step(*a))
    inputs, cu = make_inputs(3, 1, 2, 16, 8, g_form, True, torch.float32)
    with torch.no_grad():
        o, final = linear_attention(*inputs[:4], initial_state=inputs[4], output_final_state=True, backend="torch")
    assert calls == [1], "a no-grad single decoding step on CPU must run the C++ extension"
    ref = reference(inputs, cu)
    assert_rel_rms("o", o, ref["o"], BOUND_F32)
    assert_rel_rms("final_state", final, ref["final_state"], BOUND_F32)


def test_long_sequence_strong_decay_is_finite():
    T = 65536
    q, k, v = (torch.randn(1, T, 1, 8) for _ in range(3))
    for g in (torch.full((1, T, 1), -30.0), torch.full((1, T, 1, 8), -30.0), torch.zeros(1, T, 1)):
        o, final = linear_attention(q, k, v, g, output_final_state=True, backend="torch")
        assert torch.isfinite(o).all() and torch.isfinite(final).all()


@pytest.mark.slow
@pytest.mark.parametrize("g_form", G_FORMS)
def test_long_sequence_gradients_finite(g_form):
    inputs, cu = make_inputs(1, 65536, 4, 64, 64, g_form, True, torch.float32, decay=30.0)
    out = run("torch", inputs, cu, chunk_size=64)
    for name, x in out.items():
        assert torch.isfinite(x).all(), name


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    inputs, cu = make_inputs(1, 20, 1, 4, 4, "scalar", False, torch.float64)
    got = linear_attention(*inputs[:4])[0]
    ref = linear_attention_reference(*inputs[:4])[0]
    assert_rel_rms("o", got, ref, BOUND_F64)
    monkeypatch.setenv("IPL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="IPL_BACKEND"):
        linear_attention(*inputs[:4])


def _qkv(B=2, T=5, H=2, K=4, V=4, **kw):
    return torch.randn(B, T, H, K, **kw), torch.randn(B, T, H, K, **kw), torch.randn(B, T, H, V, **kw)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 5, 4), *_qkv()[1:]), r"q: expected 4-D \[B, T, H, K\], got 3-D"),
        (lambda: (_qkv()[0], torch.randn(2, 5, 3, 4), _qkv()[2]), r"k: expected shape .* = \[2, 5, 2, 4\], got \[2, 5, 3, 4\]"),
        (lambda: (*_qkv()[:2], torch.randn(2, 5, 3, 4)), r"v: expected shape"),
        (lambda: (*_qkv()[:2], _qkv()[2].double()), r"k, v: expected the dtype of q"),
        (lambda: (*_qkv()[:2], _qkv(device="meta")[2]), r"v: expected device cpu"),
        (lambda: (*_qkv(), torch.randn(2, 5, 3)), r"g: expected shape \[B, T, H\] = \[2, 5, 2\]"),
        (lambda: (*_qkv(), torch.randn(2, 5, 2, 3)), r"g: expected shape \[B, T, H, K\] = \[2, 5, 2, 4\]"),
        (lambda: (torch.randint(0, 3, (2, 5, 2, 4)), *_qkv()[1:]), r"q: expected a floating dtype"),
    ],
)
def test_bad_inputs(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        linear_attention(*make(), backend="torch")


def test_bad_state_and_offsets():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[N, H, K, V\] = \[2, 2, 4, 4\], got \[1, 2, 4, 4\]"):
        linear_attention(q, k, v, initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"cu_seqlens: requires batch size B == 1"):
        linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 5]))
    q1, k1, v1 = _qkv(B=1)
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets"):
        linear_attention(q1, k1, v1, cu_seqlens=torch.tensor([0, 4, 2, 5]))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected to end at T = 5, got 4"):
        linear_attention(q1, k1, v1, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match=r"cu_seqlens: expected dtype int32 or int64"):
        linear_attention(q1, k1, v1, cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match=r"backend = 'cuda' is not one of"):
        linear_attention(q, k, v, backend="cuda")
