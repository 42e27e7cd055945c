"""Chunked Triton backward of `delta_rule` against the float64 token-by-token reference and its autograd.

Run in fp32 under the Triton interpreter (its bf16 math is broken), where tl.dot is exact fp32. The saved
forward quantities come two ways: from the float64 torch chunked path cast to fp32 (the backward's own error
alone) and from the Triton forward `chunk_fwd` (the pair as it runs). Every case checks the gradients of q, k,
v, beta, g and the initial state.
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
from ipl_layers.kernels.delta_rule.chunk_bwd import chunk_bwd  # noqa: E402
from ipl_layers.kernels.delta_rule.chunk_fwd import chunk_fwd  # noqa: E402
from ipl_layers.kernels.delta_rule.chunk_saved import DeltaRuleChunkSaved  # noqa: E402
from ipl_layers.kernels.linear_attn.chunk_layout import chunk_block, chunk_layout  # noqa: E402
from ipl_layers.ops.chunking import from_chunks, pad_sequences  # noqa: E402
from ipl_layers.ops.delta_rule import delta_rule_reference  # noqa: E402
from ipl_layers.ops.delta_rule_chunk import chunk_forward  # noqa: E402

# Relative RMS error of every gradient (fp32 kernels vs float64), unit keys and beta in (0, 1), T <= 300:
# measured <= 6e-7 from either source of the saved tensors; the bound leaves 30x headroom.
REL_RMS_BOUND = 2e-5
# dg under log-decays in [-8, -4] per step: the fp32 chunk-local cumsum reaches |b| ~ 380 at BT = 64, whose
# ulp (~3e-5) is the relative error of the exp(b_i - b_j) dg is made of (measured <= 7e-6 at BT = 16..64).
STRONG_DECAY_DG_BOUND = 1e-4

# exp overflowing anywhere (a positive exponent, even one masked out afterwards) fails the test.
pytestmark = pytest.mark.filterwarnings("error:overflow encountered:RuntimeWarning")

NAMES = ("q", "k", "v", "beta", "g", "initial_state")
SOURCES = ["torch", "chunk_fwd"]


def make_inputs(B, T, H, K, V, gated, *, N=None, h0=True, strong=False):
    """fp32 q, k (unit norm), v, beta in (0, 1), g (log-sigmoid decays, or uniform in [-8, -4]), h0."""
    N = B if N is None else N
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    beta = torch.sigmoid(torch.randn(B, T, H))
    g = None
    if gated:
        g = -4.0 - 4.0 * torch.rand(B, T, H) if strong else F.logsigmoid(torch.randn(B, T, H) + 2.0)
    initial = torch.randn(N, H, K, V) if h0 else None
    return q, k, v, beta, g, initial


def torch_saved(q, k, v, beta, g, h0, cu_seqlens, chunk_size, scale) -> DeltaRuleChunkSaved:
    """The contract's fields from the float64 torch chunked path, cast to fp32 and laid out per chunk slot."""
    B, T = q.shape[:2]
    layout = chunk_layout(B, T, cu_seqlens, chunk_block(chunk_size), q.device)
    BT = layout.BT
    f64 = [x.double() if x is not None else None for x in (q, k, v, beta, g)]
    padded, unpad = pad_sequences(f64, cu_seqlens, BT)  # [N, Tp, H, *]
    h0 = h0.double() if h0 is not None else None
    _, (ch, states, v_new), _ = chunk_forward(*padded, h0, scale, BT)
    flat = lambda x: unpad(from_chunks(x)).float().contiguous()  # noqa: E731  [N, H, NC, BT, *] -> [B, T, H, *]
    eye = torch.eye(BT, dtype=torch.float64).expand_as(ch.M)
    A = torch.linalg.solve_triangular(ch.M, eye, upper=False, unitriangular=True)  # (I + M)^-1
    hs = torch.full((layout.NT,) + states[:, :, 0].shape[1:], float("nan"))  # spare slots: never read
    counts = (layout.chunk_offsets[1:] - layout.chunk_offsets[:-1]).tolist()
    for n, (c0, count) in enumerate(zip(layout.chunk_offsets.tolist(), counts)):
        hs[c0:c0 + count] = states[n, :, :count].transpose(0, 1).float()
    K = q.shape[-1]
    return DeltaRuleChunkSaved(
        layout=layout, gc=flat(ch.b)[..., 0] if g is not None else None, A=flat(A), w=flat(ch.WU[..., :K]),
        u=flat(ch.WU[..., K:]), hs=hs, v_new=flat(v_new),
    )


def reference_grads(inputs, do, dht, cu_seqlens, scale):
    """Float64 autograd of the token-by-token reference for the loss <o, do> + <final, dht>."""
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in inputs]
    o, ht = delta_rule_reference(*leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True,
                                 cu_seqlens=cu_seqlens)
    loss = (o * do.double()).sum() + ((ht * dht.double()).sum() if dht is not None else 0.0)
    present = [x for x in leaves if x is not None]
    return dict(zip([n for n, x in zip(NAMES, leaves) if x is not None], torch.autograd.grad(loss, present)))


def check_against_reference(inputs, *, source="torch", cu_seqlens=None, chunk_size=64, with_dht=True,
                            dg_bound=REL_RMS_BOUND):
    q, k, v, beta, g, h0 = inputs
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    scale = K**-0.5
    do = torch.randn_like(v)
    dht = torch.randn(N, H, K, V) if with_dht else None
    if source == "torch":
        saved = torch_saved(q, k, v, beta, g, h0, cu_seqlens, chunk_size, scale)
    else:
        _, _, saved = chunk_fwd(q, k, v, beta, g, scale, h0, cu_seqlens, False, chunk_size)
    grads = chunk_bwd(q, k, v, beta, g, scale, h0, cu_seqlens, do, dht, saved)
    ref = reference_grads(inputs, do, dht, cu_seqlens, scale)
    for name, grad, x in zip(NAMES, grads, inputs):
        if x is None:
            assert grad is None, f"d{name}: expected None for an absent input"
            continue
        assert grad.dtype == x.dtype, f"d{name}: dtype {grad.dtype} != input dtype {x.dtype}"
        assert_rel_rms(f"d{name}", grad, ref[name], dg_bound if name == "g" else REL_RMS_BOUND)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(
    "B, T, H, K, V, chunk_size, h0, with_dht",
    [
        (2, 1, 2, 16, 32, 64, True, True),  # a single token
        (1, 100, 2, 32, 16, 64, False, True),  # T not a multiple of the chunk
        (1, 150, 1, 32, 32, 64, True, False),  # three chunks, the last partial; no final-state gradient
        (2, 45, 1, 16, 16, 16, True, True),  # BT = 16: many chunks, odd length
        (1, 77, 1, 16, 32, 32, False, False),  # BT = 32, neither state given
    ],
)
def test_matches_reference(source, gated, B, T, H, K, V, chunk_size, h0, with_dht):
    inputs = make_inputs(B, T, H, K, V, gated, h0=h0)
    check_against_reference(inputs, source=source, chunk_size=chunk_size, with_dht=with_dht)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("gated", [False, True])
def test_varlen_with_empty_sequences(source, gated):
    cu_seqlens = torch.tensor([0, 0, 37, 37, 100, 105], dtype=torch.int32)  # empty first and middle sequences
    *inputs, h0 = make_inputs(1, 105, 2, 16, 32, gated, N=5)
    inputs = (*inputs, h0.double())  # dh0 comes back in the initial state's own dtype
    check_against_reference(inputs, source=source, cu_seqlens=cu_seqlens, chunk_size=32)


@pytest.mark.parametrize("source", SOURCES)
def test_strong_decay(source):
    """Log-decays in [-8, -4] per step: exp(b) underflows within a chunk, nothing may overflow, and dg (tiny
    against the O(1) terms of its identity) keeps its accuracy only if no cancelling pair is ever formed."""
    inputs = make_inputs(1, 150, 2, 16, 16, True, strong=True)
    check_against_reference(inputs, source=source, chunk_size=64, dg_bound=STRONG_DECAY_DG_BOUND)


@settings(max_examples=8)
@given(data=st.data())
def test_random_shapes(data):
    gated = data.draw(st.booleans(), label="gated")
    K = data.draw(st.sampled_from([16, 32]), label="K")
    V = data.draw(st.sampled_from([16, 32]), label="V")
    chunk_size = data.draw(st.sampled_from([16, 32, 64]), label="chunk_size")
    h0 = data.draw(st.booleans(), label="h0")
    with_dht = data.draw(st.booleans(), label="with_dht")
    source = data.draw(st.sampled_from(SOURCES), label="source")
    cu_seqlens = None
    if data.draw(st.booleans(), label="varlen"):
        lengths = data.draw(st.lists(st.integers(0, 70), min_size=1, max_size=3), label="lengths")
        B, T, N = 1, max(sum(lengths), 1), len(lengths)
        lengths[-1] += T - sum(lengths)
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    else:
        B, T = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 150), label="T")
        N = B
    inputs = make_inputs(B, T, 1, K, V, gated, N=N, h0=h0)
    check_against_reference(inputs, source=source, cu_seqlens=cu_seqlens, chunk_size=chunk_size, with_dht=with_dht)


def test_rejects_saved_of_other_inputs():
    q, k, v, beta, g, h0 = make_inputs(1, 40, 1, 16, 16, True)
    saved = torch_saved(q, k, v, beta, None, h0, None, 16, 0.25)
    with pytest.raises(ValueError, match=r"saved.gc: expected float32 \[1, 40, 1\], got None"):
        chunk_bwd(q, k, v, beta, g, 0.25, h0, None, torch.randn_like(v), None, saved)
    with pytest.raises(ValueError, match=r"saved.A: expected float32 \[1, 41, 1, 16\]"):
        chunk_bwd(*(torch.cat([x, x[:, :1]], 1) for x in (q, k, v, beta)), None, 0.25, h0, None,
                  torch.randn(1, 41, 1, 16), None, saved)
    wide = torch.randn(1, 40, 1, 256)
    with pytest.raises(ValueError, match="key dim K <= 128, got K = 256"):
        chunk_bwd(wide, wide, v, beta, None, 0.25, None, None, torch.randn_like(v), None, saved)


@pytest.mark.parametrize("kernel", ["dvlocal", "dstate", "dqk", "wy"])
def test_compile_cases_registered(kernel):
    """Each kernel registers its default config for bf16 and fp32 inputs, with and without decay."""
    names = {case.name for case in CASES}
    for dtype in ("bf16", "fp32"):
        for gate in ("none", "scalar"):
            assert f"delta_rule_chunk_bwd_{kernel}_kernel[{dtype},g={gate}]" in names
