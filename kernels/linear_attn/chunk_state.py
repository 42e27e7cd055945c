"""The two inter-chunk scans of the chunked `linear_attention`: states forward, state gradients backward.

With b the chunk-local cumsum of the log-decay (b_last its value at the chunk's last token), a chunk
maps its start state S to its end state, and the end-state gradient dS_end to the start-state one:

    S_end   = exp(b_last) * S + sum_j (k_j * exp(b_last - b_j))^T v_j
    dS      = exp(b_last) * dS_end + scale * sum_i (q_i * exp(b_i))^T dO_i

(exp(b_last) scales the rows of S for a per-key decay; every exponent is <= 0). One program per
(K block, V block, sequence, head) carries its fp32 state block across the sequence's chunks and stores
it at every chunk: `hs[c]` = the state at the start of chunk c, `dhs[c]` = the gradient at its end.
They are stored in the input dtype: they only feed tensor-core dots, which take the input dtype.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import (
    CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default,
)
from ipl_layers.kernels.linear_attn.chunk_layout import (
    GATE_NAMES, MAX_CHUNK, NARROW_BLOCK, ChunkLayout, feature_block,
)


@triton.jit
def _chunk_decays(gc, tok, m_t, last, i_h, o_k, m_k, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """b (chunk-local log-decay cumsum) of the chunk's tokens and b_last: [BT], [] or [BT, BK], [BK]."""
    if GATE == 1:
        b_g = tl.load(gc + tok * H + i_h, mask=m_t, other=0)
        g_last = tl.load(gc + last * H + i_h)
    else:
        b_g = tl.load(gc + (tok * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        g_last = tl.load(gc + (last * H + i_h) * K + o_k, mask=m_k, other=0)
    return b_g, g_last


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def linear_attn_chunk_state_fwd_kernel(
    k,  # [B * T, H, K]
    v,  # [B * T, H, V]
    gc,  # [B * T, H] or [B * T, H, K] fp32 chunk-local cumsum, or None
    h0,  # [N, H, K, V] or None
    hs,  # [NT, H, K, V] in k's dtype: state at each chunk start
    ht,  # [N, H, K, V] fp32: final state, or None
    seq_offsets,  # [N + 1]
    chunk_offsets,  # [N + 1]
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    FINAL_WITHOUT_LAST: tl.constexpr,
):
    """FINAL_WITHOUT_LAST: ht leaves out the last token's k^T v (see chunk_bwd.py), not subtracted after."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    c0 = tl.load(chunk_offsets + i_n)
    DT = k.dtype.element_ty
    k_end = eos  # tokens from k_end on do not enter the state
    if FINAL_WITHOUT_LAST:
        k_end = eos - 1
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV] offsets inside one [K, V] state
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if h0 is not None:
        state = tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        tok = bos + i * BT + o_t  # [BT]
        m_t = tok < eos
        last = tl.minimum(bos + i * BT + BT, eos) - 1
        tl.store(hs + ((c0 + i) * H + i_h) * K * V + o_kv, state.to(hs.dtype.element_ty), mask=m_kv)
        b_k = tl.load(
            k + (tok * H + i_h)[:, None] * K + o_k[None, :], mask=(tok < k_end)[:, None] & m_k[None, :], other=0
        ).to(tl.float32)  # [BT, BK]
        b_v = tl.load(v + (tok * H + i_h)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
        if GATE == 1:
            b_g, g_last = _chunk_decays(gc, tok, m_t, last, i_h, o_k, m_k, H, K, GATE)
            state *= tl.exp(g_last)
            b_k *= tl.exp(g_last - b_g)[:, None]
        if GATE == 2:
            b_g, g_last = _chunk_decays(gc, tok, m_t, last, i_h, o_k, m_k, H, K, GATE)
            state *= tl.exp(g_last)[:, None]
            b_k *= tl.exp(g_last[None, :] - b_g)
        state += tl.dot(tl.trans(b_k.to(DT)), b_v.to(DT))
    if ht is not None:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, state, mask=m_kv)


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def linear_attn_chunk_state_bwd_kernel(
    q,  # [B * T, H, K]
    do,  # [B * T, H, V]
    gc,  # [B * T, H] or [B * T, H, K] fp32 chunk-local cumsum, or None
    dht,  # [N, H, K, V]: gradient of the final state, or None
    dhs,  # [NT, H, K, V] in q's dtype: gradient of the state at each chunk end
    dh0,  # [N, H, K, V]: gradient of the initial state, or None
    seq_offsets,  # [N + 1]
    chunk_offsets,  # [N + 1]
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    c0 = tl.load(chunk_offsets + i_n)
    DT = q.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV] offsets inside one [K, V] state
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if dht is not None:
        dstate = tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
    n_chunks = tl.cdiv(eos - bos, BT)
    for j in range(n_chunks):
        i = n_chunks - 1 - j
        tok = bos + i * BT + o_t  # [BT]
        m_t = tok < eos
        last = tl.minimum(bos + i * BT + BT, eos) - 1
        tl.store(dhs + ((c0 + i) * H + i_h) * K * V + o_kv, dstate.to(dhs.dtype.element_ty), mask=m_kv)
        b_q = tl.load(
            q + (tok * H + i_h)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0
        ).to(tl.float32)  # [BT, BK]
        b_do = tl.load(do + (tok * H + i_h)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
        if GATE == 1:
            b_g, g_last = _chunk_decays(gc, tok, m_t, last, i_h, o_k, m_k, H, K, GATE)
            dstate *= tl.exp(g_last)
            b_q *= tl.exp(b_g)[:, None]
        if GATE == 2:
            b_g, g_last = _chunk_decays(gc, tok, m_t, last, i_h, o_k, m_k, H, K, GATE)
            dstate *= tl.exp(g_last)[:, None]
            b_q *= tl.exp(b_g)
        dstate += tl.dot(tl.trans((b_q * scale).to(DT)), b_do.to(DT))
    if dh0 is not None:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, dstate.to(dh0.dtype.element_ty), mask=m_kv)


def _grid(K, V, BK, BV, layout, H):
    return (triton.cdiv(K, BK), triton.cdiv(V, BV), layout.N * H)


def linear_attn_chunk_state_fwd(k, v, gc, gate, h0, layout: ChunkLayout, output_final_state: bool,
                                final_without_last: bool = False):
    """Returns hs [NT, H, K, V] (state at each chunk start, k's dtype) and the fp32 final state [N, H, K, V] or None.

    final_without_last: the final state leaves out the last token's k^T v (D_T S_{T-1} instead of S_T).
    """
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    BK, BV = feature_block(K, NARROW_BLOCK), feature_block(V, NARROW_BLOCK)
    hs = k.new_empty(layout.NT, H, K, V)
    ht = k.new_empty(layout.N, H, K, V, dtype=torch.float32) if output_final_state else None
    linear_attn_chunk_state_fwd_kernel[_grid(K, V, BK, BV, layout, H)](
        k, v, gc, h0, hs, ht, layout.seq_offsets, layout.chunk_offsets,
        H=H, K=K, V=V, BT=layout.BT, BK=BK, BV=BV, GATE=gate, FINAL_WITHOUT_LAST=final_without_last,
    )
    return hs, ht


def linear_attn_chunk_state_bwd(q, do, gc, gate, dht, h0, layout: ChunkLayout, scale: float):
    """Returns dhs [NT, H, K, V] (gradient at each chunk end, q's dtype) and dh0 (h0's dtype) or None without h0."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    BK, BV = feature_block(K, NARROW_BLOCK), feature_block(V, NARROW_BLOCK)
    dhs = q.new_empty(layout.NT, H, K, V)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    linear_attn_chunk_state_bwd_kernel[_grid(K, V, BK, BV, layout, H)](
        q, do, gc, dht, dhs, dh0, layout.seq_offsets, layout.chunk_offsets, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=BK, BV=BV, GATE=gate,
    )
    return dhs, dh0


def _register_compile_cases():
    """K = V = 64, each decay form, bf16 and fp32 inputs, with initial and final states (the largest case)."""
    blocks = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK,
              "BK": feature_block(CASE_K, NARROW_BLOCK), "BV": feature_block(CASE_V, NARROW_BLOCK)}
    offsets = {"seq_offsets": "*i64", "chunk_offsets": "*i64"}
    for dtype in ("bf16", "fp32"):
        for gate, gate_name in GATE_NAMES.items():
            inp = f"*{dtype}"
            g_type = {"gc": "*fp32"} if gate else {}
            consts = {**blocks, "GATE": gate, **({} if gate else {"gc": None})}
            fwd_types = {"k": inp, "v": inp, "h0": "*fp32", "hs": inp, "ht": "*fp32", **g_type, **offsets}
            register_default(
                linear_attn_chunk_state_fwd_kernel, f"{dtype},g={gate_name}",
                fwd_types, {**consts, "FINAL_WITHOUT_LAST": False},
            )
            if gate:  # the backward's recomputation, for the final-state term of dg
                register_default(
                    linear_attn_chunk_state_fwd_kernel, f"{dtype},g={gate_name},final_without_last",
                    fwd_types, {**consts, "FINAL_WITHOUT_LAST": True},
                )
            register_default(
                linear_attn_chunk_state_bwd_kernel, f"{dtype},g={gate_name}",
                {"q": inp, "do": inp, "dht": "*fp32", "dhs": inp, "dh0": "*fp32", "scale": "fp32",
                 **g_type, **offsets}, consts,
            )


_register_compile_cases()
