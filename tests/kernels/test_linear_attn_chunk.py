"""Chunked Triton kernels of `linear_attention` against the float64 token-by-token reference.

Run in fp32 under the Triton interpreter (its bf16 math is broken), where tl.dot is exact fp32.
Every case checks the output, the final state and the gradients of q, k, v, g and the initial state.
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
from ipl_layers.kernels.linear_attn.chunk import chunk_bwd, chunk_fwd  # noqa: E402
from ipl_layers.ops.linear_attention import linear_attention_reference  # noqa: E402

# Relative RMS error of every output and gradient (fp32 kernels vs float64; observed <= 1e-6).
REL_RMS_BOUND = 2e-5
# dg under a strong decay (-20 per step): the fp32 chunk-local cumsum reaches |b| ~ 1300, whose ulp
# (~1e-4) is the relative error of the exp(b_i - b_j) that dg is made of (observed ~2e-5).
STRONG_DECAY_DG_BOUND = 2e-4

GATES = ["none", "scalar", "key"]


def make_inputs(B, T, H, K, V, gate, *, N=None, h0=True, h0_dtype=torch.float32, strong=False):
    """q, k, v, g, h0 in fp32 (h0 in h0_dtype); g = log-sigmoid decays, or ~ -20 per step if strong."""
    N = B if N is None else N
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K) / K**0.5
    v = torch.randn(B, T, H, V)
    g = None
    if gate != "none":
        shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
        g = -20.0 - torch.rand(shape) if strong else F.logsigmoid(torch.randn(shape) + 2.0)
    initial = torch.randn(N, H, K, V).to(h0_dtype) if h0 else None
    return q, k, v, g, initial


def check_against_reference(q, k, v, g, h0, *, cu_seqlens=None, chunk_size=64, with_dht=True, dg_bound=REL_RMS_BOUND):
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K**-0.5
    do = torch.randn_like(v)
    dht = torch.randn(N, H, K, V) if with_dht else None

    o, ht = chunk_fwd(q, k, v, g, scale, h0, cu_seqlens, True, chunk_size)
    dq, dk, dv, dg, dh0 = chunk_bwd(q, k, v, g, scale, h0, cu_seqlens, do, dht, chunk_size)

    names = ["q", "k", "v", "g", "initial_state"]
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (q, k, v, g, h0)]
    ref_o, ref_ht = linear_attention_reference(
        *leaves[:4], scale=scale, initial_state=leaves[4], output_final_state=True, cu_seqlens=cu_seqlens
    )
    loss = (ref_o * do.double()).sum() + ((ref_ht * dht.double()).sum() if with_dht else 0.0)
    present = [x for x in leaves if x is not None]
    ref_grads = dict(zip([n for n, x in zip(names, leaves) if x is not None], torch.autograd.grad(loss, present)))

    assert o.dtype == v.dtype and ht.dtype == torch.float32
    assert_rel_rms("o", o, ref_o, REL_RMS_BOUND)
    assert_rel_rms("final_state", ht, ref_ht, REL_RMS_BOUND)
    for name, grad, x in zip(names, (dq, dk, dv, dg, dh0), (q, k, v, g, h0)):
        if x is None:
            assert grad is None, f"d{name}: expected None for an absent input"
            continue
        assert grad.dtype == x.dtype, f"d{name}: dtype {grad.dtype} != input dtype {x.dtype}"
        assert_rel_rms(f"d{name}", grad, ref_grads[name], dg_bound if name == "g" else REL_RMS_BOUND)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize(
    "B, T, H, chunk_size, h0, with_dht",
    [
        (2, 1, 2, 64, True, True),  # a single token
        (1, 100, 2, 64, False, True),  # T not a multiple of the chunk
        (1, 150, 1, 64, True, False),  # three chunks, the last partial; no gradient into the final state
        (2, 45, 1, 16, True, True),  # chunk_size 16: one sub-chunk per chunk for the per-key decay
    ],
)
def test_matches_reference(gate, B, T, H, chunk_size, h0, with_dht):
    q, k, v, g, initial = make_inputs(B, T, H, 32, 16, gate, h0=h0)
    check_against_reference(q, k, v, g, initial, chunk_size=chunk_size, with_dht=with_dht)


@pytest.mark.parametrize("gate", GATES)
def test_varlen_with_empty_sequence(gate):
    cu_seqlens = torch.tensor([0, 37, 37, 100, 105], dtype=torch.int32)
    q, k, v, g, initial = make_inputs(1, 105, 1, 16, 32, gate, N=4, h0_dtype=torch.float64)
    check_against_reference(q, k, v, g, initial, cu_seqlens=cu_seqlens, chunk_size=32)


@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_strong_decay_stays_finite(gate):
    """g ~ -20 per step: exp(b_last) underflows to 0 across a chunk and nothing may overflow.

    dg is tiny here (every pair carries exp(-20) or less) while the terms of its identity are O(1):
    this fails unless the kernels leave out the exactly cancelling pairs (see chunk_bwd.py).
    """
    q, k, v, g, initial = make_inputs(1, 80, 1, 16, 16, gate, strong=True)
    check_against_reference(q, k, v, g, initial, chunk_size=64, dg_bound=STRONG_DECAY_DG_BOUND)


@settings(max_examples=6)
@given(data=st.data())
def test_random_shapes(data):
    gate = data.draw(st.sampled_from(GATES), label="gate")
    K = data.draw(st.sampled_from([16, 32]), label="K")
    V = data.draw(st.sampled_from([16, 32]), label="V")
    chunk_size = data.draw(st.sampled_from([16, 32, 64]), label="chunk_size")
    h0 = data.draw(st.booleans(), label="h0")
    with_dht = data.draw(st.booleans(), label="with_dht")
    cu_seqlens = None
    if data.draw(st.booleans(), label="varlen"):
        lengths = data.draw(st.lists(st.integers(0, 60), min_size=1, max_size=3), label="lengths")
        B, T, N = 1, max(sum(lengths), 1), len(lengths)
        lengths[-1] += T - sum(lengths)
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    else:
        B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 150), label="T")
        N = B
    q, k, v, g, initial = make_inputs(B, T, 1, K, V, gate, N=N, h0=h0)
    check_against_reference(q, k, v, g, initial, cu_seqlens=cu_seqlens, chunk_size=chunk_size, with_dht=with_dht)


@pytest.mark.parametrize(
    "kernel, gates",
    [
        ("linear_attn_chunk_fwd_kernel", GATES),
        ("linear_attn_chunk_state_fwd_kernel", GATES),
        ("linear_attn_chunk_state_bwd_kernel", GATES),
        ("linear_attn_chunk_bwd_dv_kernel", GATES),
        ("linear_attn_chunk_bwd_dqk_kernel", GATES),
        ("linear_attn_chunk_intra_fwd_kernel", ["key"]),
        ("linear_attn_chunk_intra_bwd_kernel", ["key"]),
    ],
)
def test_compile_cases_registered(kernel, gates):
    """Each kernel registers its default config for bf16 and fp32 inputs and each decay form it serves."""
    names = {case.name for case in CASES}
    for dtype in ("bf16", "fp32"):
        for gate in gates:
            assert f"{kernel}[{dtype},g={gate}]" in names
