"""Fused recurrent Triton kernels of `linear_attention` against the float64 token-by-token reference.

Runs the kernels in the Triton interpreter in fp32 (bf16 math is broken there), except one bf16 run that
checks only the dtypes and the plumbing with a bf16-sized bound.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import assert_rel_rms  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ipl_layers.kernels.common.registry import CASES  # noqa: E402
from ipl_layers.kernels.linear_attn import fused_recurrent  # noqa: E402
from ipl_layers.kernels.linear_attn.fused_recurrent import fused_recurrent_bwd, fused_recurrent_fwd  # noqa: E402
from ipl_layers.ops.linear_attention import linear_attention_reference  # noqa: E402

# Relative RMS error bounds against the float64 reference.
# o, final state and all gradients in fp32. dg too, also under strong decay, where the true dg (~exp(g))
# is far below the terms whose differences give it: the kernel leaves out the pairs that cancel exactly.
FP32_BOUND = 2e-5
BF16_BOUND = 3e-2  # bf16 inputs and outputs (the interpreter truncates fp32 -> bf16)

GATES = ("none", "scalar", "key")


def make_inputs(B, T, H, K, V, gate, n_states, dtype=torch.float32, g_range=(-1.0, 0.0)):
    """q, k, v, g (None, [B, T, H] or [B, T, H, K]) and an initial state [n_states, H, K, V] (or None)."""
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g_shape = {"none": None, "scalar": (B, T, H), "key": (B, T, H, K)}[gate]
    lo, hi = g_range
    g = None if g_shape is None else (lo + (hi - lo) * torch.rand(g_shape)).to(dtype)
    h0 = None if n_states is None else torch.randn(n_states, H, K, V, dtype=dtype)
    return q, k, v, g, h0


def reference_grads(q, k, v, g, h0, cu_seqlens, do, dht, scale):
    """Float64 reference outputs and gradients of sum(o * do) + sum(final * dht)."""
    leaves = [None if x is None else x.double().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = linear_attention_reference(
        *leaves[:4], scale=scale, initial_state=leaves[4], output_final_state=True, cu_seqlens=cu_seqlens
    )
    loss = (o * do.double()).sum()
    if dht is not None:
        loss = loss + (final * dht.double()).sum()
    loss.backward()
    return o, final, [None if x is None else x.grad for x in leaves]


def run_and_check(B, T, H, K, V, gate, with_h0, cu_seqlens=None, with_dht=True, g_range=(-1.0, 0.0)):
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, gate, N if with_h0 else None, g_range=g_range)
    scale = K**-0.5
    do = torch.randn(B, T, H, V)
    dht = torch.randn(N, H, K, V) if with_dht else None

    o, final = fused_recurrent_fwd(q, k, v, g, scale, h0, cu_seqlens, True, 64)
    dq, dk, dv, dg, dh0 = fused_recurrent_bwd(q, k, v, g, scale, h0, cu_seqlens, do, dht, 64)
    ref_o, ref_final, (rq, rk, rv, rg, rh0) = reference_grads(q, k, v, g, h0, cu_seqlens, do, dht, scale)

    assert_rel_rms("o", o, ref_o, FP32_BOUND)
    assert_rel_rms("final_state", final, ref_final, FP32_BOUND)
    assert_rel_rms("dq", dq, rq, FP32_BOUND)
    assert_rel_rms("dk", dk, rk, FP32_BOUND)
    assert_rel_rms("dv", dv, rv, FP32_BOUND)
    if gate == "none":
        assert dg is None
    else:
        assert_rel_rms("dg", dg, rg, FP32_BOUND)
    if with_h0:
        assert_rel_rms("dh0", dh0, rh0, FP32_BOUND)
    else:
        assert dh0 is None


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("gate", GATES)
def test_matches_reference_odd_length(gate, with_h0):
    run_and_check(B=2, T=7, H=2, K=16, V=32, gate=gate, with_h0=with_h0)


@pytest.mark.parametrize("gate", GATES)
def test_decode_single_token_with_state(gate):
    run_and_check(B=3, T=1, H=2, K=32, V=16, gate=gate, with_h0=True)


@pytest.mark.parametrize("with_h0, with_dht", [(True, True), (False, False)])
@pytest.mark.parametrize("gate", GATES)
def test_varlen_with_empty_sequences(gate, with_h0, with_dht):
    cu_seqlens = torch.tensor([0, 5, 5, 12, 13, 13], dtype=torch.int32)
    run_and_check(B=1, T=13, H=2, K=16, V=16, gate=gate, with_h0=with_h0, cu_seqlens=cu_seqlens, with_dht=with_dht)


@pytest.mark.parametrize("gate", GATES)
def test_state_split_over_value_blocks(gate):
    """K = 128 gives BV = 32 < V = 64: dq, dk, dg are sums of per-V-block partials."""
    assert fused_recurrent._blocks(128, 64) == (128, 32)
    run_and_check(B=1, T=4, H=1, K=128, V=64, gate=gate, with_h0=True)


@pytest.mark.parametrize("gate", GATES)
def test_dims_not_powers_of_two(gate):
    run_and_check(B=1, T=5, H=2, K=24, V=40, gate=gate, with_h0=True)


@pytest.mark.parametrize("with_dht", [True, False])
@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_strong_decay_stays_finite_and_accurate(gate, with_dht):
    """g in [-25, -15] and a full reset: dg ~ exp(g) must keep its fp32 relative accuracy."""
    B, T, H, K, V = 2, 9, 2, 16, 16
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, gate, B, g_range=(-25.0, -15.0))
    g[0, 3] = -1e4  # a full reset in the middle of a sequence
    scale = K**-0.5
    do = torch.randn(B, T, H, V)
    dht = torch.randn(B, H, K, V) if with_dht else None

    o, final = fused_recurrent_fwd(q, k, v, g, scale, h0, None, True, 64)
    dq, dk, dv, dg, dh0 = fused_recurrent_bwd(q, k, v, g, scale, h0, None, do, dht, 64)
    ref_o, ref_final, (rq, rk, rv, rg, rh0) = reference_grads(q, k, v, g, h0, None, do, dht, scale)

    for name, x, ref in (("o", o, ref_o), ("final_state", final, ref_final), ("dq", dq, rq), ("dk", dk, rk),
                         ("dv", dv, rv), ("dg", dg, rg), ("dh0", dh0, rh0)):
        assert_rel_rms(name, x, ref, FP32_BOUND)


def test_without_final_state_or_dht():
    q, k, v, g, h0 = make_inputs(2, 3, 1, 16, 16, "scalar", None)
    o, final = fused_recurrent_fwd(q, k, v, g, 0.25, None, None, False, 64)
    assert final is None
    ref_o, _ = linear_attention_reference(q.double(), k.double(), v.double(), g.double(), scale=0.25)
    assert_rel_rms("o", o, ref_o, FP32_BOUND)


def test_bf16_inputs_keep_their_dtypes():
    B, T, H, K, V = 1, 4, 1, 16, 16
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, "key", B, dtype=torch.bfloat16)
    do, dht = torch.randn(B, T, H, V, dtype=torch.bfloat16), torch.randn(B, H, K, V)
    o, final = fused_recurrent_fwd(q, k, v, g, K**-0.5, h0, None, True, 64)
    grads = fused_recurrent_bwd(q, k, v, g, K**-0.5, h0, None, do, dht, 64)
    ref_o, ref_final, ref_grads = reference_grads(q, k, v, g, h0, None, do, dht, K**-0.5)

    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_rel_rms("o", o, ref_o, BF16_BOUND)
    assert_rel_rms("final_state", final, ref_final, BF16_BOUND)
    for name, x, ref in zip(("dq", "dk", "dv", "dg", "dh0"), grads, ref_grads):
        assert x.dtype == torch.bfloat16, f"{name}: dtype {x.dtype}"
        assert_rel_rms(name, x, ref, BF16_BOUND)


@st.composite
def problems(draw):
    """Shapes, decay form, states and (for B == 1) varlen offsets with possibly empty sequences."""
    T = draw(st.integers(1, 80))
    K, V = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
    gate, with_h0, with_dht = draw(st.sampled_from(GATES)), draw(st.booleans()), draw(st.booleans())
    cu_seqlens = None
    B = draw(st.integers(1, 2))
    if draw(st.booleans()):
        B = 1
        cuts = sorted(draw(st.lists(st.integers(0, T), min_size=0, max_size=3)))
        cu_seqlens = torch.tensor([0, *cuts, T], dtype=torch.int64)
    return dict(B=B, T=T, H=1, K=K, V=V, gate=gate, with_h0=with_h0, cu_seqlens=cu_seqlens, with_dht=with_dht)


@settings(max_examples=10)
@given(problems())
def test_matches_reference_on_drawn_shapes(problem):
    torch.manual_seed(problem["T"])
    run_and_check(**problem)


def test_compile_cases_registered():
    """bf16 and fp32 default-config cases for every decay form, forward and backward."""
    names = {case.name for case in CASES}
    for kernel in ("linear_attn_fused_recurrent_fwd_kernel", "linear_attn_fused_recurrent_bwd_kernel"):
        for dtype in ("bf16", "fp32"):
            for gate in GATES:
                assert f"{kernel}[{dtype},g={gate}]" in names
    for case in CASES:
        if case.name.startswith("linear_attn_fused_recurrent"):
            assert list(case.signature) == case.fn.arg_names, case.name

