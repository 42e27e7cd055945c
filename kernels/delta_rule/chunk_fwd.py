"""Chunked forward of `delta_rule` (WY form): the `chunk_fwd` launcher and its output stage.

Pipeline (math in `ipl_layers/ops/delta_rule_chunk.py`, one kernel per stage, all chunks in parallel but
the scan):

    gc        chunk-local cumsum of g                          linear_attn_chunk_cumsum (shared)
    A         (I + StrictTril(diag(beta) (K K^T * Gamma)))^-1   chunk_solve.py
    w, u      A diag(beta) (K * exp(b)),  A diag(beta) V        chunk_wu.py
    hs, v_new state at each chunk start, v_new = u - w S0        chunk_state.py (sequential over chunks)
    o         scale ((Q * exp(b)) S0 + tril(Q K^T * Gamma) v_new)

The output stage is linear attention's with v_new in place of v: it runs `linear_attn_chunk_fwd_kernel`
(fp32 v_new and hs, cast to the input dtype for the dots), whose delta-rule signatures are registered here.
Everything the backward needs is returned in a `DeltaRuleChunkSaved` (see chunk_saved.py).
"""

import torch
import triton

from ipl_layers.kernels.delta_rule.chunk_saved import DeltaRuleChunkSaved
from ipl_layers.kernels.delta_rule.chunk_solve import delta_rule_chunk_solve
from ipl_layers.kernels.delta_rule.chunk_state import delta_rule_chunk_state
from ipl_layers.kernels.delta_rule.chunk_wu import delta_rule_chunk_wu
from ipl_layers.kernels.linear_attn.chunk_config import CASE_HEADS, CASE_K, CASE_V, register_default
from ipl_layers.kernels.linear_attn.chunk_cumsum import linear_attn_chunk_cumsum
from ipl_layers.kernels.linear_attn.chunk_fwd import linear_attn_chunk_fwd_kernel
from ipl_layers.kernels.linear_attn.chunk_layout import (
    GATE_NAMES, GATE_NONE, GATE_SCALAR, MAX_CHUNK, chunk_block, chunk_layout, feature_block,
)


def chunk_fwd(q, k, v, beta, g, scale, initial_state, cu_seqlens, output_final_state, chunk_size):
    """q, k [B, T, H, K], v [B, T, H, V], beta and g (or None) [B, T, H] -> (o, final, saved).

    o [B, T, H, V] in v.dtype; final: fp32 [N, H, K, V] or None; saved: `DeltaRuleChunkSaved` (fp32).
    The chunk length is chunk_size rounded up to a power of two within [16, 64] (`chunk_block`).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    layout = chunk_layout(B, T, cu_seqlens, chunk_block(chunk_size), q.device)
    gc = linear_attn_chunk_cumsum(g, layout) if g is not None else None  # [B, T, H] fp32
    h0 = initial_state.contiguous() if initial_state is not None else None
    A = delta_rule_chunk_solve(k, beta, gc, layout)  # [B, T, H, BT]
    w, u = delta_rule_chunk_wu(k, v, beta, gc, A, layout)  # [B, T, H, K], [B, T, H, V]
    hs, v_new, final = delta_rule_chunk_state(k, w, u, gc, h0, layout, output_final_state)
    o = torch.empty_like(v)
    BV = feature_block(V)
    linear_attn_chunk_fwd_kernel[(triton.cdiv(V, BV), layout.NT, H)](
        q, k, v_new, gc, None, hs, o, layout.chunk_spans, scale,
        H=H, K=K, V=V, BT=layout.BT, BK=feature_block(K), BV=BV,
        GATE=GATE_SCALAR if gc is not None else GATE_NONE,
    )
    saved = DeltaRuleChunkSaved(layout=layout, gc=gc, A=A, w=w, u=u, hs=hs, v_new=v_new)
    return o, final, saved


def _register_compile_cases():
    """The output kernel with the delta rule's operands: fp32 v_new and hs beside q, k and o in the input dtype."""
    consts = {"H": CASE_HEADS, "K": CASE_K, "V": CASE_V, "BT": MAX_CHUNK,
              "BK": feature_block(CASE_K), "BV": feature_block(CASE_V), "A": None}
    for dtype in ("bf16", "fp32"):
        inp = f"*{dtype}"
        for gate in (GATE_NONE, GATE_SCALAR):
            types = {"q": inp, "k": inp, "v": "*fp32", "hs": "*fp32", "o": inp, "chunk_spans": "*i64", "scale": "fp32"}
            gated = {"gc": "*fp32"} if gate else {}
            register_default(
                linear_attn_chunk_fwd_kernel, f"delta_rule,{dtype},g={GATE_NAMES[gate]}",
                {**types, **gated}, {**consts, "GATE": gate, **({} if gate else {"gc": None})},
            )


_register_compile_cases()
