"""Fused recurrent Triton kernels of `delta_rule` against the float64 token-by-token reference.

Runs the kernels in the Triton interpreter in fp32 (bf16 math is broken there), except one bf16 run that
checks only the dtypes and the plumbing with a bf16-sized bound. Keys are L2-normalised and beta in [0, 1],
as the layers feed them: the regime where the recurrence is a contraction.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from helpers import assert_rel_rms  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ipl_layers.kernels.common.registry import CASES  # noqa: E402
from ipl_layers.kernels.delta_rule import fused_recurrent  # noqa: E402
from ipl_layers.kernels.delta_rule.fused_recurrent import fused_recurrent_bwd, fused_recurrent_fwd  # noqa: E402
from ipl_layers.ops.delta_rule import delta_rule_reference  # noqa: E402

# Relative RMS error bounds against the float64 reference.
# o, final state and every gradient in fp32: measured at most 4.7e-7 over this file (dbeta summed over V
# blocks at K = 128); dg under g in [-8, -4] 1.2e-7, beta = 1 with unit keys 1.5e-7: the backward forms each
# quantity directly, without cancellation.
FP32_BOUND = 2e-6
# bf16 inputs and outputs (the interpreter truncates fp32 -> bf16): measured at most 4.5e-3 (o).
BF16_BOUND = 2e-2

NAMES = ("dq", "dk", "dv", "dbeta", "dg", "dh0")


def make_inputs(B, T, H, K, V, gated, n_states, dtype=torch.float32, g_range=(-1.0, 0.0), beta_range=(0.0, 1.0)):
    """q, k (unit rows), v, beta, g (None or [B, T, H]) and an initial state [n_states, H, K, V] (or None)."""
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    beta = beta_range[0] + (beta_range[1] - beta_range[0]) * torch.rand(B, T, H)
    g = g_range[0] + (g_range[1] - g_range[0]) * torch.rand(B, T, H) if gated else None
    h0 = None if n_states is None else torch.randn(n_states, H, K, V)
    return [None if x is None else x.to(dtype) for x in (q, k, v, beta, g, h0)]


def reference_grads(q, k, v, beta, g, h0, cu_seqlens, do, dht, scale):
    """Float64 reference o, final state and gradients of sum(o * do) + sum(final * dht)."""
    leaves = [None if x is None else x.double().requires_grad_() for x in (q, k, v, beta, g, h0)]
    o, final = delta_rule_reference(
        *leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True, cu_seqlens=cu_seqlens
    )
    loss = (o * do.double()).sum()
    if dht is not None:
        loss = loss + (final * dht.double()).sum()
    loss.backward()
    return o, final, [None if x is None else x.grad for x in leaves]


def check(inputs, cu_seqlens, with_dht, bound=FP32_BOUND):
    """Runs both kernels on `inputs` (q, k, v, beta, g, h0) and checks every output against the reference."""
    q, k, v, beta, g, h0 = inputs
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K**-0.5
    do = torch.randn(B, T, H, v.shape[-1], dtype=v.dtype)
    dht = torch.randn(N, H, K, v.shape[-1]) if with_dht else None

    o, final = fused_recurrent_fwd(q, k, v, beta, g, scale, h0, cu_seqlens, True)
    grads = fused_recurrent_bwd(q, k, v, beta, g, scale, h0, cu_seqlens, do, dht)
    ref_o, ref_final, ref_grads = reference_grads(q, k, v, beta, g, h0, cu_seqlens, do, dht, scale)

    assert o.dtype == v.dtype and final.dtype == torch.float32
    assert_rel_rms("o", o, ref_o, bound)
    assert_rel_rms("final_state", final, ref_final, bound)
    for name, x, ref, inp in zip(NAMES, grads, ref_grads, inputs):
        if inp is None:
            assert x is None, f"{name}: expected None without its input"
        else:
            assert x.dtype == inp.dtype, f"{name}: dtype {x.dtype} != input dtype {inp.dtype}"
            assert_rel_rms(name, x, ref, bound)


def run_and_check(B, T, H, K, V, gated, with_h0, cu_seqlens=None, with_dht=True, **ranges):
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check(make_inputs(B, T, H, K, V, gated, N if with_h0 else None, **ranges), cu_seqlens, with_dht)


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_matches_reference_odd_length_over_segments(gated, with_h0):
    """T = 37 crosses the backward's first segment boundary (SEGMENT = 32), one token into the second."""
    run_and_check(B=2, T=37, H=2, K=16, V=32, gated=gated, with_h0=with_h0)


@pytest.mark.parametrize("gated", [False, True])
def test_decode_single_token_with_state(gated):
    run_and_check(B=3, T=1, H=2, K=32, V=16, gated=gated, with_h0=True)


@pytest.mark.parametrize("with_h0, with_dht", [(True, True), (False, False)])
@pytest.mark.parametrize("gated", [False, True])
def test_varlen_with_empty_sequences(gated, with_h0, with_dht):
    cu_seqlens = torch.tensor([0, 5, 5, 40, 41, 41], dtype=torch.int32)
    run_and_check(B=1, T=41, H=2, K=16, V=16, gated=gated, with_h0=with_h0, cu_seqlens=cu_seqlens, with_dht=with_dht)


@pytest.mark.parametrize("gated", [False, True])
def test_many_short_segments(gated, monkeypatch):
    """SEGMENT = 4: many checkpoints, sequences starting mid-segment (the slot layout), a length of exactly 4."""
    monkeypatch.setattr(fused_recurrent, "SEGMENT", 4)
    cu_seqlens = torch.tensor([0, 3, 3, 4, 8, 23, 30], dtype=torch.int64)
    run_and_check(B=1, T=30, H=2, K=8, V=16, gated=gated, with_h0=True, cu_seqlens=cu_seqlens)
    run_and_check(B=2, T=9, H=1, K=8, V=8, gated=gated, with_h0=False)


@pytest.mark.parametrize("gated", [False, True])
def test_state_split_over_value_blocks(gated):
    """K = 128 gives the backward BV = 16 < V = 32: dq, dk, dbeta, dg are sums of per-V-block partials."""
    assert fused_recurrent._blocks(128, 32, fused_recurrent.BWD_STATE_ELEMENTS) == (128, 16)
    run_and_check(B=1, T=4, H=1, K=128, V=32, gated=gated, with_h0=True)


@pytest.mark.parametrize("gated", [False, True])
def test_dims_not_powers_of_two(gated):
    run_and_check(B=1, T=5, H=2, K=24, V=40, gated=gated, with_h0=True)


@pytest.mark.parametrize("with_dht", [True, False])
def test_strong_decay(with_dht):
    """g in [-8, -4] and a full reset: dg ~ e^g must keep its fp32 relative accuracy."""
    inputs = make_inputs(2, 9, 2, 16, 16, True, 2, g_range=(-8.0, -4.0))
    inputs[4][0, 3] = -1e4  # a full reset in the middle of a sequence: exp underflows to 0
    check(inputs, None, with_dht)


@pytest.mark.parametrize("gated", [False, True])
def test_beta_one_with_unit_keys(gated):
    """beta |k|^2 = 1 makes I - beta k^T k singular (the backward must not invert it); beta = 0 skips a token."""
    inputs = make_inputs(2, 11, 2, 16, 16, gated, 2, beta_range=(0.95, 1.0))
    inputs[3][:, ::3] = 1.0
    inputs[3][0, 4] = 0.0
    check(inputs, None, True)


def test_without_final_state_or_dht():
    q, k, v, beta, g, _ = make_inputs(2, 3, 1, 16, 16, True, None)
    o, final = fused_recurrent_fwd(q, k, v, beta, g, 0.25, None, None, False)
    assert final is None
    ref_o, _ = delta_rule_reference(*(x.double() for x in (q, k, v, beta, g)), scale=0.25)
    assert_rel_rms("o", o, ref_o, FP32_BOUND)


def test_bf16_inputs_keep_their_dtypes():
    check(make_inputs(1, 4, 1, 16, 16, True, 1, dtype=torch.bfloat16), None, True, bound=BF16_BOUND)


def test_input_errors_are_named():
    q, k, v, beta, g, _ = make_inputs(1, 2, 1, 16, 16, True, None)
    with pytest.raises(ValueError, match=r"g must be a scalar log-decay \[B, T, H\], got \(1, 2, 1, 16\)"):
        fused_recurrent_fwd(q, k, v, beta, g[..., None].expand(1, 2, 1, 16), 0.25, None, None, False)
    big = torch.zeros(1, 2, 1, 512)
    with pytest.raises(ValueError, match="K = 512 > 256"):
        fused_recurrent_bwd(big, big, v, beta, None, 0.25, None, None, torch.zeros_like(v), None)


@st.composite
def problems(draw):
    """Shapes, decay, states and (for B == 1) varlen offsets with possibly empty sequences."""
    T = draw(st.integers(1, 70))
    K, V = draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([8, 16, 32]))
    gated, with_h0, with_dht = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    cu_seqlens = None
    B = draw(st.integers(1, 2))
    if draw(st.booleans()):
        B = 1
        cuts = sorted(draw(st.lists(st.integers(0, T), min_size=0, max_size=3)))
        cu_seqlens = torch.tensor([0, *cuts, T], dtype=torch.int64)
    return dict(B=B, T=T, H=1, K=K, V=V, gated=gated, with_h0=with_h0, cu_seqlens=cu_seqlens, with_dht=with_dht)


@settings(max_examples=10)
@given(problems())
def test_matches_reference_on_drawn_shapes(problem):
    torch.manual_seed(problem["T"])
    run_and_check(**problem)


def test_compile_cases_registered():
    """bf16 and fp32 default-config cases, gated and not, forward and backward, at K = V = 64."""
    names = {case.name for case in CASES}
    for kernel in ("delta_rule_fused_recurrent_fwd_kernel", "delta_rule_fused_recurrent_bwd_kernel"):
        for dtype in ("bf16", "fp32"):
            for gate in ("none", "scalar"):
                assert f"{kernel}[{dtype},g={gate}]" in names
    for case in CASES:
        if case.name.startswith("delta_rule_fused_recurrent"):
            assert list(case.signature) == case.fn.arg_names, case.name
            assert case.constexprs["K"] == case.constexprs["V"] == 64, case.name
