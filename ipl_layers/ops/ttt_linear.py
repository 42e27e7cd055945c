"""`ttt_linear`: TTT-Linear (Sun et al. 2024), a linear inner model trained by mini-batch gradient descent.

Per sequence and head, the hidden state is an inner model f(x) = x + LN(x W + b) (W [K, K], b [K], LN
over the K features with per-head gamma/beta, eps 1e-6), trained on l_t = 1/2 ||LN(k_t W + b) - (v_t - k_t)||^2.
Inside a mini-batch of b tokens (positions i, j = 1..b) every gradient G_j = dl_j/dz_j (z_j = k_j W0 + b0)
is taken at the mini-batch's start weights W0, b0:

    W_i = W0 - s_i sum_{j<=i} eta_j k_j^T G_j,   b_i = b0 - s_i sum_{j<=i} eta_j G_j,   o_i = q_i + LN(q_i W_i + b_i)

and the next mini-batch starts from the last position's weights. Without the residual the target is v_t
and the output LN(q_i W_i + b_i); without LN the inner map is x W + b; without bias b = 0, never updated.

This module holds the token-by-token reference, the input checks, the dispatching entry point and the
Triton path's autograd Function (torch path: dual form per mini-batch with a hand-written backward,
`ttt_linear_chunk.py` / `ttt_linear_chunk_bwd.py`; Triton: `ipl_layers.kernels.ttt`).
"""

from typing import Optional, Sequence, Tuple, Union

import torch

from ipl_layers import _ext
from ipl_layers._checks import (
    check_cu_seqlens, check_positive_int, check_qkv, check_shape, check_tensor, sequence_spans,
)
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import ttt_linear_chunk as chunk
from ipl_layers.ops.chunking import pad_sequences
from ipl_layers.state import TTTLinearState

BACKENDS = ("reference", "torch", "triton")

InitialState = Union[TTTLinearState, Sequence[Optional[torch.Tensor]]]


def as_state(initial_state, N: int, H: int, K: int, like: torch.Tensor) -> Optional[TTTLinearState]:
    """None, a tuple (W, b or None) of weights at a mini-batch boundary, or a `TTTLinearState` (or the plain
    5-tuple a cache round trip makes of one) -> a checked `TTTLinearState` (None stays None; at a boundary its
    sums and position are None)."""
    if initial_state is None:
        return None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) not in (2, 5):
        raise TypeError("initial_state: expected a TTTLinearState or a tuple (W [N, H, K, K], b [N, H, K] or None), "
                        f"got {type(initial_state).__name__}")
    W0, b0 = initial_state[:2]
    check_tensor("initial_state W", W0, 4, "N, H, K, K", like=like)
    check_shape("initial_state W", W0, (N, H, K, K), "N, H, K, K")
    if b0 is not None:
        check_tensor("initial_state b", b0, 3, "N, H, K", like=like)
        check_shape("initial_state b", b0, (N, H, K), "N, H, K")
    if len(initial_state) == 2 or all(x is None for x in initial_state[2:]):  # at a mini-batch boundary
        return TTTLinearState(W0, b0, None, None, None)
    _, _, sum_W, sum_b, position = initial_state
    check_tensor("initial_state sum_W", sum_W, 4, "N, H, K, K", like=like)
    check_shape("initial_state sum_W", sum_W, (N, H, K, K), "N, H, K, K")
    check_tensor("initial_state sum_b", sum_b, 3, "N, H, K", like=like)
    check_shape("initial_state sum_b", sum_b, (N, H, K), "N, H, K")
    if not isinstance(position, torch.Tensor) or position.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"initial_state position: expected an int32/int64 tensor [N], got {position!r}")
    check_shape("initial_state position", position, (N,), "N")
    return TTTLinearState(W0, b0, sum_W, sum_b, position.to(device=like.device, dtype=torch.long))


def check_common(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, cu_seqlens) -> int:
    """Checks the arguments the TTT ops share (q, k, v [B, T, H, K], eta, the LN parameters, the position
    scales, the mini-batch size, cu_seqlens); returns the number of sequences N."""
    B, T, H, K, _ = check_qkv(q, k, v, same_kv=True)
    check_tensor("eta", eta, 3, "B, T, H", like=q)
    check_shape("eta", eta, (B, T, H), "B, T, H")
    for name, x in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if x is not None:
            check_tensor(name, x, 2, "H, K", like=q)
            check_shape(name, x, (H, K), "H, K")
    check_positive_int("mini_batch_size", mini_batch_size)
    if token_scale is not None:
        per_head = isinstance(token_scale, torch.Tensor) and token_scale.dim() != 1
        shape, dims = ((H, mini_batch_size), "H, b") if per_head else ((mini_batch_size,), "b")
        check_tensor("token_scale", token_scale, len(shape), dims, like=q)
        check_shape("token_scale", token_scale, shape, dims)
    return check_cu_seqlens(cu_seqlens, B, T, q.device)


def check_position(position: Optional[torch.Tensor], mini_batch_size: int):
    """An open mini-batch's position must lie in [0, mini_batch_size)."""
    if position is not None and bool(((position < 0) | (position >= mini_batch_size)).any()):
        raise ValueError(f"initial_state position: expected values in [0, mini_batch_size = {mini_batch_size}), "
                         f"got {position.tolist()}")


def _check_inputs(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state, cu_seqlens):
    """Checks every argument; returns the number of sequences N and the initial state as a TTTLinearState."""
    N = check_common(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, cu_seqlens)
    state = as_state(initial_state, N, q.shape[2], q.shape[3], q)
    check_position(None if state is None else state.position, mini_batch_size)
    return N, state


def inner_params(q, ln_weight, ln_bias, token_scale, mini_batch_size):
    """The per-head LN parameters [H, K] (default ones/zeros) and the position scales [H, b] (default 1/i),
    in the compute dtype where defaulted."""
    _, _, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ln_weight = q.new_ones(H, K, dtype=acc) if ln_weight is None else ln_weight
    ln_bias = q.new_zeros(H, K, dtype=acc) if ln_bias is None else ln_bias
    if token_scale is None:  # s_i = 1 / i: the mean of the gradients seen so far in the mini-batch
        token_scale = torch.arange(1, mini_batch_size + 1, dtype=acc, device=q.device).reciprocal()
    return ln_weight, ln_bias, token_scale.expand(H, mini_batch_size)


def _defaults(q, ln_weight, ln_bias, token_scale, mini_batch_size, state, N, use_bias):
    """The per-head LN parameters [H, K], the position scales [H, b] and the full initial state (zeros where
    not given; b and sum_b None without bias)."""
    _, _, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ln_weight, ln_bias, scale = inner_params(q, ln_weight, ln_bias, token_scale, mini_batch_size)
    W0, b0, sum_W, sum_b, position = TTTLinearState(None, None, None, None, None) if state is None else state
    W0 = q.new_zeros(N, H, K, K, dtype=acc) if W0 is None else W0
    sum_W = q.new_zeros(N, H, K, K, dtype=acc) if sum_W is None else sum_W
    position = torch.zeros(N, dtype=torch.long, device=q.device) if position is None else position
    if not use_bias:
        b0 = sum_b = None
    else:
        b0 = q.new_zeros(N, H, K, dtype=acc) if b0 is None else b0
        sum_b = q.new_zeros(N, H, K, dtype=acc) if sum_b is None else sum_b
    return ln_weight, ln_bias, scale, TTTLinearState(W0, b0, sum_W, sum_b, position)


def _final_state(W, b, sum_W, sum_b, position) -> TTTLinearState:
    """The op's final state; without bias its b and sum_b are zeros."""
    zeros = torch.zeros_like(W[..., 0, :])
    return TTTLinearState(W, zeros if b is None else b, sum_W, zeros if sum_b is None else sum_b, position)


def ttt_linear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    *,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    mini_batch_size: int = 16,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = True,
    use_residual: bool = True,
    use_bias: bool = True,
) -> Tuple[torch.Tensor, Optional[TTTLinearState]]:
    """Token by token, written for clarity; the inner gradient by `torch.func.grad` of the loss (not the
    closed form of the torch path). Runs in float64 when given float64 inputs."""
    B, T, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    N = len(sequence_spans(B, T, cu_seqlens))
    state = as_state(initial_state, N, H, K, q)
    gamma, beta, s, init = _defaults(q, ln_weight, ln_bias, token_scale, mini_batch_size, state, N, use_bias)
    gamma, beta, s = gamma.to(acc), beta.to(acc), s.to(acc)  # [H, K], [H, K], [H, b]

    def inner(x, W, b):  # x [H, K] -> LN(x W + b) (or x W + b): [H, K]
        z = torch.einsum("hk,hkv->hv", x, W) + b
        return chunk.layer_norm(z, gamma, beta) if use_ln else z

    def loss(z, target):  # summed over heads: its gradient in z is each head's own
        pred = chunk.layer_norm(z, gamma, beta) if use_ln else z
        return 0.5 * ((pred - target) ** 2).sum()

    grad_z = torch.func.grad(loss)
    zeros = torch.zeros(H, K, dtype=acc, device=q.device)
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(sequence_spans(B, T, cu_seqlens)):
        # the open mini-batch: its start weights, its gradient sums and its tokens so far
        W0, sum_W, i = init.W[n].to(acc), init.sum_W[n].to(acc), int(init.position[n])  # [H, K, K] x2
        b0 = zeros if init.b is None else init.b[n].to(acc)  # [H, K]
        sum_b = zeros if init.sum_b is None else init.sum_b[n].to(acc)
        rows = [torch.zeros(0, H, K, dtype=acc, device=q.device)]
        for t in range(start, end):
            qt, kt, vt = q[row, t].to(acc), k[row, t].to(acc), v[row, t].to(acc)  # [H, K] each
            et = eta[row, t].to(acc)[:, None]  # [H, 1]
            G = grad_z(torch.einsum("hk,hkv->hv", kt, W0) + b0, vt - kt if use_residual else vt)  # [H, K]
            sum_W = sum_W + et[:, :, None] * kt[:, :, None] * G[:, None, :]
            sum_b = sum_b + et * G if init.b is not None else sum_b
            i += 1
            W = W0 - s[:, i - 1, None, None] * sum_W
            b = b0 - s[:, i - 1, None] * sum_b
            out = inner(qt, W, b)
            rows.append((qt + out if use_residual else out)[None])  # [1, H, K]
            if i == mini_batch_size:  # the mini-batch ends: commit its update
                W0, b0, sum_W, sum_b, i = W, b, torch.zeros_like(sum_W), torch.zeros_like(sum_b), 0
        outputs.append(torch.cat(rows))  # [T_n, H, K]
        finals.append((W0, b0, sum_W, sum_b, i))
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    if not output_final_state:
        return o.to(v.dtype), None
    W, b, sum_W, sum_b, position = zip(*finals)
    position = torch.tensor(position, dtype=torch.long, device=q.device)
    return o.to(v.dtype), TTTLinearState(torch.stack(W), torch.stack(b), torch.stack(sum_W), torch.stack(sum_b),
                                         position)


class TTTLinearTritonFunction(torch.autograd.Function):
    """Triton path on unpadded inputs: one program per (sequence, head) carries W through the sequence."""

    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, position0, cu_seqlens, C,
                use_ln, use_residual, use_bias):
        from ipl_layers.kernels.ttt import ttt_linear_fwd

        flags = (C, use_ln, use_residual, use_bias)
        o, W, b, sum_W, sum_b, saved = ttt_linear_fwd(
            q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, position0, cu_seqlens, *flags
        )
        ctx.save_for_backward(q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, position0, cu_seqlens)
        # the weights at every mini-batch start (fp32) are held only when a gradient will be asked for
        ctx.kernel_saved = saved if any(ctx.needs_input_grad) else None
        ctx.flags = flags
        return o, W, b, sum_W, sum_b

    @staticmethod
    def backward(ctx, do, dW, db, dsum_W, dsum_b):
        from ipl_layers.kernels.ttt import ttt_linear_bwd

        inputs = ctx.saved_tensors
        grads = ttt_linear_bwd(*inputs, *ctx.flags, ctx.kernel_saved, do, dW, db, dsum_W, dsum_b)
        del ctx.kernel_saved
        # fp32 parameter and state gradients back to their inputs' dtypes; none for inputs not given
        grads = [None if x is None else g.to(x.dtype) for x, g in zip(inputs, grads)]
        return (*grads, None, None, None, None, None, None)


def _triton_supports(C: int, K: int) -> bool:
    from ipl_layers.kernels.ttt.linear_common import MAX_K, MINI_BATCH_SIZES

    return C in MINI_BATCH_SIZES and K <= MAX_K


def _decode_step(q, k, v, eta, gamma, beta, scale, init, flags):
    """One token per sequence through the fused decode kernel, on a copy of the state (the op does not
    modify its inputs). Returns o and the new `TTTLinearState`."""
    from ipl_layers.kernels.ttt import ttt_linear_decode

    f32 = lambda x: x.detach().to(torch.float32).contiguous().clone()  # noqa: E731
    zeros = init.W.new_zeros(init.W.shape[:-1], dtype=torch.float32)
    state = TTTLinearState(f32(init.W), zeros if init.b is None else f32(init.b), f32(init.sum_W),
                           zeros.clone() if init.sum_b is None else f32(init.sum_b), init.position.clone())
    o = ttt_linear_decode(q, k, v, eta, gamma, beta, scale, state, **flags)
    return o, state


def _cpu_decode_step(q, k, v, eta, gamma, beta, scale, init, flags, in_place):
    """One token per sequence through the C++ step; returns o [N, 1, H, K] and the new `TTTLinearState`
    (b, sum_b zeros without bias, as the op's final state), written over init's tensors when `in_place` and
    they allow it (`_ext.in_place_applies`)."""
    zeros = init.W.new_zeros(init.W.shape[:-1], dtype=torch.float32)  # [N, H, K]
    state = TTTLinearState(init.W, zeros if init.b is None else init.b, init.sum_W,
                           zeros.clone() if init.sum_b is None else init.sum_b, init.position)
    in_place = in_place and _ext.in_place_applies(state[:4])
    o, final = _ext.ttt_linear_step(q[:, 0], k[:, 0], v[:, 0], eta[:, 0], gamma, beta, scale, state, **flags,
                                    in_place=in_place)
    return o[:, None].to(v.dtype), final


def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    *,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    mini_batch_size: int = 16,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = True,
    use_residual: bool = True,
    use_bias: bool = True,
    update_state_in_place: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[TTTLinearState]]:
    """TTT-Linear: the inner model's outputs on q while it learns from (k, v) by mini-batch GD.

    Args:
        q, k, v: [B, T, H, K] (V == K: the inner model maps K features to K features).
        eta: [B, T, H] per-token learning rates.
        ln_weight, ln_bias: [H, K] the inner LN's per-head gamma/beta (default ones/zeros; unused without LN).
        token_scale: per-position scale s_i of the accumulated gradient, [b] or [H, b]; default s_i = 1/i.
        mini_batch_size: b. Mini-batches start at each sequence's first token (or continue the initial
            state's open mini-batch); a sequence may end mid-mini-batch: its final state then holds the open
            mini-batch's start weights and gradient sums (`TTTLinearState`).
        initial_state: None (zeros), a tuple (W [N, H, K, K], b [N, H, K] or None) of weights at a mini-batch
            boundary (the learnable W0/b0 enter so), or a `TTTLinearState` from an earlier call; all
            differentiable (N = B, or the number of sequences with `cu_seqlens`). Without bias b is unused.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        use_ln, use_residual, use_bias: the inner model's LN, residual connection and bias.
        update_state_in_place: when the call is a fused C++ decoding step (below) and initial_state is a
            `TTTLinearState` of fp32, contiguous tensors that share no memory, write the new W, b and sums over
            them (the returned state holds them, and a new position) instead of allocating new ones: a cache's
            own state, decoded token after token. Otherwise, or with the flag off, initial_state is left unchanged.
        backend: "torch" (dual form, the CPU path; one token per sequence without autograd runs the fused C++
            step of `ipl_layers._C` when it is built), "triton" (the kernels: mini_batch_size in {16, 32, 64},
            K <= 64; one token per sequence without autograd runs the fused decode kernel) or "reference".
            Default: `IPL_BACKEND`, else "triton" on CUDA where the kernels cover the sizes, else "torch".

    Returns:
        o: [B, T, H, K] in the dtype of v; final_state: None, or a `TTTLinearState` in fp32 (float64 for
        float64 inputs) whose `weights(token_scale)` are the weights after the last token; b and sum_b are
        zeros without bias.
    """
    N, state = _check_inputs(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state,
                             cu_seqlens)
    C, K = mini_batch_size, q.shape[-1]
    name = resolve_backend("ttt_linear", backend, q.device, BACKENDS)
    if name == "triton" and backend is None and not _triton_supports(C, K):
        name = "torch"  # the default on CUDA: sizes the kernels do not cover run on the torch path
    flags = dict(use_ln=use_ln, use_residual=use_residual, use_bias=use_bias)
    if name == "reference":
        return ttt_linear_reference(
            q, k, v, eta, ln_weight=ln_weight, ln_bias=ln_bias, token_scale=token_scale,
            mini_batch_size=mini_batch_size, initial_state=state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, **flags,
        )
    gamma, beta, scale, init = _defaults(q, ln_weight, ln_bias, token_scale, C, state, N, use_bias)
    lengths = torch.diff(cu_seqlens.long()) if cu_seqlens is not None else init.position.new_full((N,), q.shape[1])
    ends = init.position + lengths.to(init.position.device)  # [N]: mini-batch positions covered
    inputs = (q, k, v, eta, gamma, beta, scale, *init[:4])
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if name == "torch" and _ext.step_applies(q, init.W, cu_seqlens, *inputs):  # decoding: the fused C++ step
        full = state is not None and state.position is not None  # an earlier call's state, not start weights
        o, final = _cpu_decode_step(q, k, v, eta, gamma, beta, scale, init, flags, update_state_in_place and full)
        return o, (final if output_final_state else None)
    if name == "triton":
        if not _triton_supports(C, K):
            raise ValueError(f"ttt_linear: backend 'triton' covers mini_batch_size in (16, 32, 64) and K <= 64, "
                             f"got mini_batch_size = {C}, K = {K}; use backend='torch'")
        if q.shape[1] == 1 and cu_seqlens is None and not needs_grad:
            o, final = _decode_step(q, k, v, eta, gamma, beta, scale, init, flags)
            return o, (final if output_final_state else None)
        at_boundary = state is None or state.position is None
        W0, b0 = (None, None) if state is None else state[:2]
        sums = (None, None, None) if at_boundary else (init.sum_W, init.sum_b, init.position)
        o, W, b, sum_W, sum_b = TTTLinearTritonFunction.apply(
            q, k, v, eta, gamma, beta, scale, W0, b0, *sums, cu_seqlens, C, use_ln, use_residual, use_bias
        )
        return o, (_final_state(W, b if use_bias else None, sum_W, sum_b if use_bias else None, ends % C)
                   if output_final_state else None)
    # each sequence continues its open mini-batch: `position` empty rows in front align mini-batches to chunks
    front = None if state is None or state.position is None else init.position
    (qp, kp, vp, etap), unpad = pad_sequences([q, k, v, eta], cu_seqlens, C, front=front)
    args = (qp, kp, vp, etap, gamma, beta, scale, *init[:4], ends // C, C, use_ln, use_residual)
    if needs_grad:
        o, W, b, sum_W, sum_b = chunk.TTTLinearChunkFunction.apply(*args)
    else:  # inference: nothing to save for a backward, so the working set is bounded by segments
        o, W, b, sum_W, sum_b, _ = chunk.chunk_forward(*args, segment_chunks=chunk.SEGMENT_CHUNKS)
    return unpad(o), (_final_state(W, b, sum_W, sum_b, ends % C) if output_final_state else None)
