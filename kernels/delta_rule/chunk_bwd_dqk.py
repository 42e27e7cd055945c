"""The per-chunk gradients of the chunked `delta_rule` backward that go through the states: dq, most of dk, dw.

Per chunk (do scaled, S0 = hs its start state, dS its end-state gradient, dv_new from chunk_bwd_state.py,
Gamma_ij = exp(b_i - b_j) for j <= i):

    dP    = tril(do v_new^T),   hp = dP * Gamma
    dq    = (do S0^T) * exp(b) + hp K
    dk'   = (v_new dS^T) * exp(b_C - b) + hp^T Q          (the rest of dk comes from the WY kernel)
    dw    = -dv_new S0^T                                  (w enters v_new = u - w S0)

One program per (K block, chunk, head) sums over the V blocks. With a decay, it also writes its key block's
share of dg (exact: every term is a sum over key channels). b_i's gradient db_i gathers the pairs (i, j < i)
of the products through Gamma, + through Gamma_ij and - through Gamma_ji; expressed with the dq, dk terms,
row i of (hp K) . q_i and (hp^T Q)_j . k_j, with hp's diagonal left out: Gamma_ii = 1 holds no b, and those
terms would cancel only up to rounding, which strong decay leaves far above the true dg. Q_d = Q exp(b) adds
(do S0^T)_i . q_d,i. The end-state terms hold b_C: K_d = K exp(b_C - b) gives y_j = dk'_inter,j . k_j to b_C and
-y_j to b_j, and exp(b_C) S0 gives exp(b_C) sum(S0 * dS) to b_C. Since b is the chunk-local cumsum of g,
dg_t = sum_{i >= t} db_i within the chunk, which takes the b_C terms as + sum_{j < t} y_j + exp(b_C) sum(S0 * dS).
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import MAX_CHUNK, NARROW_BLOCK, ChunkLayout, feature_block

# 8 warps: four accumulators ([BT, BK] x 3 and [BT, BT]) and their operands.
DQK_DEFAULT_CONFIG = next(i for i, c in enumerate(CONFIGS) if c.num_warps == 8)


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATED"], default=DQK_DEFAULT_CONFIG)
@triton.jit
def delta_rule_chunk_bwd_dqk_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    gc,  # [B * T, H] fp32 chunk-local log-decay cumsum, or None
    do,  # [B * T, H, V]
    v_new,  # [B * T, H, V] fp32
    dvn,  # [B * T, H, V] fp32: gradient of v_new
    hs,  # [NT, H, K, V] fp32: state at each chunk start
    dhs,  # [NT, H, K, V] fp32: gradient of the state at each chunk end
    dq,  # [B * T, H, K] in q's dtype
    dk,  # [B * T, H, K] fp32: dk' (dk without the WY terms)
    dw,  # [B * T, H, K] fp32
    x,  # [B * T, H, NK] fp32: each key block's share of dg, or None
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
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if length <= 0:
        return
    DT = q.dtype.element_ty
    row0 = first * H + i_h  # token-head row of the chunk's first token (int64; tile offsets stay int32)
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_state = (i_c * H + i_h).to(tl.int64) * K * V
    b_dqd = tl.zeros([BT, BK], dtype=tl.float32)  # do S0^T
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dS^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_sds = 0.0  # sum(S0 * dS) over this key block
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
        b_do = tl.load(do + row0 * V + o_tv, mask=m_tv, other=0).to(DT)
        b_vn = tl.load(v_new + row0 * V + o_tv, mask=m_tv, other=0).to(DT)
        b_dvn = tl.load(dvn + row0 * V + o_tv, mask=m_tv, other=0).to(DT)
        b_h = tl.load(hs + p_state + o_kv, mask=m_kv, other=0)  # [BK, BV]
        b_dh = tl.load(dhs + p_state + o_kv, mask=m_kv, other=0)
        b_dqd += tl.dot(b_do, tl.trans(b_h.to(DT)))
        b_dw -= tl.dot(b_dvn, tl.trans(b_h.to(DT)))
        b_dkd += tl.dot(b_vn, tl.trans(b_dh.to(DT)))
        b_dP += tl.dot(b_do, tl.trans(b_vn))
        if GATED:
            b_sds += tl.sum(b_h * b_dh)
    o_tk = o_t[:, None] * (H * K) + o_k[None, :]  # [BT, BK]
    tl.store(dw + row0 * K + o_tk, b_dw, mask=m_tk)
    b_q = tl.load(q + row0 * K + o_tk, mask=m_tk, other=0).to(tl.float32)
    b_k = tl.load(k + row0 * K + o_tk, mask=m_tk, other=0).to(tl.float32)
    b_dqd *= scale
    b_dP *= scale
    if GATED:
        b_g = tl.load(gc + row0 + o_t * H, mask=m_t, other=0)  # [BT]
        g_last = tl.load(gc + row0 + (length - 1) * H)
        b_diag = tl.sum(tl.where(o_t[:, None] == o_t[None, :], b_dP, 0), axis=1)  # [BT]: dP_ii (Gamma_ii = 1)
        strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None]  # [BT, BT]: j < i, row i in the chunk
        b_dP *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], float("-inf")))  # hp without its diagonal
        b_dqd *= tl.exp(b_g)[:, None]
        b_dq = tl.dot(b_dP.to(DT), b_k.to(DT))
        b_db = tl.sum(b_q * (b_dq + b_dqd), axis=1)  # [BT]
        b_dq += b_dqd + b_diag[:, None] * b_k
        tl.store(dq + row0 * K + o_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_dk = tl.dot(tl.trans(b_dP).to(DT), b_q.to(DT))
        b_db -= tl.sum(b_k * b_dk, axis=1)
        b_dkd *= tl.exp(g_last - b_g)[:, None]
        b_y = tl.sum(b_k * b_dkd, axis=1)  # [BT]
        b_before = tl.sum(tl.where(o_t[:, None] > o_t[None, :], b_y[None, :], 0), axis=1)  # sum_{j < t} y_j
        b_x = tl.cumsum(b_db, axis=0, reverse=True) + b_before + tl.exp(g_last) * b_sds
        NK: tl.constexpr = (K + BK - 1) // BK
        tl.store(x + (row0 + o_t * H) * NK + i_k, b_x, mask=m_t)
        b_dk += b_dkd + b_diag[:, None] * b_q
    else:
        b_dP = tl.where((o_t[:, None] >= o_t[None, :]) & m_t[:, None], b_dP, 0)
        b_dq = b_dqd + tl.dot(b_dP.to(DT), b_k.to(DT))
        tl.store(dq + row0 * K + o_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
        b_dk = b_dkd + tl.dot(tl.trans(b_dP).to(DT), b_q.to(DT))
    tl.store(dk + row0 * K + o_tk, b_dk, mask=m_tk)


def dqk_blocks(K: int, V: int):
    return feature_block(K, NARROW_BLOCK), feature_block(V, NARROW_BLOCK)


def delta_rule_chunk_bwd_dqk(q, k, gc, do, v_new, dvn, hs, dhs, layout: ChunkLayout, scale: float):
    """Returns dq (q's dtype), dk' and dw (fp32 [B, T, H, K]) and, with a decay, x [B, T, H, NK] fp32, the
    key blocks' shares of dg (else None)."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    BK, BV = dqk_blocks(K, V)
    NK = triton.cdiv(K, BK)
    dq = torch.empty_like(q)
    dk = q.new_empty(q.shape, dtype=torch.float32)
    dw = torch.empty_like(dk)
    x = q.new_empty(*q.shape[:3], NK, dtype=torch.float32) if gc is not None else None
    delta_rule_chunk_bwd_dqk_kernel[(NK, layout.NT, H)](
        q, k, gc, do, v_new, dvn, hs, dhs, dq, dk, dw, x, layout.chunk_spans, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=BK, BV=BV, GATED=gc is not None,
    )
    return dq, dk, dw, x


def _register_compile_cases():
    """K = V = 64, BT = 64, bf16 and fp32 inputs, with and without decay."""
    BK, BV = dqk_blocks(CASE_K, CASE_V)
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gated in (False, True):
            types = {"q": inp, "k": inp, "do": inp, "v_new": f32, "dvn": f32, "hs": f32, "dhs": f32, "dq": inp,
                     "dk": f32, "dw": f32, "chunk_spans": "*i64", "scale": "fp32"}
            consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK, "BK": BK, "BV": BV, "GATED": gated}
            if gated:
                types.update(gc=f32, x=f32)
            else:
                consts.update(gc=None, x=None)
            register_default(delta_rule_chunk_bwd_dqk_kernel, f"{dtype},g={'scalar' if gated else 'none'}",
                             types, consts)


_register_compile_cases()
