"""Chunked backward of `delta_rule` (WY form): the `chunk_bwd` launcher.

Four kernels, on what the forward saved (`chunk_saved.py`), following the torch backward of
`ipl_layers/ops/delta_rule_chunk.py`:

1. chunk_bwd_state.py, per chunk: P^T do, the state-free part of dv_new.
2. chunk_bwd_state.py, per (V block, sequence, head): the reverse scan of the state gradient, which
   finishes dv_new and stores each chunk's end-state gradient and dh0.
3. chunk_bwd_dqk.py, per (K block, chunk, head): dq, the state and P terms of dk, dw and their share of dg.
4. chunk_bwd_wy.py, per (chunk, head): the solve's gradient through the saved inverse A, then dv, dbeta,
   the rest of dk and dg.

dg needs no scan over the sequence: b is g's chunk-local cumsum, so dg is a reverse cumsum of b's
gradient inside each chunk, every term of which is formed cancellation-free (see chunk_bwd_dqk.py).
"""

from typing import Optional

import torch

from ipl_layers.kernels.delta_rule.chunk_bwd_dqk import delta_rule_chunk_bwd_dqk
from ipl_layers.kernels.delta_rule.chunk_bwd_state import delta_rule_chunk_bwd_dstate
from ipl_layers.kernels.delta_rule.chunk_bwd_wy import delta_rule_chunk_bwd_wy
from ipl_layers.kernels.delta_rule.chunk_saved import DeltaRuleChunkSaved
from ipl_layers.kernels.delta_rule.chunk_state import MAX_KEY_DIM


def _check_saved(saved: DeltaRuleChunkSaved, B: int, T: int, H: int, K: int, V: int, gated: bool):
    """The saved tensors have the contract's shapes for these inputs (a forward of other inputs, or of
    another chunk size, would otherwise be read out of bounds)."""
    BT, NT = saved.layout.BT, saved.layout.NT
    expected = {"A": (B, T, H, BT), "w": (B, T, H, K), "u": (B, T, H, V), "hs": (NT, H, K, V), "v_new": (B, T, H, V)}
    if gated:
        expected["gc"] = (B, T, H)
    for name, shape in expected.items():
        x = getattr(saved, name)
        if x is None or tuple(x.shape) != shape or x.dtype != torch.float32:
            got = "None" if x is None else f"{x.dtype} {list(x.shape)}"
            raise ValueError(f"saved.{name}: expected float32 {list(shape)}, got {got}")
    if not gated and saved.gc is not None:
        raise ValueError("saved.gc: expected None without g (the forward ran with a decay)")


def chunk_bwd(
    q: torch.Tensor,  # [B, T, H, K]
    k: torch.Tensor,  # [B, T, H, K]
    v: torch.Tensor,  # [B, T, H, V]
    beta: torch.Tensor,  # [B, T, H]
    g: Optional[torch.Tensor],  # [B, T, H] log-decay, or None
    scale: float,
    initial_state: Optional[torch.Tensor],  # [N, H, K, V], or None
    cu_seqlens: Optional[torch.Tensor],  # [N + 1], or None
    do: torch.Tensor,  # [B, T, H, V]
    dht: Optional[torch.Tensor],  # [N, H, K, V] gradient of the final state, or None
    saved: DeltaRuleChunkSaved,
):
    """Returns dq, dk, dv, dbeta, dg (None without g), dh0 (None without initial_state), each in its input's dtype.

    `cu_seqlens` is already in `saved.layout` (the forward's); it is taken for the symmetry with the forward.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_KEY_DIM:
        raise ValueError(f"k: the chunked delta-rule kernels take a key dim K <= {MAX_KEY_DIM}, got K = {K}")
    _check_saved(saved, B, T, H, K, V, g is not None)
    if do.shape != v.shape:
        raise ValueError(f"do: expected the shape of the output {list(v.shape)}, got {list(do.shape)}")
    layout = saved.layout
    q, k, v, beta, do = (x.contiguous() for x in (q, k, v, beta, do))
    g = g.contiguous() if g is not None else None
    dht = dht.contiguous() if dht is not None else None
    gc = saved.gc.contiguous() if g is not None else None
    dvn, dhs, dh0 = delta_rule_chunk_bwd_dstate(
        q, k, saved.w.contiguous(), gc, do, dht, initial_state, layout, scale)
    dq, dkp, dw, x = delta_rule_chunk_bwd_dqk(
        q, k, gc, do, saved.v_new.contiguous(), dvn, saved.hs.contiguous(), dhs, layout, scale)
    dk, dv, dbeta, dg = delta_rule_chunk_bwd_wy(
        k, v, beta, g, gc, saved.A.contiguous(), saved.w.contiguous(), saved.u.contiguous(), dvn, dw, dkp, x, layout)
    return dq, dk, dv, dbeta, dg, dh0
