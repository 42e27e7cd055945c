"""The chunked `delta_rule`'s state-free operands: w = A diag(beta) (K * exp(b)), u = A diag(beta) V per chunk.

A = (I + M)^-1 comes from chunk_solve.py. One program per (chunk, head) loads A once and runs over the K
and V blocks; every token is scaled by beta (and exp(b) <= 1, b the chunk-local cumsum of g) before the
dot. A enters the dots in the input dtype, as the other operands (tensor cores take one dtype); w and u
are stored fp32 for the state scan.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import GATE_NAMES, GATE_SCALAR, MAX_CHUNK, ChunkLayout, feature_block


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def delta_rule_chunk_wu_kernel(
    k,  # [B * T, H, K]
    v,  # [B * T, H, V]
    beta,  # [B * T, H]
    gc,  # [B * T, H] fp32 chunk-local cumsum of g, or None
    A,  # [B * T, H, BT] fp32
    w,  # [B * T, H, K] fp32
    u,  # [B * T, H, V] fp32
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
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
    b_A = tl.load(A + row[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0).to(DT)  # [BT, BT]
    b_beta = tl.load(beta + row, mask=m_t, other=0).to(tl.float32)  # [BT]
    b_kscale = b_beta
    if GATE == 1:
        b_kscale *= tl.exp(tl.load(gc + row, mask=m_t, other=0))  # beta exp(b), exp(b) <= 1
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_w = tl.dot(b_A, (b_k * b_kscale[:, None]).to(DT))
        tl.store(w + row[:, None] * K + o_k[None, :], b_w, mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)  # [BT, BV]
        b_u = tl.dot(b_A, (b_v * b_beta[:, None]).to(DT))
        tl.store(u + row[:, None] * V + o_v[None, :], b_u, mask=m_tv)


def delta_rule_chunk_wu(k, v, beta, gc, A, layout: ChunkLayout):
    """w [B, T, H, K] and u [B, T, H, V], fp32 (inputs contiguous; gc fp32 or None)."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    w = torch.empty(k.shape, device=k.device, dtype=torch.float32)
    u = torch.empty(v.shape, device=v.device, dtype=torch.float32)
    delta_rule_chunk_wu_kernel[(layout.NT, H)](
        k, v, beta, gc, A, w, u, layout.chunk_spans,
        H=H, K=K, V=V, BT=layout.BT, BK=feature_block(K), BV=feature_block(V),
        GATE=GATE_SCALAR if gc is not None else 0,
    )
    return w, u


def _register_compile_cases():
    consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK,
              "BK": feature_block(CASE_K), "BV": feature_block(CASE_V)}
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gate in (0, GATE_SCALAR):
            types = {"k": inp, "v": inp, "beta": inp, "A": "*fp32", "w": "*fp32", "u": "*fp32", "chunk_spans": "*i64"}
            gated = {"gc": "*fp32"} if gate else {}
            register_default(
                delta_rule_chunk_wu_kernel, f"{dtype},g={GATE_NAMES[gate]}",
                {**types, **gated}, {**consts, "GATE": gate, **({} if gate else {"gc": None})},
            )


_register_compile_cases()
