"""Intra-chunk kernels of the chunked `linear_attention` with a per-key decay (GLA).

Inside a chunk, with b the chunk-local cumsum of the log-decay g [BT, K],

    A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)     (j <= i)

does not factor into a (q * exp(b)) (k * exp(-b))^T product without overflow: exp(-b_jk) reaches
exp(BT * |g|). The chunk is split into sub-chunks of BC rows. For a block of rows I and columns J < I,
a reference point r = b at the row before sub-chunk I (so b_i <= r <= b_j, b non-increasing) gives

    A_IJ = (q_I * exp(b_I - r)) (k_J * exp(r - b_J))^T          both factors <= 1

and the diagonal blocks take exp(b_i - b_j) itself, masked to j <= i before the exp, in a
[BC, BC, BK] broadcast. The backward uses the same split for

    dq_i = sum_{j <= i} dA_ij k_j exp(b_i - b_j),      dk_j = sum_{i >= j} dA_ij q_i exp(b_i - b_j)

with r = b at the last row of sub-chunk I for the later blocks of dk_I.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import (
    CASE_HEADS, CASE_K, CONFIGS, register_default,
)
from ipl_layers.kernels.linear_attn.chunk_layout import (
    INTRA_KEY_BLOCK, MAX_CHUNK, SUB_CHUNK, ChunkLayout,
)


def intra_key_block(K: int) -> int:
    return min(INTRA_KEY_BLOCK, max(16, triton.next_power_of_2(K)))


@autotune(CONFIGS, key=["H", "K", "BT", "BC", "BK"])
@triton.jit
def linear_attn_chunk_intra_fwd_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    gc,  # [B * T, H, K] fp32 chunk-local cumsum
    A,  # [B * T, H, BT] fp32: row i of its chunk's A (zero for j > i)
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
):
    """One program per chunk, block (I, J) of sub-chunks and head."""
    NC: tl.constexpr = BT // BC
    i_c, i_ij, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_i, i_j = i_ij // NC, i_ij % NC
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if i_i * BC >= length:
        return
    DT = q.dtype.element_ty
    o_i = i_i * BC + tl.arange(0, BC)
    o_j = i_j * BC + tl.arange(0, BC)
    m_i, m_j = o_i < length, o_j < length
    row_i = (first + o_i) * H + i_h  # [BC] token-head rows of sub-chunk I
    row_j = (first + o_j) * H + i_h
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    if i_i > i_j:
        row_r = (first + i_i * BC - 1) * H + i_h  # the reference row, just before sub-chunk I
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_ik = m_i[:, None] & m_k[None, :]
            m_jk = m_j[:, None] & m_k[None, :]
            g_r = tl.load(gc + row_r * K + o_k, mask=m_k, other=0)  # [BK]
            b_q = tl.load(q + row_i[:, None] * K + o_k[None, :], mask=m_ik, other=0).to(tl.float32)
            b_gi = tl.load(gc + row_i[:, None] * K + o_k[None, :], mask=m_ik, other=0)
            b_k = tl.load(k + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0).to(tl.float32)
            b_gj = tl.load(gc + row_j[:, None] * K + o_k[None, :], mask=m_jk, other=0)
            b_qg = b_q * tl.exp(tl.where(m_i[:, None], b_gi - g_r[None, :], float("-inf")))
            b_kg = b_k * tl.exp(tl.where(m_j[:, None], g_r[None, :] - b_gj, float("-inf")))
            b_A += tl.dot(b_qg.to(DT), tl.trans(b_kg.to(DT)))
    elif i_i == i_j:
        causal = ((o_i[:, None] >= o_j[None, :]) & m_i[:, None])[:, :, None]  # [BC, BC, 1]
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_ik = m_i[:, None] & (o_k < K)[None, :]
            b_q = tl.load(q + row_i[:, None] * K + o_k[None, :], mask=m_ik, other=0).to(tl.float32)
            b_k = tl.load(k + row_i[:, None] * K + o_k[None, :], mask=m_ik, other=0).to(tl.float32)
            b_g = tl.load(gc + row_i[:, None] * K + o_k[None, :], mask=m_ik, other=0)
            decay = tl.exp(tl.where(causal, b_g[:, None, :] - b_g[None, :, :], float("-inf")))  # [BC, BC, BK]
            b_A += tl.sum(b_q[:, None, :] * b_k[None, :, :] * decay, axis=2)
    tl.store(A + row_i[:, None] * BT + o_j[None, :], b_A, mask=m_i[:, None])


@autotune(CONFIGS, key=["H", "K", "BT", "BC", "BK"])
@triton.jit
def linear_attn_chunk_intra_bwd_kernel(
    q,  # [B * T, H, K]
    k,  # [B * T, H, K]
    gc,  # [B * T, H, K] fp32 chunk-local cumsum
    dA,  # [B * T, H, BT] fp32: dA_ij = scale * dO_i . v_j (zero for j > i)
    dq_inter,  # [B * T, H, K] fp32: the inter-chunk part of dq
    dk_inter,  # [B * T, H, K] fp32: the inter-chunk part of dk
    dq,  # [B * T, H, K]
    dk,  # [B * T, H, K]
    x,  # [B * T, H, K] fp32: q * dq - k * dk, for the decay gradient
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
):
    """One program per K block, (chunk, sub-chunk I) and head: the rows of I in dq and dk."""
    NC: tl.constexpr = BT // BC
    i_k, i_ci, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_c, i_i = i_ci // NC, i_ci % NC
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if i_i * BC >= length:
        return
    DT = q.dtype.element_ty
    o_i = i_i * BC + tl.arange(0, BC)
    m_i = o_i < length
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_ik = m_i[:, None] & m_k[None, :]
    row_i = (first + o_i) * H + i_h  # [BC] token-head rows of sub-chunk I
    p_i = row_i[:, None] * K + o_k[None, :]  # [BC, BK]
    b_q = tl.load(q + p_i, mask=m_ik, other=0).to(tl.float32)
    b_k = tl.load(k + p_i, mask=m_ik, other=0).to(tl.float32)
    b_g = tl.load(gc + p_i, mask=m_ik, other=0)

    # dq_I from the earlier sub-chunks J < I, reference r = b before sub-chunk I (row 0 when I = 0,
    # where the loop is empty)
    row_r = (first + tl.maximum(i_i * BC - 1, 0)) * H + i_h
    g_r = tl.load(gc + row_r * K + o_k, mask=m_k, other=0)  # [BK]
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(0, i_i):
        o_j = i_j * BC + tl.arange(0, BC)
        m_jk = (o_j < length)[:, None] & m_k[None, :]
        p_j = ((first + o_j) * H + i_h)[:, None] * K + o_k[None, :]
        b_kj = tl.load(k + p_j, mask=m_jk, other=0).to(tl.float32)
        b_gj = tl.load(gc + p_j, mask=m_jk, other=0)
        b_dA = tl.load(dA + row_i[:, None] * BT + o_j[None, :], mask=m_i[:, None], other=0)  # [BC(i), BC(j)]
        b_kg = b_kj * tl.exp(tl.where(m_jk, g_r[None, :] - b_gj, float("-inf")))
        b_dq += tl.dot(b_dA.to(DT), b_kg.to(DT))
    b_dq *= tl.exp(tl.where(m_ik, b_g - g_r[None, :], float("-inf")))

    # dk_I from the later sub-chunks J > I, reference r = b at the last row of sub-chunk I
    row_l = (first + tl.minimum(i_i * BC + BC, length) - 1) * H + i_h
    g_l = tl.load(gc + row_l * K + o_k, mask=m_k, other=0)  # [BK]
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(i_i + 1, tl.cdiv(length, BC)):
        o_j = i_j * BC + tl.arange(0, BC)
        m_j = o_j < length
        m_jk = m_j[:, None] & m_k[None, :]
        row_j = (first + o_j) * H + i_h
        p_j = row_j[:, None] * K + o_k[None, :]
        b_qj = tl.load(q + p_j, mask=m_jk, other=0).to(tl.float32)
        b_gj = tl.load(gc + p_j, mask=m_jk, other=0)
        b_dA = tl.load(dA + row_j[:, None] * BT + o_i[None, :], mask=m_j[:, None], other=0)  # [BC(j), BC(i)]
        b_qg = b_qj * tl.exp(tl.where(m_jk, b_gj - g_l[None, :], float("-inf")))
        b_dk += tl.dot(tl.trans(b_dA).to(DT), b_qg.to(DT))
    b_dk *= tl.exp(tl.where(m_ik, g_l[None, :] - b_g, float("-inf")))

    # the diagonal block: rows i and columns j both in I, exp(b_i - b_j) masked to j < i; the pairs
    # j = i (exp(0) = 1) come after x, which leaves them out (see chunk_bwd.py)
    b_dA = tl.load(dA + row_i[:, None] * BT + o_i[None, :], mask=m_i[:, None], other=0)  # [BC(i), BC(j)]
    strict = ((o_i[:, None] > o_i[None, :]) & m_i[:, None])[:, :, None]  # [BC, BC, 1]
    decay = tl.exp(tl.where(strict, b_g[:, None, :] - b_g[None, :, :], float("-inf")))  # [BC, BC, BK]
    b_dq += tl.sum(b_dA[:, :, None] * b_k[None, :, :] * decay, axis=1)
    b_dk += tl.sum(b_dA[:, :, None] * b_q[:, None, :] * decay, axis=0)
    b_diag = tl.sum(tl.where(o_i[:, None] == o_i[None, :], b_dA, 0), axis=1)  # [BC]: dA_ii

    b_dq += tl.load(dq_inter + p_i, mask=m_ik, other=0)
    b_dk_inter = tl.load(dk_inter + p_i, mask=m_ik, other=0)
    # x also leaves out the pair (final state, last token of the sequence): that token's inter-chunk dk
    ends = tl.load(chunk_spans + 3 * i_c + 2)
    last_of_seq = ((o_i == length - 1) & (ends != 0))[:, None]
    tl.store(x + p_i, b_q * b_dq - b_k * (b_dk + tl.where(last_of_seq, 0, b_dk_inter)), mask=m_ik)
    b_dq += b_diag[:, None] * b_k
    b_dk += b_dk_inter + b_diag[:, None] * b_q
    tl.store(dq + p_i, b_dq.to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + p_i, b_dk.to(dk.dtype.element_ty), mask=m_ik)


def linear_attn_chunk_intra_fwd(q, k, gc, layout: ChunkLayout) -> torch.Tensor:
    """A [B * T, H, BT] fp32 (unscaled) for the per-key decay."""
    H, K = q.shape[2], q.shape[3]
    BT = layout.BT
    A = q.new_empty(q.shape[0] * q.shape[1], H, BT, dtype=torch.float32)
    grid = (layout.NT, (BT // SUB_CHUNK) ** 2, H)
    linear_attn_chunk_intra_fwd_kernel[grid](
        q, k, gc, A, layout.chunk_spans, H=H, K=K, BT=BT, BC=SUB_CHUNK, BK=intra_key_block(K),
    )
    return A


def linear_attn_chunk_intra_bwd(q, k, gc, dA, dq_inter, dk_inter, layout: ChunkLayout):
    """Full dq, dk (input dtype) and x = q * dq - k * dk (fp32) for the per-key decay."""
    H, K = q.shape[2], q.shape[3]
    BT, BK = layout.BT, intra_key_block(K)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    x = torch.empty_like(dq_inter)
    grid = (triton.cdiv(K, BK), layout.NT * (BT // SUB_CHUNK), H)
    linear_attn_chunk_intra_bwd_kernel[grid](
        q, k, gc, dA, dq_inter, dk_inter, dq, dk, x, layout.chunk_spans,
        H=H, K=K, BT=BT, BC=SUB_CHUNK, BK=BK,
    )
    return dq, dk, x


def _register_compile_cases():
    consts = {"H": CASE_HEADS, "K": CASE_K, "BT": MAX_CHUNK, "BC": SUB_CHUNK, "BK": intra_key_block(CASE_K)}
    f32 = "*fp32"
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        register_default(
            linear_attn_chunk_intra_fwd_kernel, f"{dtype},g=key",
            {"q": inp, "k": inp, "gc": f32, "A": f32, "chunk_spans": "*i64"}, consts,
        )
        register_default(
            linear_attn_chunk_intra_bwd_kernel, f"{dtype},g=key",
            {"q": inp, "k": inp, "gc": f32, "dA": f32, "dq_inter": f32, "dk_inter": f32,
             "dq": inp, "dk": inp, "x": f32, "chunk_spans": "*i64"}, consts,
        )


_register_compile_cases()
