"""The WY (triangular solve) part of the chunked `delta_rule` backward: dv, dbeta, the rest of dk, and dg.

Per chunk, [w, u] = A diag(beta) [K * exp(b), V] with A = (I + M)^-1 and M = StrictTril(diag(beta) (K K^T * Gamma)).
Given d[w, u] = [dw, dv_new] (chunk_bwd_dqk.py, chunk_bwd_state.py), the solve's gradient needs no solve:

    dR = A^T [dw, dv_new],   dM = -StrictTril(dR [w, u]^T),   hd = dM * Gamma,   hm = diag(beta) hd
    dv    = beta * dR_u
    dk    = dk' + beta * dR_w * exp(b) + hm K + hm^T K
    dbeta = sum(dR_w * K exp(b)) + sum(dR_u * V) + sum_j dM_ij (K K^T * Gamma)_ij

with the last sum taken as k_i . (hd K)_i. dg (with a decay) adds this kernel's part of db to the key blocks'
shares x from the dqk kernel: the pairs (i, j < i) through M, + row i of (hm K) . k_i, - (hm^T K)_j . k_j, and
exp(b) in the solve's right-hand side, beta_i dR_w,i . k_w,i; summed from the chunk's end (dg_t = sum_{i >= t} db_i).

One program per (chunk, head): dM needs every key and value column. It runs two passes over the key blocks, the
second (dk) recomputing dR_w = A^T dw once dM, a sum over all of them, is known; hm^T K is taken as hd^T (beta K)
so that A^T and hd are its only [BT, BT] tiles.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import MAX_CHUNK, NARROW_BLOCK, ChunkLayout, feature_block


# 8 warps: at 4, A^T, the dM accumulator and the dot operands of fp32 inputs spill on sm_80.
WY_DEFAULT_CONFIG = next(i for i, c in enumerate(CONFIGS) if c.num_warps == 8)


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "NX", "GATED"], default=WY_DEFAULT_CONFIG)
@triton.jit
def delta_rule_chunk_bwd_wy_kernel(
    k,  # [B * T, H, K]
    v,  # [B * T, H, V]
    beta,  # [B * T, H]
    gc,  # [B * T, H] fp32 chunk-local log-decay cumsum, or None
    A,  # [B * T, H, BT] fp32: row t of its chunk's (I + M)^-1
    w,  # [B * T, H, K] fp32
    u,  # [B * T, H, V] fp32
    dvn,  # [B * T, H, V] fp32: gradient of v_new (= that of u)
    dw,  # [B * T, H, K] fp32
    dkp,  # [B * T, H, K] fp32: dk' from the dqk kernel
    x,  # [B * T, H, NX] fp32: the key blocks' shares of dg, or None
    dk,  # [B * T, H, K] in k's dtype
    dv,  # [B * T, H, V] in v's dtype
    dbeta,  # [B * T, H] in beta's dtype
    dg,  # [B * T, H] in g's dtype, or None
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NX: tl.constexpr,
    GATED: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if length <= 0:
        return
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    row = (first + o_t) * H + i_h  # [BT] token-head rows of the chunk
    # [BT, BT] A^T: rows past the chunk's end masked; the contract zeroes its columns past the end
    b_At = tl.trans(tl.load(A + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0)).to(DT)
    b_beta = tl.load(beta + row, mask=m_t, other=0).to(tl.float32)  # [BT]
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)  # -dM before the mask: dR [w, u]^T
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = row[:, None] * V + o_v[None, :]  # [BT, BV]
        b_dRu = tl.dot(b_At, tl.load(dvn + p_tv, mask=m_tv, other=0).to(DT))  # [BT, BV]
        b_dM += tl.dot(b_dRu.to(DT), tl.trans(tl.load(u + p_tv, mask=m_tv, other=0).to(DT)))
        b_dbeta += tl.sum(b_dRu * tl.load(v + p_tv, mask=m_tv, other=0).to(tl.float32), axis=1)
        tl.store(dv + p_tv, (b_beta[:, None] * b_dRu).to(dv.dtype.element_ty), mask=m_tv)
    b_eb = tl.full([BT], 1.0, dtype=tl.float32)
    if GATED:
        b_g = tl.load(gc + row, mask=m_t, other=0)  # [BT]
        b_eb = tl.exp(b_g)
    b_rw = tl.zeros([BT], dtype=tl.float32)  # dR_w . k_w per token
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = row[:, None] * K + o_k[None, :]  # [BT, BK]
        b_dRw = tl.dot(b_At, tl.load(dw + p_tk, mask=m_tk, other=0).to(DT))  # [BT, BK]
        b_dM += tl.dot(b_dRw.to(DT), tl.trans(tl.load(w + p_tk, mask=m_tk, other=0).to(DT)))
        b_k = tl.load(k + p_tk, mask=m_tk, other=0).to(tl.float32)
        b_rw += tl.sum(b_dRw * b_k, axis=1) * b_eb
    b_dbeta += b_rw
    strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None]  # [BT, BT]: j < i, row i in the chunk
    b_hd = tl.where(strict, -b_dM, 0)  # dM
    if GATED:
        b_hd *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], float("-inf")))  # dM * Gamma
    b_ka = tl.zeros([BT], dtype=tl.float32)  # k_i . (hd K)_i
    b_kc = tl.zeros([BT], dtype=tl.float32)  # k_j . (hm^T K)_j
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = row[:, None] * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_tk, other=0)
        b_dRw = tl.dot(b_At, tl.load(dw + p_tk, mask=m_tk, other=0).to(DT))
        b_a = tl.dot(b_hd.to(DT), b_k.to(DT))  # [BT, BK]
        b_c = tl.dot(tl.trans(b_hd).to(DT), (b_beta[:, None] * b_k).to(DT))  # hm^T K, hm = diag(beta) hd
        b_k = b_k.to(tl.float32)
        b_ka += tl.sum(b_k * b_a, axis=1)
        b_kc += tl.sum(b_k * b_c, axis=1)
        b_dk = tl.load(dkp + p_tk, mask=m_tk, other=0) + b_beta[:, None] * (b_a + b_dRw * b_eb[:, None]) + b_c
        tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    b_dbeta += b_ka
    tl.store(dbeta + row, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)
    if GATED:
        b_db = b_beta * (b_ka + b_rw) - b_kc  # [BT]
        b_dg = tl.cumsum(b_db, axis=0, reverse=True)
        for i in range(NX):
            b_dg += tl.load(x + row * NX + i, mask=m_t, other=0)
        tl.store(dg + row, b_dg.to(dg.dtype.element_ty), mask=m_t)


def wy_blocks(K: int, V: int):
    return feature_block(K, NARROW_BLOCK), feature_block(V, NARROW_BLOCK)


def delta_rule_chunk_bwd_wy(k, v, beta, g, gc, A, w, u, dvn, dw, dkp, x, layout: ChunkLayout):
    """Returns dk, dv, dbeta and dg (None without a decay) in the dtypes of k, v, beta and g."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    BK, BV = wy_blocks(K, V)
    dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
    dg = torch.empty_like(g) if g is not None else None
    delta_rule_chunk_bwd_wy_kernel[(layout.NT, H)](
        k, v, beta, gc, A, w, u, dvn, dw, dkp, x, dk, dv, dbeta, dg, layout.chunk_spans,
        H=H, K=K, V=V, BT=layout.BT, BK=BK, BV=BV, NX=x.shape[-1] if x is not None else 0, GATED=g is not None,
    )
    return dk, dv, dbeta, dg


def _register_compile_cases():
    """K = V = 64, BT = 64, bf16 and fp32 inputs (beta and g too), with and without decay."""
    BK, BV = wy_blocks(CASE_K, CASE_V)
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gated in (False, True):
            types = {"k": inp, "v": inp, "beta": inp, "A": f32, "w": f32, "u": f32, "dvn": f32, "dw": f32,
                     "dkp": f32, "dk": inp, "dv": inp, "dbeta": inp, "chunk_spans": "*i64"}
            consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK, "BK": BK, "BV": BV,
                      "NX": triton.cdiv(CASE_K, BK) if gated else 0, "GATED": gated}
            if gated:
                types.update(gc=f32, x=f32, dg=inp)
            else:
                consts.update(gc=None, x=None, dg=None)
            register_default(delta_rule_chunk_bwd_wy_kernel, f"{dtype},g={'scalar' if gated else 'none'}",
                             types, consts)


_register_compile_cases()
