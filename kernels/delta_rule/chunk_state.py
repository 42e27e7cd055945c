"""The chunked `delta_rule`'s sequential scan over chunks: start states hs, v_new and the final state.

Per chunk, with S0 its start state, b the chunk-local cumsum of g and b_last its value at the chunk's
last token (w, u from chunk_wu.py):

    v_new = u - w S0                                                 [BT, V]
    S_end = exp(b_last) S0 + (K * exp(b_last - b))^T v_new           [K, V]   (every exponent <= 0)

One program per (V block, sequence, head) carries its fp32 [K, BV] state column block across the
sequence's chunks: w S0 needs every key row of S0, so K is not split (K <= 128 keeps the block and the
[BT, K] operands in registers without spills). Chunk slots past the last sequence (spare slots of a
varlen layout) belong to no program and their hs rows stay unwritten: no kernel reads them.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CASE_V, CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import (
    GATE_NAMES, GATE_SCALAR, MAX_CHUNK, NARROW_BLOCK, ChunkLayout, feature_block,
)

MAX_KEY_DIM = 128  # the whole key dim is one block (see the module docstring)


def state_value_block(K: int, V: int) -> int:
    """V block of the scan: 32 up to K = 64, 16 beyond, so the [K, BV] state block stays at <= 2K fp32."""
    return feature_block(V, NARROW_BLOCK if K <= 64 else 16)


@autotune(CONFIGS, key=["H", "K", "V", "BT", "BK", "BV", "GATE"])
@triton.jit
def delta_rule_chunk_state_kernel(
    k,  # [B * T, H, K]
    w,  # [B * T, H, K] fp32
    u,  # [B * T, H, V] fp32
    gc,  # [B * T, H] fp32 chunk-local cumsum of g, or None
    h0,  # [N, H, K, V] or None
    hs,  # [NT, H, K, V] fp32: state at each chunk start
    v_new,  # [B * T, H, V] fp32
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
):
    tl.static_assert(BK >= K, "the scan holds the whole key dim in one block")
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
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if h0 is not None:
        state = tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0).to(tl.float32)
    for i in range(tl.cdiv(eos - bos, BT)):
        tok = bos + i * BT + o_t  # [BT]
        m_t = tok < eos
        row = tok * H + i_h
        m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
        tl.store(hs + ((c0 + i) * H + i_h) * K * V + o_kv, state, mask=m_kv)
        b_w = tl.load(w + row[:, None] * K + o_k[None, :], mask=m_tk, other=0)  # [BT, BK]
        b_u = tl.load(u + row[:, None] * V + o_v[None, :], mask=m_tv, other=0)  # [BT, BV]
        b_vn = b_u - tl.dot(b_w.to(DT), state.to(DT))  # [BT, BV]
        tl.store(v_new + row[:, None] * V + o_v[None, :], b_vn, mask=m_tv)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        if GATE == 1:
            last = tl.minimum(bos + i * BT + BT, eos) - 1
            b_g = tl.load(gc + row, mask=m_t, other=0)  # [BT]
            g_last = tl.load(gc + last * H + i_h)
            state *= tl.exp(g_last)
            b_k *= tl.exp(g_last - b_g)[:, None]  # rows past the end hold k = 0
        state += tl.dot(tl.trans(b_k.to(DT)), b_vn.to(DT))
    if ht is not None:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, state, mask=m_kv)


def delta_rule_chunk_state(k, w, u, gc, h0, layout: ChunkLayout, output_final_state: bool):
    """hs [NT, H, K, V], v_new [B, T, H, V] and the final state [N, H, K, V] (or None), all fp32."""
    H, K, V = k.shape[2], k.shape[3], u.shape[3]
    if K > MAX_KEY_DIM:
        raise ValueError(f"delta_rule chunked kernels: key head dim K = {K} > {MAX_KEY_DIM} is not supported")
    BV = state_value_block(K, V)
    hs = torch.empty(layout.NT, H, K, V, device=k.device, dtype=torch.float32)
    v_new = torch.empty_like(u)
    ht = torch.empty(layout.N, H, K, V, device=k.device, dtype=torch.float32) if output_final_state else None
    delta_rule_chunk_state_kernel[(triton.cdiv(V, BV), layout.N * H)](
        k, w, u, gc, h0, hs, v_new, ht, layout.seq_offsets, layout.chunk_offsets,
        H=H, K=K, V=V, BT=layout.BT, BK=feature_block(K, MAX_KEY_DIM), BV=BV,
        GATE=GATE_SCALAR if gc is not None else 0,
    )
    return hs, v_new, ht


def _register_compile_cases():
    consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK,
              "BK": feature_block(CASE_K, MAX_KEY_DIM), "BV": state_value_block(CASE_K, CASE_V)}
    offsets = {"seq_offsets": "*i64", "chunk_offsets": "*i64"}
    for dtype in ("bf16", "fp32"):
        for gate in (0, GATE_SCALAR):
            types = {"k": f"*{dtype}", "w": "*fp32", "u": "*fp32", "h0": "*fp32", "hs": "*fp32",
                     "v_new": "*fp32", "ht": "*fp32", **offsets}
            gated = {"gc": "*fp32"} if gate else {}
            register_default(
                delta_rule_chunk_state_kernel, f"{dtype},g={GATE_NAMES[gate]}",
                {**types, **gated}, {**consts, "GATE": gate, **({} if gate else {"gc": None})},
            )


_register_compile_cases()
