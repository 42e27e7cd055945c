"""Chunked backward of `linear_attention`: the dv and dq/dk kernels and the `chunk_bwd` launcher.

Per chunk, with S0 its start state, dS_end the gradient of its end state (chunk_state.py), b the
chunk-local log-decay cumsum and A_ij = sum_k q_ik k_jk exp(b_ik - b_jk) (j <= i):

    dv_j  = scale * sum_{i >= j} A_ij dO_i + (k_j * exp(b_last - b_j)) dS_end
    dA_ij = scale * dO_i . v_j                                                   (j <= i)
    dq_i  = scale * exp(b_i) * (dO_i S0^T) + sum_{j <= i} dA_ij k_j exp(b_i - b_j)
    dk_j  = exp(b_last - b_j) * (v_j dS_end^T) + sum_{i >= j} dA_ij q_i exp(b_i - b_j)

Both kernels run one program per (feature block, chunk, head). Without a decay or with a scalar one the
intra-chunk sums are [BT, BT] matmuls with the exponent masked before the exp; a per-key decay hands the
intra-chunk part of dq, dk to the sub-chunk kernel (chunk_intra.py), which gets dA from here.

The decay gradient (chunk_cumsum.py) is a reverse cumsum over each sequence of x = q * dq - k * dk plus
the final-state term sum_v S_T * dS_T, summed over the key channels for a scalar decay. Expanded into
pairs (i, j) of a query i (or the final state) and a key j <= i, dg_t keeps the pairs with j < t <= i:
a pair with both ends >= t enters once through q_i . dq_i and once, negated, through k_j . dk_j. The
pairs (i, i) and (final state, last token) always cancel so, and they are the only large ones when the
decay is strong (all others carry exp(b_i - b_j) << 1): summed in fp32 they would leave rounding noise
far above the true dg. So x is formed from dq, dk without their diagonal terms (and without the
final-state part of the last token's dk), and the final-state term uses D_T S_{T-1} = S_T - k_T^T v_T,
recomputed without the last token rather than subtracted.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import (
    CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default,
)
from ipl_layers.kernels.linear_attn.chunk_cumsum import linear_attn_chunk_cumsum, linear_attn_chunk_dg
from ipl_layers.kernels.linear_attn.chunk_intra import linear_attn_chunk_intra_bwd, linear_attn_chunk_intra_fwd
from ipl_layers.kernels.linear_attn.chunk_layout import (
    GATE_KEY, GATE_NAMES, GATE_NONE, GATE_SCALAR, MAX_CHUNK, NARROW_BLOCK, chunk_block, chunk_layout,
    feature_block, gate_form,
)
from ipl_layers.kernels.linear_attn.chunk_state import linear_attn_chunk_state_bwd, linear_attn_chunk_state_fwd

DQK_DEFAULT_CONFIG = next(i for i, c in enumerate(CONFIGS) if c.num_warps == 8)


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def linear_attn_chunk_bwd_dv_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    gc,  # [B * T, H] or [B * T, H, K] fp32 chunk-local cumsum, or None
    A,  # [B * T, H, BT] fp32 intra-chunk scores (per-key decay), or None
    do,  # [B * T, H, V]
    dhs,  # [NT, H, K, V] gradient of each chunk's end state
    dv,  # [B * T, H, V]
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
    DT = k.dtype.element_ty
    o_t = tl.arange(0, BT)
    m_t = o_t < length
    row = (first + o_t) * H + i_h  # [BT] token-head rows of the chunk
    row_last = (first + length - 1) * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # [BT(j), BT(i)]: i >= j with row i in the chunk, the transpose of the forward's causal mask
    anticausal = (o_t[:, None] <= o_t[None, :]) & m_t[None, :]
    p_dh = dhs + (i_c * H + i_h).to(tl.int64) * K * V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)  # A^T
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        if GATE == 2:
            b_g = tl.load(gc + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)
            g_last = tl.load(gc + row_last * K + o_k, mask=m_k, other=0)
            b_k *= tl.exp(g_last[None, :] - b_g)
        else:
            b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)
            b_At += tl.dot(b_k.to(DT), tl.trans(b_q.to(DT)))
        acc += tl.dot(b_k.to(DT), b_dh.to(DT))
    if GATE == 0:
        b_At = tl.where(anticausal, b_At, 0)
    if GATE == 1:
        b_g = tl.load(gc + row, mask=m_t, other=0)  # [BT]
        g_last = tl.load(gc + row_last)
        acc *= tl.exp(g_last - b_g)[:, None]
        b_At *= tl.exp(tl.where(anticausal, b_g[None, :] - b_g[:, None], float("-inf")))
    if GATE == 2:
        b_At = tl.trans(tl.load(A + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0))
    m_tv = m_t[:, None] & m_v[None, :]
    b_do = tl.load(do + row[:, None] * V + o_v[None, :], mask=m_tv, other=0)
    acc += scale * tl.dot(b_At.to(DT), b_do.to(DT))
    tl.store(dv + row[:, None] * V + o_v[None, :], acc.to(dv.dtype.element_ty), mask=m_tv)


# default: 8 warps (at 4, the three accumulators and their dot operands fill all 255 registers on sm_80)
@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"], default=DQK_DEFAULT_CONFIG)
@triton.jit
def linear_attn_chunk_bwd_dqk_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    v,  # [B * T, H, V]
    gc,  # [B * T, H] or [B * T, H, K] fp32 chunk-local cumsum, or None
    do,  # [B * T, H, V]
    hs,  # [NT, H, K, V] state at each chunk start
    dhs,  # [NT, H, K, V] gradient of each chunk's end state
    dq,  # [B * T, H, K]: full dq; per-key decay: fp32 inter-chunk part
    dk,  # [B * T, H, K]: full dk; per-key decay: fp32 inter-chunk part
    dA,  # [B * T, H, BT] fp32 (per-key decay), or None
    x,  # [B * T, H, NK] fp32 partial sums of q * dq - k * dk (scalar decay), or None
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
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        o_tv = o_t[:, None] * (H * V) + o_v[None, :]  # [BT, BV]
        o_kv = o_k[:, None] * V + o_v[None, :]  # [BK, BV]
        b_v = tl.load(v + row0 * V + o_tv, mask=m_tv, other=0)
        b_do = tl.load(do + row0 * V + o_tv, mask=m_tv, other=0)
        b_h = tl.load(hs + p_state + o_kv, mask=m_kv, other=0)
        b_dh = tl.load(dhs + p_state + o_kv, mask=m_kv, other=0)
        b_dq += tl.dot(b_do.to(DT), tl.trans(b_h.to(DT)))
        b_dk += tl.dot(b_v.to(DT), tl.trans(b_dh.to(DT)))
        b_dA += tl.dot(b_do.to(DT), tl.trans(b_v.to(DT)))
    o_tk = o_t[:, None] * (H * K) + o_k[None, :]  # [BT, BK]
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]  # [BT, BT]: j <= i, row i in the chunk
    if GATE == 2:
        b_g = tl.load(gc + row0 * K + o_tk, mask=m_tk, other=0)
        g_last = tl.load(gc + (row0 + (length - 1) * H) * K + o_k, mask=m_k, other=0)
        tl.store(dq + row0 * K + o_tk, b_dq * scale * tl.exp(b_g), mask=m_tk)
        tl.store(dk + row0 * K + o_tk, b_dk * tl.exp(g_last[None, :] - b_g), mask=m_tk)
        if i_k == 0:
            o_tt = o_t[:, None] * (H * BT) + o_t[None, :]  # [BT, BT]
            tl.store(dA + row0 * BT + o_tt, tl.where(causal, b_dA * scale, 0), mask=m_t[:, None])
    else:
        b_q = tl.load(q + row0 * K + o_tk, mask=m_tk, other=0).to(tl.float32)
        b_k = tl.load(k + row0 * K + o_tk, mask=m_tk, other=0).to(tl.float32)
        b_dq *= scale
        b_dA *= scale
        # dq is finished and stored before dk's intra-chunk dot, which keeps the registers in bounds
        if GATE == 0:
            b_dA = tl.where(causal, b_dA, 0)
            b_dq += tl.dot(b_dA.to(DT), b_k.to(DT))
            tl.store(dq + row0 * K + o_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
            b_dk += tl.dot(tl.trans(b_dA).to(DT), b_q.to(DT))
        if GATE == 1:
            b_g = tl.load(gc + row0 + o_t * H, mask=m_t, other=0)  # [BT]
            g_last = tl.load(gc + row0 + (length - 1) * H)
            ends = tl.load(chunk_spans + 3 * i_c + 2)
            b_dq *= tl.exp(b_g)[:, None]
            b_dk *= tl.exp(g_last - b_g)[:, None]
            # x leaves out the pairs that cancel exactly (see the module docstring): (i, i), added to
            # dq, dk after x, and (final state, last token), this chunk's dk if it ends its sequence
            b_x = -tl.sum(tl.where(((o_t == length - 1) & (ends != 0))[:, None], 0, b_k * b_dk), axis=1)
            b_diag = tl.sum(tl.where(o_t[:, None] == o_t[None, :], b_dA, 0), axis=1)  # [BT]: dA_ii
            strict = (o_t[:, None] > o_t[None, :]) & m_t[:, None]  # [BT, BT]: j < i
            b_dA *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], float("-inf")))
            b_dq += tl.dot(b_dA.to(DT), b_k.to(DT))
            b_x += tl.sum(b_q * b_dq, axis=1)
            b_dq += b_diag[:, None] * b_k
            tl.store(dq + row0 * K + o_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
            b_dk_intra = tl.dot(tl.trans(b_dA).to(DT), b_q.to(DT))
            b_x -= tl.sum(b_k * b_dk_intra, axis=1)
            NK: tl.constexpr = (K + BK - 1) // BK
            tl.store(x + (row0 + o_t * H) * NK + i_k, b_x, mask=m_t)
            b_dk += b_dk_intra + b_diag[:, None] * b_q
        tl.store(dk + row0 * K + o_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


def chunk_bwd(q, k, v, g, scale, initial_state, cu_seqlens, do, dht, chunk_size):
    """Returns dq, dk, dv, dg (None without g), dh0 (None without initial_state), each in its input's dtype.

    Recomputes the chunk states (one scan) instead of receiving them from the forward.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    dht = dht.contiguous() if dht is not None else None
    layout = chunk_layout(B, T, cu_seqlens, chunk_block(chunk_size), q.device)
    gate = gate_form(g)
    gc = linear_attn_chunk_cumsum(g, layout) if gate != GATE_NONE else None
    # the final state (without the last token) is needed only for the final-state term of dg
    need_final = gate != GATE_NONE and dht is not None
    hs, ht = linear_attn_chunk_state_fwd(k, v, gc, gate, h0, layout, need_final, final_without_last=need_final)
    dhs, dh0 = linear_attn_chunk_state_bwd(q, do, gc, gate, dht, h0, layout, scale)
    BV = feature_block(V, NARROW_BLOCK)
    BK = feature_block(K, NARROW_BLOCK)  # dq/dk: each K block recomputes dA (64 spills on sm_80)
    NK = triton.cdiv(K, BK)

    A = linear_attn_chunk_intra_fwd(q, k, gc, layout) if gate == GATE_KEY else None
    dv = torch.empty_like(v)
    linear_attn_chunk_bwd_dv_kernel[(triton.cdiv(V, BV), layout.NT, H)](
        q, k, gc, A, do, dhs, dv, layout.chunk_spans, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=feature_block(K), BV=BV, GATE=gate,
    )

    if gate == GATE_KEY:
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)
        dA = q.new_empty(B * T, H, layout.BT, dtype=torch.float32)
        x = None
    else:
        dq, dk, dA = torch.empty_like(q), torch.empty_like(k), None
        x = q.new_empty(B, T, H, NK, dtype=torch.float32) if gate == GATE_SCALAR else None
    linear_attn_chunk_bwd_dqk_kernel[(NK, layout.NT, H)](
        q, k, v, gc, do, hs, dhs, dq, dk, dA, x, layout.chunk_spans, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=BK, BV=BV, GATE=gate,
    )
    if gate == GATE_KEY:
        dq, dk, x = linear_attn_chunk_intra_bwd(q, k, gc, dA, dq, dk, layout)

    dg = None
    if gate != GATE_NONE:
        if gate == GATE_SCALAR:
            x = x.sum(-1)  # [B, T, H]
        final = None
        if dht is not None:
            final = (ht * dht.float()).sum(-1)  # [N, H, K]: sum_v (D_T S_{T-1} * dS_T)
            final = final.sum(-1) if gate == GATE_SCALAR else final
        dg = linear_attn_chunk_dg(x, final, g.dtype, layout)
    return dq, dk, dv, dg, dh0


def _register_compile_cases():
    """K = V = 64, bf16 and fp32 inputs, each decay form."""
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gate, gate_name in GATE_NAMES.items():
            per_key = gate == GATE_KEY
            shared = {"q": inp, "k": inp, "do": inp, "dhs": inp, "chunk_spans": "*i64", "scale": "fp32"}
            consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK,
                      "BV": feature_block(CASE_V, NARROW_BLOCK), "GATE": gate}
            if gate == GATE_NONE:
                consts["gc"] = None
            else:
                shared["gc"] = f32
            register_default(
                linear_attn_chunk_bwd_dv_kernel, f"{dtype},g={gate_name}",
                {**shared, "dv": inp, **({"A": f32} if per_key else {})},
                {**consts, "BK": feature_block(CASE_K), **({} if per_key else {"A": None})},
            )
            dqk_types = {**shared, "v": inp, "hs": inp, "dq": f32 if per_key else inp, "dk": f32 if per_key else inp}
            dqk_consts = {**consts, "BK": feature_block(CASE_K, NARROW_BLOCK)}
            if per_key:
                dqk_types["dA"] = f32
            else:
                dqk_consts["dA"] = None
            if gate == GATE_SCALAR:
                dqk_types["x"] = f32
            else:
                dqk_consts["x"] = None
            register_default(linear_attn_chunk_bwd_dqk_kernel, f"{dtype},g={gate_name}", dqk_types, dqk_consts)


_register_compile_cases()
