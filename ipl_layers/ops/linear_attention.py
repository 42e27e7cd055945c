"""`linear_attention`: the linear-attention scan family (linear attention, RetNet/Mamba2-SSD/simple GLA, GLA).

Recurrence per sequence and head, with state S [K, V] and `k_t`, `q_t` row vectors:

    S_t = D_t S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

    D_t = I                 g is None
    D_t = exp(g_t) I        g: [B, T, H]     scalar log-decay (RetNet, Mamba2-SSD, simple GLA)
    D_t = diag(exp(g_t))    g: [B, T, H, K]  per-key-channel log-decay (GLA)

This module holds the token-by-token reference, the dispatching entry point and the two autograd
Functions (torch chunked path: `linear_attention_chunk.py`; Triton: `ipl_layers.kernels.linear_attn`).
"""

from typing import Optional, Tuple

import torch

from ipl_layers import _ext
from ipl_layers._checks import (
    check_cu_seqlens, check_positive_int, check_qkv, check_shape, check_tensor, sequence_spans,
)
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import linear_attention_chunk as chunk
from ipl_layers.ops.chunking import pad_sequences

BACKENDS = ("reference", "torch", "triton", "triton_chunk", "triton_recurrent")


def _check_inputs(q, k, v, g, initial_state, cu_seqlens, chunk_size):
    B, T, H, K, V = check_qkv(q, k, v)
    if g is not None:
        if not isinstance(g, torch.Tensor) or g.dim() not in (3, 4):
            got = f"shape {list(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"g: expected [B, T, H] (scalar log-decay) or [B, T, H, K] (per-key), got {got}")
        check_tensor("g", g, g.dim(), "B, T, H, *", like=q)
        expected = (B, T, H) if g.dim() == 3 else (B, T, H, K)
        check_shape("g", g, expected, "B, T, H" if g.dim() == 3 else "B, T, H, K")
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "N, H, K, V", like=q)
        check_shape("initial_state", initial_state, (N, H, K, V), "N, H, K, V")
    check_positive_int("chunk_size", chunk_size)
    return N


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token recurrence, written for clarity. Runs in float64 when given float64 inputs."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(sequence_spans(B, T, cu_seqlens)):
        S = torch.zeros(H, K, V, dtype=acc, device=q.device)  # [H, K, V]
        if initial_state is not None:
            S = initial_state[n].to(acc)
        rows = [torch.zeros(0, H, V, dtype=acc, device=q.device)]
        for t in range(start, end):
            qt, kt, vt = q[b, t].to(acc), k[b, t].to(acc), v[b, t].to(acc)  # [H, K], [H, K], [H, V]
            if g is not None:
                decay = g[b, t].to(acc).exp()  # [H] or [H, K]
                S = S * (decay[:, None, None] if g.dim() == 3 else decay[:, :, None])
            S = S + kt[:, :, None] * vt[:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", qt, S)[None])  # [1, H, V]
        outputs.append(torch.cat(rows))  # [T_n, H, V]
        finals.append(S)
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    final = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final


class LinearAttentionChunkFunction(torch.autograd.Function):
    """Torch chunked path on padded sequences [N, Tp, H, *] (Tp a multiple of the chunk size)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, output_final_state):
        o, saved, final = chunk.chunk_forward(q, k, v, g, initial_state, scale, chunk_size)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.chunk_saved = saved  # intermediates (states, A, the factored operands), not inputs
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = chunk.chunk_backward(
            q, k, v, g, initial_state, ctx.chunk_saved, do, dht, ctx.scale, ctx.chunk_size
        )
        del ctx.chunk_saved
        return dq, dk, dv, dg, dh0, None, None, None


class LinearAttentionTritonFunction(torch.autograd.Function):
    """Triton path: chunked kernels, or the fused recurrent kernels (`recurrent=True`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, cu_seqlens, scale, chunk_size, output_final_state, recurrent):
        from ipl_layers.kernels import linear_attn as kern

        fwd = kern.fused_recurrent_fwd if recurrent else kern.chunk_fwd
        o, final = fwd(q, k, v, g, scale, initial_state, cu_seqlens, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
        ctx.scale, ctx.chunk_size, ctx.recurrent = scale, chunk_size, recurrent
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        from ipl_layers.kernels import linear_attn as kern

        q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
        bwd = kern.fused_recurrent_bwd if ctx.recurrent else kern.chunk_bwd
        dq, dk, dv, dg, dh0 = bwd(q, k, v, g, ctx.scale, initial_state, cu_seqlens, do, dht, ctx.chunk_size)
        return dq, dk, dv, dg, dh0, None, None, None, None, None


def _linear_attention_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    (qp, kp, vp, gp), unpad = pad_sequences([q, k, v, g], cu_seqlens, chunk_size)
    o, final = LinearAttentionChunkFunction.apply(qp, kp, vp, gp, initial_state, scale, chunk_size, output_final_state)
    return unpad(o), final


def _linear_attention_cpu_step(q, k, v, g, scale, initial_state, output_final_state, in_place):
    step_g = None if g is None else g[:, 0]  # [B, H] or [B, H, K]
    in_place = in_place and _ext.in_place_applies([initial_state])
    o, final = _ext.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], step_g, initial_state.float(), scale, in_place)
    return o[:, None].to(v.dtype), (final if output_final_state else None)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    update_state_in_place: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Linear attention with optional scalar or per-key log-decay `g`.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g: None, [B, T, H] or [B, T, H, K] log-decay (<= 0).
        scale: defaults to K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or the number of sequences with `cu_seqlens`).
        output_final_state: also return the state after the last token, fp32 [N, H, K, V].
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        chunk_size: chunk length of the chunked paths.
        update_state_in_place: when the call is a fused C++ decoding step (below) and initial_state is fp32 and
            contiguous, write the new state over it (the returned state is initial_state itself) instead of
            allocating one: a cache's own state, decoded token after token. Otherwise initial_state is unchanged.
        backend: "torch" (chunked, the CPU path; a single decoding step without autograd runs the C++
            extension's fused step when it is built), "triton" (chunked kernels, or the fused recurrent
            kernel when T < chunk_size), "triton_chunk", "triton_recurrent", or "reference".
            Default: `IPL_BACKEND`, else "triton" on CUDA and "torch" elsewhere.

    Returns:
        o: [B, T, H, V] in the dtype of v; final_state: fp32 [N, H, K, V] or None.
    """
    _check_inputs(q, k, v, g, initial_state, cu_seqlens, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_backend("linear_attention", backend, q.device, BACKENDS)
    if name == "reference":
        return linear_attention_reference(
            q, k, v, g, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    if name == "torch":
        if _ext.step_applies(q, initial_state, cu_seqlens, k, v, g):
            return _linear_attention_cpu_step(q, k, v, g, scale, initial_state, output_final_state,
                                              update_state_in_place)
        return _linear_attention_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)
    recurrent = name == "triton_recurrent" or (name == "triton" and q.shape[1] < chunk_size)
    return LinearAttentionTritonFunction.apply(
        q, k, v, g, initial_state, cu_seqlens, scale, chunk_size, output_final_state, recurrent
    )
