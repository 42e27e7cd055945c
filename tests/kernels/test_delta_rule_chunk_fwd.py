"""Chunked Triton forward of `delta_rule` against float64 references.

Run in fp32 under the Triton interpreter (its bf16 math is broken), where tl.dot is exact fp32. Every case
checks o and the final state against the token-by-token reference, and each field the backward receives
(A, w, u, hs, v_new, gc) against a float64 chunk-by-chunk evaluation of the WY form, written here from the
formulas of chunk_saved.py (itself checked against the token-by-token reference in float64).
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
from ipl_layers.kernels.delta_rule.chunk_fwd import chunk_fwd  # noqa: E402
from ipl_layers.ops.delta_rule import delta_rule_reference  # noqa: E402

# fp32 kernels vs float64, unit keys and beta in (0, 1): observed <= 5e-7 on every quantity (T <= 300).
REL_RMS_BOUND = 1e-5
# The float64 chunk evaluation vs the float64 token-by-token reference: rounding only (observed ~1e-15).
F64_BOUND = 1e-12


def make_inputs(B, T, H, K, V, gated, *, N=None, h0=True, strong=False):
    """fp32 q, unit-norm k, v, beta in (0, 1), log-sigmoid g (or ~ -20 per step if strong) and h0 [N, H, K, V]."""
    N = B if N is None else N
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    beta = torch.rand(B, T, H)
    g = None
    if gated:
        g = -20.0 - torch.rand(B, T, H) if strong else F.logsigmoid(torch.randn(B, T, H) + 2.0)
    initial = torch.randn(N, H, K, V) if h0 else None
    return q, k, v, beta, g, initial


def chunk_reference(q, k, v, beta, g, h0, scale, layout):
    """Float64 WY form chunk by chunk, in the kernels' layouts: o, final, and A, w, u, hs, v_new, gc."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BT = layout.BT
    q, k, v, beta = (x.double().reshape(B * T, H, -1) for x in (q, k, v, beta[..., None]))  # [B * T, H, *]
    g = torch.zeros(B * T, H, 1, dtype=torch.float64) if g is None else g.double().reshape(B * T, H, 1)
    A = torch.zeros(B * T, H, BT, dtype=torch.float64)
    w, u, v_new = torch.zeros(B * T, H, K, dtype=torch.float64), torch.zeros_like(v), torch.zeros_like(v)
    o, gc = torch.zeros_like(v), torch.zeros_like(g)
    hs = torch.zeros(layout.NT, H, K, V, dtype=torch.float64)
    finals = []
    offsets, chunks = layout.seq_offsets.tolist(), layout.chunk_offsets.tolist()
    for n in range(layout.N):
        S = torch.zeros(H, K, V, dtype=torch.float64) if h0 is None else h0[n].double()  # [H, K, V]
        for c, start in enumerate(range(offsets[n], offsets[n + 1], BT)):
            rows = slice(start, min(start + BT, offsets[n + 1]))
            L = rows.stop - rows.start
            qc, kc, vc, bc = (x[rows].transpose(0, 1) for x in (q, k, v, beta))  # [H, L, *]
            b = g[rows].transpose(0, 1).cumsum(1)  # [H, L, 1]
            gamma = (b - b.transpose(1, 2)).exp().tril()  # [H, L, L]
            M = (bc * (kc @ kc.transpose(1, 2)) * gamma).tril(-1)
            Ac = torch.linalg.inv(torch.eye(L, dtype=torch.float64) + M)  # [H, L, L]
            wc, uc = Ac @ (bc * kc * b.exp()), Ac @ (bc * vc)
            vn = uc - wc @ S  # [H, L, V]
            oc = scale * ((qc * b.exp()) @ S + ((qc @ kc.transpose(1, 2)) * gamma) @ vn)
            hs[chunks[n] + c] = S
            S = b[:, -1:].exp() * S + (kc * (b[:, -1:] - b).exp()).transpose(1, 2) @ vn
            for dst, x in ((w, wc), (u, uc), (v_new, vn), (o, oc), (gc, b)):
                dst[rows] = x.transpose(0, 1)
            A[rows, :, :L] = Ac.transpose(0, 1)
        finals.append(S)
    shaped = lambda x: x.reshape(B, T, H, -1)  # noqa: E731
    fields = dict(A=shaped(A), w=shaped(w), u=shaped(u), hs=hs, v_new=shaped(v_new), gc=shaped(gc)[..., 0])
    return shaped(o), torch.stack(finals), fields


def check_against_reference(q, k, v, beta, g, h0, *, cu_seqlens=None, chunk_size=64, bound=REL_RMS_BOUND):
    K = q.shape[-1]
    scale = K**-0.5
    o, final, saved = chunk_fwd(q, k, v, beta, g, scale, h0, cu_seqlens, True, chunk_size)
    leaves = [x.double() if x is not None else None for x in (q, k, v, beta, g, h0)]
    ref_o, ref_final = delta_rule_reference(
        *leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True, cu_seqlens=cu_seqlens
    )
    chunk_o, chunk_final, fields = chunk_reference(q, k, v, beta, g, h0, scale, saved.layout)
    assert_rel_rms("float64 chunk reference o", chunk_o, ref_o, F64_BOUND)
    assert_rel_rms("float64 chunk reference final", chunk_final, ref_final, F64_BOUND)

    assert o.dtype == v.dtype and final.dtype == torch.float32
    assert_rel_rms("o", o, ref_o, bound)
    assert_rel_rms("final_state", final, ref_final, bound)
    real = torch.zeros(saved.layout.NT, dtype=torch.bool)  # hs rows of spare slots are never written
    real[: saved.layout.chunk_offsets[-1]] = True
    for name, ref in fields.items():
        got = getattr(saved, name)
        if name == "gc" and g is None:
            assert got is None, "gc: expected None without g"
            continue
        assert got.dtype == torch.float32, f"{name}: dtype {got.dtype}, expected fp32"
        if name == "hs":
            assert got.shape == ref.shape, f"hs: shape {tuple(got.shape)} != {tuple(ref.shape)}"
            got, ref = got[real], ref[real]
        assert_rel_rms(name, got, ref, bound)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "B, T, H, chunk_size, h0",
    [
        (2, 1, 2, 64, True),  # a single token
        (1, 100, 2, 64, False),  # T not a multiple of the chunk
        (1, 150, 1, 64, True),  # three chunks, the last partial
        (2, 45, 1, 16, True),  # 16-token chunks: a single diagonal block
        (1, 77, 1, 32, False),  # 32-token chunks: two diagonal blocks, odd T
    ],
)
def test_matches_reference(gated, B, T, H, chunk_size, h0):
    check_against_reference(*make_inputs(B, T, H, 32, 16, gated, h0=h0), chunk_size=chunk_size)


@pytest.mark.parametrize("gated", [False, True])
def test_varlen_with_empty_sequences(gated):
    cu_seqlens = torch.tensor([0, 0, 37, 37, 100, 105], dtype=torch.int32)
    check_against_reference(*make_inputs(1, 105, 1, 16, 32, gated, N=5), cu_seqlens=cu_seqlens, chunk_size=32)


def test_strong_decay_stays_finite():
    """g ~ -20 per step: exp(b_last) underflows to 0 across a chunk; no exponent may be positive."""
    check_against_reference(*make_inputs(1, 80, 1, 16, 16, True, strong=True), chunk_size=64)


@pytest.mark.parametrize("gated", [False, True])
def test_empty_input_passes_the_state_on(gated):
    q, k, v, beta, g, h0 = make_inputs(2, 0, 1, 16, 16, gated)
    o, final, _ = chunk_fwd(q, k, v, beta, g, 0.25, h0, None, True, 64)
    assert o.shape == (2, 0, 1, 16) and torch.equal(final, h0)


@settings(max_examples=6)
@given(data=st.data())
def test_random_shapes(data):
    gated = data.draw(st.booleans(), label="gated")
    K = data.draw(st.sampled_from([16, 32]), label="K")
    V = data.draw(st.sampled_from([16, 32]), label="V")
    chunk_size = data.draw(st.sampled_from([16, 32, 64]), label="chunk_size")
    h0 = data.draw(st.booleans(), label="h0")
    cu_seqlens = None
    if data.draw(st.booleans(), label="varlen"):
        lengths = data.draw(st.lists(st.integers(0, 60), min_size=1, max_size=3), label="lengths")
        B, T, N = 1, max(sum(lengths), 1), len(lengths)
        lengths[-1] += T - sum(lengths)
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    else:
        B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 150), label="T")
        N = B
    inputs = make_inputs(B, T, 1, K, V, gated, N=N, h0=h0)
    check_against_reference(*inputs, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "kernel",
    ["delta_rule_chunk_solve_kernel", "delta_rule_chunk_wu_kernel", "delta_rule_chunk_state_kernel",
     "linear_attn_chunk_fwd_kernel[delta_rule"],
)
def test_compile_cases_registered(kernel):
    """Each stage registers its default config for bf16 and fp32 inputs, with and without the decay."""
    names = {case.name for case in CASES}
    prefix = kernel + ("," if kernel.endswith("delta_rule") else "[")
    for dtype in ("bf16", "fp32"):
        for gate in ("none", "scalar"):
            assert f"{prefix}{dtype},g={gate}]" in names
