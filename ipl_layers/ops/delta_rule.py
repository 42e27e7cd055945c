"""`delta_rule`: DeltaNet and Gated DeltaNet, the fast-weight state learning by the delta rule.

Recurrence per sequence and head, with state S [K, V] and `k_t`, `q_t` row vectors:

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,        o_t = scale * q_t S_t

that is, with D_t = exp(g_t), S_t = D_t S_{t-1} + beta_t k_t^T (v_t - k_t D_t S_{t-1}): one SGD step of
learning rate beta_t on 1/2 ||k_t S - v_t||^2 from the decayed state. g None is DeltaNet (D_t = 1).

This module holds the token-by-token reference, the dispatching entry point and the two autograd
Functions (torch chunked path: `delta_rule_chunk.py`; Triton: `ipl_layers.kernels.delta_rule`).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers._checks import (
    check_cu_seqlens, check_positive_int, check_qkv, check_shape, check_tensor, sequence_spans,
)
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import delta_rule_chunk as chunk
from ipl_layers.ops.chunking import pad_sequences

BACKENDS = ("reference", "torch", "triton", "triton_chunk", "triton_recurrent")


def _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, chunk_size):
    B, T, H, K, V = check_qkv(q, k, v)
    check_tensor("beta", beta, 3, "B, T, H", like=q)
    check_shape("beta", beta, (B, T, H), "B, T, H")
    if g is not None:
        check_tensor("g", g, 3, "B, T, H", like=q)
        check_shape("g", g, (B, T, H), "B, T, H")
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "N, H, K, V", like=q)
        check_shape("initial_state", initial_state, (N, H, K, V), "N, H, K, V")
    check_positive_int("chunk_size", chunk_size)
    return N


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the head dim in the compute dtype (fp32, or float64 for float64 inputs)."""
    return F.normalize(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), dim=-1)


def delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token recurrence, written for clarity. Runs in float64 when given float64 inputs."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(sequence_spans(B, T, cu_seqlens)):
        S = torch.zeros(H, K, V, dtype=acc, device=q.device)  # [H, K, V]
        if initial_state is not None:
            S = initial_state[n].to(acc)
        rows = [torch.zeros(0, H, V, dtype=acc, device=q.device)]
        for t in range(start, end):
            qt, kt, vt = q[b, t].to(acc), k[b, t].to(acc), v[b, t].to(acc)  # [H, K], [H, K], [H, V]
            if g is not None:
                S = S * g[b, t].to(acc).exp()[:, None, None]
            error = vt - torch.einsum("hk,hkv->hv", kt, S)  # [H, V]: v_t - k_t D_t S_{t-1}
            S = S + beta[b, t].to(acc)[:, None, None] * kt[:, :, None] * error[:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", qt, S)[None])  # [1, H, V]
        outputs.append(torch.cat(rows))  # [T_n, H, V]
        finals.append(S)
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    final = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final


class DeltaRuleChunkFunction(torch.autograd.Function):
    """Torch chunked path on padded sequences [N, Tp, H, *] (Tp a multiple of the chunk size)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, chunk_size, output_final_state):
        o, saved, final = chunk.chunk_forward(q, k, v, beta, g, initial_state, scale, chunk_size)
        ctx.chunk_saved = saved  # intermediates (operands, start states, v_new), not inputs
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.dtypes = [None if x is None else x.dtype for x in (q, k, v, beta, g, initial_state)]
        return o, (final if output_final_state else None)

    @staticmethod
    def backward(ctx, do, dht):
        grads = chunk.chunk_backward(ctx.chunk_saved, do, dht, ctx.scale, ctx.chunk_size, ctx.dtypes)
        del ctx.chunk_saved
        return (*grads, None, None, None)


class DeltaRuleTritonFunction(torch.autograd.Function):
    """Triton path: the chunked kernels (WY form), or the fused recurrent kernels (`recurrent=True`)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, cu_seqlens, scale, chunk_size, output_final_state, recurrent):
        saved = None
        if recurrent:
            from ipl_layers.kernels.delta_rule.fused_recurrent import fused_recurrent_fwd

            o, final = fused_recurrent_fwd(q, k, v, beta, g, scale, initial_state, cu_seqlens, output_final_state)
        else:
            from ipl_layers.kernels.delta_rule.chunk_fwd import chunk_fwd

            o, final, saved = chunk_fwd(
                q, k, v, beta, g, scale, initial_state, cu_seqlens, output_final_state, chunk_size
            )
        ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
        # the chunk intermediates (A, w, u, hs, v_new: fp32) are held only when a gradient will be asked for
        ctx.chunk_saved = saved if any(ctx.needs_input_grad) else None
        ctx.scale, ctx.recurrent = scale, recurrent
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, initial_state, cu_seqlens = ctx.saved_tensors
        if ctx.recurrent:
            from ipl_layers.kernels.delta_rule.fused_recurrent import fused_recurrent_bwd

            grads = fused_recurrent_bwd(q, k, v, beta, g, ctx.scale, initial_state, cu_seqlens, do, dht)
        else:
            from ipl_layers.kernels.delta_rule.chunk_bwd import chunk_bwd

            grads = chunk_bwd(q, k, v, beta, g, ctx.scale, initial_state, cu_seqlens, do, dht, ctx.chunk_saved)
            del ctx.chunk_saved
        return (*grads, None, None, None, None, None)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    update_state_in_place: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The delta rule (DeltaNet), with optional scalar log-decay `g` (Gated DeltaNet).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] learning rates (usually in (0, 1); with
            unit keys, beta in [0, 2] keeps the state bounded); g: None or [B, T, H] log-decay (<= 0).
        scale: defaults to K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or the number of sequences with `cu_seqlens`).
        output_final_state: also return the state after the last token, fp32 [N, H, K, V].
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        use_qk_l2norm: L2-normalise q and k over K inside the op (differentiably), in fp32 (the Triton
            backends then take them back to q's dtype).
        chunk_size: chunk length of the chunked paths (the Triton kernels round it up to a power of two
            within [16, 64]).
        update_state_in_place: when the call is a fused C++ decoding step (below) and initial_state is fp32 and
            contiguous, write the new state over it (the returned state is initial_state itself) instead of
            allocating one: a cache's own state, decoded token after token. Otherwise initial_state is unchanged.
        backend: "torch" (chunked, the CPU path), "triton" (chunked kernels, or the fused recurrent kernel
            when T < chunk_size), "triton_chunk", "triton_recurrent", or "reference".
            Default: `IPL_BACKEND`, else "triton" on CUDA and "torch" elsewhere.

    Returns:
        o: [B, T, H, V] in the dtype of v; final_state: fp32 [N, H, K, V] (float64 for float64 inputs on the torch
            and reference paths) or None.
    """
    _check_inputs(q, k, v, beta, g, initial_state, cu_seqlens, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_backend("delta_rule", backend, q.device, BACKENDS)
    if name == "reference":
        return delta_rule_reference(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
        )
    if name != "torch":
        if use_qk_l2norm:  # back in the input dtype: the kernels' dots take one dtype for q, k and v
            q, k = _l2norm(q).to(q.dtype), _l2norm(k).to(k.dtype)
        recurrent = name == "triton_recurrent" or (name == "triton" and q.shape[1] < chunk_size)
        return DeltaRuleTritonFunction.apply(
            q, k, v, beta, g, initial_state, cu_seqlens, scale, chunk_size, output_final_state, recurrent
        )
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    if _ext.step_applies(q, initial_state, cu_seqlens, k, v, beta, g):
        in_place = update_state_in_place and _ext.in_place_applies([initial_state])
        o, final = _ext.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0],
                                        initial_state.float(), scale, in_place)
        return o[:, None].to(v.dtype), (final if output_final_state else None)
    (qp, kp, vp, betap, gp), unpad = pad_sequences([q, k, v, beta, g], cu_seqlens, chunk_size)  # beta 0: no update
    inputs = (qp, kp, vp, betap, gp, initial_state)
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)):
        # inference: nothing to save for a backward, so the working set is bounded by segments
        o, final = chunk.chunk_forward_segmented(*inputs, scale, chunk_size)
        return unpad(o), (final if output_final_state else None)
    o, final = DeltaRuleChunkFunction.apply(*inputs, scale, chunk_size, output_final_state)
    return unpad(o), final
