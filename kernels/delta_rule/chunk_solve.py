"""The chunked `delta_rule`'s triangular system: A = (I + M)^-1 per chunk, M = StrictTril(diag(beta) (K K^T * Gamma)).

One program per (chunk, head) builds M and inverts I + M in registers, as 16 x 16 blocks (BT = 16, 32 or 64:
NB = BT / 16 blocks a side). With L = I + M, X = L^-1 is block lower triangular:

    X_rr = L_rr^-1                                  (forward substitution, row after row: diagonal blocks)
    X_rc = -X_rr sum_{c <= m < r} L_rm X_mc          (r > c: the off-diagonal blocks, from smaller ones)

The blocks of M come straight from 16-row blocks of K (one [16, BK] x [BK, 16] dot per block pair and K
block), so no [BT, BT] tile is ever sliced. Gamma_ij = exp(b_i - b_j) is taken for j < i only (the exponent
masked before the exp), so every exponent is <= 0. The inverse's products run in true fp32 ("ieee"): the
errors of a triangular inverse grow with its condition number, and TF32's 10-bit mantissa would be the
weakest link. A is stored in full rows: the blocks above the diagonal (and columns past a partial chunk's
end, which lie above it) are written as zeros.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import GATE_NAMES, GATE_SCALAR, MAX_CHUNK, ChunkLayout, feature_block

# Key block of the K K^T dots, beside the ten [16, 16] fp32 accumulators of BT = 64: BK = 64 takes up to
# 254 registers (fp32 inputs, sm_80), at the edge of spilling; 32 takes <= 176 on sm_80 and sm_90.
KEY_BLOCK = 32


@triton.jit
def _rows(x, first, length, r, i_h, o_d, m_d, H: tl.constexpr, D: tl.constexpr):
    """Rows 16 r .. 16 r + 15 of the chunk from x [B * T, H, D], columns o_d: [16, BD] (0 past the chunk's end)."""
    o_t = r * 16 + tl.arange(0, 16)
    mask = (o_t < length)[:, None] & m_d[None, :]
    return tl.load(x + ((first + o_t) * H + i_h)[:, None] * D + o_d[None, :], mask=mask, other=0)


@triton.jit
def _scalars(x, first, length, r, i_h, H: tl.constexpr):
    """Per-token scalars (beta or b) of rows 16 r .. 16 r + 15 from x [B * T, H]: fp32 [16] (0 past the end)."""
    o_t = r * 16 + tl.arange(0, 16)
    return tl.load(x + (first + o_t) * H + i_h, mask=o_t < length, other=0).to(tl.float32)


@triton.jit
def _m_block(kk, beta, gc, first, length, r, c, i_h, H: tl.constexpr, GATE: tl.constexpr):
    """Block (r, c) of M from its K K^T block: beta_i kk_ij exp(b_i - b_j) for j < i, rows inside the chunk."""
    o_s = tl.arange(0, 16)
    o_t = r * 16 + o_s
    keep = (o_t[:, None] > (c * 16 + o_s)[None, :]) & (o_t < length)[:, None]  # [16, 16]
    m = kk * _scalars(beta, first, length, r, i_h, H)[:, None]
    if GATE == 1:
        b_r = _scalars(gc, first, length, r, i_h, H)
        b_c = _scalars(gc, first, length, c, i_h, H)
        m *= tl.exp(tl.where(keep, b_r[:, None] - b_c[None, :], float("-inf")))
    return tl.where(keep, m, 0)


@triton.jit
def _invert_unit_lower(m):
    """(I + m)^-1 for a strictly lower m [16, 16]: X = I - m X row after row, X's strict part kept in x."""
    o_s = tl.arange(0, 16)
    x = -m  # rows 0 and 1 are final: X_1 = e_1 - m_10 e_0
    for i in range(2, 16):
        row = o_s[:, None] == i
        a = -tl.sum(tl.where(row, m, 0), 0)  # [16]: -m_i, zero from column i on
        a += tl.sum(a[:, None] * x, 0)  # - sum_{j < i} m_ij x_j: rows j >= i meet a_j = 0
        x = tl.where(row, a[None, :], x)
    return x + (o_s[:, None] == o_s[None, :]).to(tl.float32)


@triton.jit
def _mm(a, b):
    """[16, 16] @ [16, 16] in true fp32 (see the module docstring)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _store_block(A, x, first, length, r, c, i_h, H: tl.constexpr, BT: tl.constexpr):
    """x [16, 16] into block (r, c) of the chunk's rows of A [B * T, H, BT], rows inside the chunk only."""
    o_s = tl.arange(0, 16)
    o_t = r * 16 + o_s
    tl.store(A + ((first + o_t) * H + i_h)[:, None] * BT + (c * 16 + o_s)[None, :], x, mask=(o_t < length)[:, None])


@autotune(CONFIGS, key=["H", "K", "BT", "BK", "GATE"])
@triton.jit
def delta_rule_chunk_solve_kernel(
    k,  # [B * T, H, K]
    beta,  # [B * T, H]
    gc,  # [B * T, H] fp32 chunk-local cumsum of g, or None
    A,  # [B * T, H, BT] fp32: (I + M)^-1, row by row
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    GATE: tl.constexpr,
):
    tl.static_assert(BT == 16 or BT == 32 or BT == 64, "the chunk must be 16, 32 or 64 tokens")
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if length <= 0:
        return
    DT = k.dtype.element_ty
    # K K^T blocks (r, c), r >= c, for the NB blocks a side: [16, 16] fp32 each
    zero = tl.zeros([16, 16], dtype=tl.float32)
    kk00, kk10, kk11 = zero, zero, zero
    kk20, kk21, kk22 = zero, zero, zero
    kk30, kk31, kk32, kk33 = zero, zero, zero, zero
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        k0 = _rows(k, first, length, 0, i_h, o_k, m_k, H, K).to(DT)  # [16, BK]
        kk00 += tl.dot(k0, tl.trans(k0))
        if BT >= 32:
            k1 = _rows(k, first, length, 1, i_h, o_k, m_k, H, K).to(DT)
            kk10 += tl.dot(k1, tl.trans(k0))
            kk11 += tl.dot(k1, tl.trans(k1))
        if BT == 64:
            k2 = _rows(k, first, length, 2, i_h, o_k, m_k, H, K).to(DT)
            k3 = _rows(k, first, length, 3, i_h, o_k, m_k, H, K).to(DT)
            kk20 += tl.dot(k2, tl.trans(k0))
            kk21 += tl.dot(k2, tl.trans(k1))
            kk22 += tl.dot(k2, tl.trans(k2))
            kk30 += tl.dot(k3, tl.trans(k0))
            kk31 += tl.dot(k3, tl.trans(k1))
            kk32 += tl.dot(k3, tl.trans(k2))
            kk33 += tl.dot(k3, tl.trans(k3))
    # the zero blocks above the diagonal, in one masked store
    o_t = tl.arange(0, BT)
    upper = (o_t[None, :] // 16 > o_t[:, None] // 16) & (o_t < length)[:, None]  # [BT, BT]
    p_A = A + ((first + o_t) * H + i_h)[:, None] * BT + o_t[None, :]
    tl.store(p_A, tl.zeros([BT, BT], dtype=tl.float32), mask=upper)

    x00 = _invert_unit_lower(_m_block(kk00, beta, gc, first, length, 0, 0, i_h, H, GATE))
    _store_block(A, x00, first, length, 0, 0, i_h, H, BT)
    if BT >= 32:
        m10 = _m_block(kk10, beta, gc, first, length, 1, 0, i_h, H, GATE)
        x11 = _invert_unit_lower(_m_block(kk11, beta, gc, first, length, 1, 1, i_h, H, GATE))
        x10 = -_mm(x11, _mm(m10, x00))
        _store_block(A, x10, first, length, 1, 0, i_h, H, BT)
        _store_block(A, x11, first, length, 1, 1, i_h, H, BT)
    if BT == 64:
        m20 = _m_block(kk20, beta, gc, first, length, 2, 0, i_h, H, GATE)
        m21 = _m_block(kk21, beta, gc, first, length, 2, 1, i_h, H, GATE)
        m30 = _m_block(kk30, beta, gc, first, length, 3, 0, i_h, H, GATE)
        m31 = _m_block(kk31, beta, gc, first, length, 3, 1, i_h, H, GATE)
        m32 = _m_block(kk32, beta, gc, first, length, 3, 2, i_h, H, GATE)
        x22 = _invert_unit_lower(_m_block(kk22, beta, gc, first, length, 2, 2, i_h, H, GATE))
        x33 = _invert_unit_lower(_m_block(kk33, beta, gc, first, length, 3, 3, i_h, H, GATE))
        x20 = -_mm(x22, _mm(m20, x00) + _mm(m21, x10))
        x21 = -_mm(x22, _mm(m21, x11))
        x30 = -_mm(x33, _mm(m30, x00) + _mm(m31, x10) + _mm(m32, x20))
        x31 = -_mm(x33, _mm(m31, x11) + _mm(m32, x21))
        x32 = -_mm(x33, _mm(m32, x22))
        _store_block(A, x20, first, length, 2, 0, i_h, H, BT)
        _store_block(A, x21, first, length, 2, 1, i_h, H, BT)
        _store_block(A, x22, first, length, 2, 2, i_h, H, BT)
        _store_block(A, x30, first, length, 3, 0, i_h, H, BT)
        _store_block(A, x31, first, length, 3, 1, i_h, H, BT)
        _store_block(A, x32, first, length, 3, 2, i_h, H, BT)
        _store_block(A, x33, first, length, 3, 3, i_h, H, BT)


def delta_rule_chunk_solve(k, beta, gc, layout: ChunkLayout) -> torch.Tensor:
    """A [B, T, H, BT] fp32: each token's row of its chunk's (I + M)^-1 (k, beta contiguous; gc fp32 or None)."""
    B, T, H, K = k.shape
    A = torch.empty(B, T, H, layout.BT, device=k.device, dtype=torch.float32)
    delta_rule_chunk_solve_kernel[(layout.NT, H)](
        k, beta, gc, A, layout.chunk_spans,
        H=H, K=K, BT=layout.BT, BK=feature_block(K, KEY_BLOCK), GATE=GATE_SCALAR if gc is not None else 0,
    )
    return A


def _register_compile_cases():
    consts = {"H": CASE_HEADS, "K": CASE_K, "BT": MAX_CHUNK, "BK": feature_block(CASE_K, KEY_BLOCK)}
    for dtype in ("bf16", "fp32"):
        for gate in (0, GATE_SCALAR):
            types = {"k": f"*{dtype}", "beta": f"*{dtype}", "A": "*fp32", "chunk_spans": "*i64"}
            gated = {"gc": "*fp32"} if gate else {}
            register_default(
                delta_rule_chunk_solve_kernel, f"{dtype},g={GATE_NAMES[gate]}",
                {**types, **gated}, {**consts, "GATE": gate, **({} if gate else {"gc": None})},
            )


_register_compile_cases()
