"""Chunked forward of `linear_attention`: the output kernel and the `chunk_fwd` launcher.

Per chunk, with S0 its start state (from chunk_state.py) and b the chunk-local log-decay cumsum,

    o_i = scale * [ (q_i * exp(b_i)) S0 + sum_{j <= i} A_ij v_j ],    A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)

The kernel runs one program per (V block, chunk, head), all chunks in parallel. Without a decay or
with a scalar one, A = (q k^T) * exp(b_i - b_j) is formed in the kernel, the exponent masked to
j <= i before the exp; a per-key decay takes A from the sub-chunk kernel (chunk_intra.py).

`chunk_fwd` pipeline: chunk-local cumsum of g -> chunk states hs [NT, H, K, V] (one sequential
scan per sequence) -> (per-key: A) -> outputs. The chunk states are not kept: the backward recomputes
them with one more scan instead of holding NT * K * V per head between the passes.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import (
    CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default,
)
from ipl_layers.kernels.linear_attn.chunk_cumsum import linear_attn_chunk_cumsum
from ipl_layers.kernels.linear_attn.chunk_intra import linear_attn_chunk_intra_fwd
from ipl_layers.kernels.linear_attn.chunk_layout import (
    GATE_KEY, GATE_NAMES, GATE_NONE, MAX_CHUNK, chunk_block, chunk_layout, feature_block, gate_form,
)
from ipl_layers.kernels.linear_attn.chunk_state import linear_attn_chunk_state_fwd


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def linear_attn_chunk_fwd_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    v,  # [B * T, H, V]
    gc,  # [B * T, H] or [B * T, H, K] fp32 chunk-local cumsum, or None
    A,  # [B * T, H, BT] fp32 intra-chunk scores (per-key decay), or None
    hs,  # [NT, H, K, V] state at each chunk start
    o,  # [B * T, H, V]
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if length <= 0:
        return
    DT = q.dtype.element_ty
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    row = (first + o_t) * H + i_h  # [BT] token-head rows of the chunk
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]  # [BT, BT]: j <= i, row i in the chunk
    p_h = hs + (i_c * H + i_h).to(tl.int64) * K * V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        if GATE == 2:
            b_g = tl.load(gc + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)
            b_q *= tl.exp(b_g)
        else:
            b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)
            b_A += tl.dot(b_q.to(DT), tl.trans(b_k.to(DT)))
        acc += tl.dot(b_q.to(DT), b_h.to(DT))
    if GATE == 0:
        b_A = tl.where(causal, b_A, 0)
    if GATE == 1:
        b_g = tl.load(gc + row, mask=m_t, other=0)  # [BT]
        acc *= tl.exp(b_g)[:, None]
        b_A *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    if GATE == 2:
        b_A = tl.load(A + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0)
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_tv, other=0)
    acc += tl.dot(b_A.to(DT), b_v.to(DT))
    tl.store(o + row[:, None] * V + o_v[None, :], (acc * scale).to(o.dtype.element_ty), mask=m_tv)


def chunk_fwd(q, k, v, g, scale, initial_state, cu_seqlens, output_final_state, chunk_size):
    """Returns o [B, T, H, V] in v.dtype and the fp32 final state [N, H, K, V] (or None).

    The chunk length is chunk_size rounded up to a power of two within [16, 64] (`chunk_block`).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout = chunk_layout(B, T, cu_seqlens, chunk_block(chunk_size), q.device)
    gate = gate_form(g)
    gc = linear_attn_chunk_cumsum(g, layout) if gate != GATE_NONE else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    hs, ht = linear_attn_chunk_state_fwd(k, v, gc, gate, h0, layout, output_final_state)
    A = linear_attn_chunk_intra_fwd(q, k, gc, layout) if gate == GATE_KEY else None
    o = torch.empty_like(v)
    BV = feature_block(V)
    grid = (triton.cdiv(V, BV), layout.NT, H)
    linear_attn_chunk_fwd_kernel[grid](
        q, k, v, gc, A, hs, o, layout.chunk_spans, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=feature_block(K), BV=BV, GATE=gate,
    )
    return o, ht


def _register_compile_cases():
    consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK,
              "BK": feature_block(CASE_K), "BV": feature_block(CASE_V)}
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gate, gate_name in GATE_NAMES.items():
            types = {"q": inp, "k": inp, "v": inp, "hs": inp, "o": inp, "chunk_spans": "*i64", "scale": "fp32"}
            absent = {}
            if gate == GATE_NONE:
                absent["gc"] = None
            else:
                types["gc"] = "*fp32"
            if gate == GATE_KEY:
                types["A"] = "*fp32"
            else:
                absent["A"] = None
            register_default(
                linear_attn_chunk_fwd_kernel, f"{dtype},g={gate_name}", types, {**consts, "GATE": gate, **absent},
            )


_register_compile_cases()
