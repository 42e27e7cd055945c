"""The state-gradient scan of the chunked `delta_rule` backward, and its state-free first half.

Per chunk (math in `ipl_layers/ops/delta_rule_chunk.py`), with do scaled, b the chunk-local log-decay cumsum,
b_C its value at the chunk's last token, P = tril(Q K^T * Gamma), Q_d = Q * exp(b), K_d = K * exp(b_C - b)
and dS the gradient of the state where the chunk ends:

    dv_new = P^T do + K_d dS                                  (gradient of the chunk's v_new = u - w S0)
    dS0    = Q_d^T do + exp(b_C) dS - w^T dv_new              (the same at the chunk's start)

P^T do depends on no state: `delta_rule_chunk_bwd_dvlocal_kernel` computes it for every chunk at once. The
scan `delta_rule_chunk_bwd_dstate_kernel` then walks each sequence's chunks backwards, one program per
(V block, sequence, head). Unlike linear attention, w^T dv_new couples every key row of the state through
dv_new, so a program holds the whole key dimension of its state-gradient block, blocked as the forward's
scan (chunk_state.py): K <= MAX_KEY_DIM, and the same V blocks.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.delta_rule.chunk_state import MAX_KEY_DIM, state_value_block
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import MAX_CHUNK, ChunkLayout, feature_block


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATED"])
@triton.jit
def delta_rule_chunk_bwd_dvlocal_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    gc,  # [B * T, H] fp32 chunk-local log-decay cumsum, or None
    do,  # [B * T, H, V]
    dvl,  # [B * T, H, V] fp32: P^T do (scaled)
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATED: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if length <= 0:
        return
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    row = (first + o_t) * H + i_h  # [BT] token-head rows of the chunk
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_Pt = tl.zeros([BT, BT], dtype=tl.float32)  # P^T [BT(j), BT(i)]
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)  # [BT, BK]
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)
        b_Pt += tl.dot(b_k.to(DT), tl.trans(b_q.to(DT)))
    anticausal = (o_t[:, None] <= o_t[None, :]) & m_t[None, :]  # [BT(j), BT(i)]: i >= j, row i in the chunk
    if GATED:
        b_g = tl.load(gc + row, mask=m_t, other=0)  # [BT]
        b_Pt *= tl.exp(tl.where(anticausal, b_g[None, :] - b_g[:, None], float("-inf")))
    else:
        b_Pt = tl.where(anticausal, b_Pt, 0)
    b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
    b_dvl = scale * tl.dot(b_Pt.to(DT), b_do.to(DT))
    tl.store(dvl + row[:, None] * V + o_v[None, :], b_dvl, mask=m_tv)


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATED"])
@triton.jit
def delta_rule_chunk_bwd_dstate_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    w,  # [B * T, H, K] fp32
    gc,  # [B * T, H] fp32 chunk-local log-decay cumsum, or None
    do,  # [B * T, H, V]
    dvl,  # [B * T, H, V] fp32: P^T do (scaled)
    dht,  # [N, H, K, V]: gradient of the final state, or None
    dvn,  # [B * T, H, V] fp32: gradient of v_new
    dhs,  # [NT, H, K, V] fp32: gradient of the state at each chunk end
    dh0,  # [N, H, K, V]: gradient of the initial state, or None
    seq_offsets,  # [N + 1]
    chunk_offsets,  # [N + 1]
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,  # >= K: the whole key dim
    BV: tl.constexpr,
    GATED: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    c0 = tl.load(chunk_offsets + i_n)
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
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
        row = tok * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        tl.store(dhs + ((c0 + i) * H + i_h) * K * V + o_kv, dstate, mask=m_kv)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        if GATED:
            last = (tl.minimum(bos + i * BT + BT, eos) - 1) * H + i_h
            b_g = tl.load(gc + row, mask=m_t, other=0)  # [BT]
            g_last = tl.load(gc + last)
            b_k *= tl.exp(g_last - b_g)[:, None]  # K_d
            b_q *= tl.exp(b_g)[:, None]  # Q_d
        b_dvn = tl.load(dvl + row[:, None] * V + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
        b_dvn += tl.dot(b_k.to(DT), dstate.to(DT))
        tl.store(dvn + row[:, None] * V + o_v[None, :], b_dvn, mask=m_tv)
        b_w = tl.load(w + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)  # [BT, BK]
        b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0)
        if GATED:
            dstate *= tl.exp(g_last)
        dstate += tl.dot(tl.trans((b_q * scale).to(DT)), b_do.to(DT))
        dstate -= tl.dot(tl.trans(b_w.to(DT)), b_dvn.to(DT))
    if dh0 is not None:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, dstate.to(dh0.dtype.element_ty), mask=m_kv)


def scan_blocks(K: int, V: int):
    """(BK, BV) of the scan: the whole key dim, and the forward scan's value blocks."""
    return feature_block(K, MAX_KEY_DIM), state_value_block(K, V)


def delta_rule_chunk_bwd_dstate(q, k, w, gc, do, dht, h0, layout: ChunkLayout, scale: float):
    """Returns dv_new [B, T, H, V] fp32, dhs [NT, H, K, V] fp32 (gradient at each chunk end) and dh0
    (h0's dtype) or None without h0."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    BK, BV = scan_blocks(K, V)
    NV = triton.cdiv(V, BV)
    dvl = do.new_empty(do.shape, dtype=torch.float32)
    delta_rule_chunk_bwd_dvlocal_kernel[(NV, layout.NT, H)](
        q, k, gc, do, dvl, layout.chunk_spans, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=feature_block(K), BV=BV, GATED=gc is not None,
    )
    dvn = torch.empty_like(dvl)
    dhs = q.new_empty(layout.NT, H, K, V, dtype=torch.float32)
    dh0 = h0.new_empty(h0.shape) if h0 is not None else None
    delta_rule_chunk_bwd_dstate_kernel[(NV, layout.N * H)](
        q, k, w, gc, do, dvl, dht, dvn, dhs, dh0, layout.seq_offsets, layout.chunk_offsets, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=BK, BV=BV, GATED=gc is not None,
    )
    return dvn, dhs, dh0


def _register_compile_cases():
    """K = V = 64, BT = 64, bf16 and fp32 inputs, with and without decay (with initial and final states)."""
    BK, BV = scan_blocks(CASE_K, CASE_V)
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gated in (False, True):
            variant = f"{dtype},g={'scalar' if gated else 'none'}"
            consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK, "BV": BV, "GATED": gated,
                      **({} if gated else {"gc": None})}
            g_type = {"gc": "*fp32"} if gated else {}
            shared = {"q": inp, "k": inp, "do": inp, "dvl": "*fp32", "scale": "fp32", **g_type}
            register_default(
                delta_rule_chunk_bwd_dvlocal_kernel, variant, {**shared, "chunk_spans": "*i64"},
                {**consts, "BK": feature_block(CASE_K)},
            )
            register_default(
                delta_rule_chunk_bwd_dstate_kernel, variant,
                {**shared, "w": "*fp32", "dht": "*fp32", "dvn": "*fp32", "dhs": "*fp32", "dh0": "*fp32",
                 "seq_offsets": "*i64", "chunk_offsets": "*i64"},
                {**consts, "BK": BK},
            )


_register_compile_cases()
