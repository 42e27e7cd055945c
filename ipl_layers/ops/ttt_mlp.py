"""`ttt_mlp`: TTT-MLP (Sun et al. 2024), a two-layer MLP inner model trained by mini-batch gradient descent.

Per sequence and head, the inner model is f(x) = x + LN(gelu(x W1 + b1) W2 + b2) (W1 [K, F], W2 [F, K],
F = expand * K, tanh-approximated GELU, LN over the K features with per-head gamma/beta, eps 1e-6), trained
on l_t = 1/2 ||LN(gelu(k_t W1 + b1) W2 + b2) - (v_t - k_t)||^2. As in `ttt_linear`, inside a mini-batch of b
tokens every gradient is taken at the mini-batch's start weights theta_0 = (W1, b1, W2, b2):

    theta_i = theta_0 - s_i sum_{j<=i} eta_j dl_j/dtheta(theta_0),    o_i = q_i + LN(gelu(q_i W1_i + b1_i) W2_i + b2_i)

and the next mini-batch starts from the last position's weights. Without the residual the target is v_t
and the output LN(.); without LN the inner map is the bare MLP. Both layers always have biases.

This module holds the token-by-token reference, the input checks, the dispatching entry point and the
torch path's autograd Function (the dual form applied layer by layer: `ttt_mlp_chunk.py`; its hand-written
backward: `ttt_mlp_chunk_bwd.py`).
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers._checks import check_positive_int, check_shape, check_tensor, sequence_spans
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import ttt_mlp_chunk as chunk
from ipl_layers.ops.ttt_mlp_chunk_bwd import chunk_backward
from ipl_layers.ops.chunking import pad_sequences
from ipl_layers.ops.ttt_linear import check_common, check_position, inner_params
from ipl_layers.ops.ttt_linear_chunk import layer_norm
from ipl_layers.state import TTTMLPState

BACKENDS = ("reference", "torch")

InitialState = Union[TTTMLPState, Sequence[Optional[torch.Tensor]]]
PARAMS = ("W1", "b1", "W2", "b2")


def _param_shapes(N: int, H: int, K: int, Fd: int):
    """(name, shape, dims) of W1, b1, W2, b2."""
    return (("W1", (N, H, K, Fd), "N, H, K, F"), ("b1", (N, H, Fd), "N, H, F"),
            ("W2", (N, H, Fd, K), "N, H, F, K"), ("b2", (N, H, K), "N, H, K"))


def as_state(initial_state, N: int, H: int, K: int, like: torch.Tensor) -> Optional[TTTMLPState]:
    """None, a tuple (W1, b1, W2, b2) of weights at a mini-batch boundary, or a `TTTMLPState` (or the plain
    9-tuple a cache round trip makes of one) -> a checked `TTTMLPState` (at a boundary its sums and position
    are None)."""
    if initial_state is None:
        return None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) not in (4, 9):
        raise TypeError("initial_state: expected a TTTMLPState or a tuple (W1 [N, H, K, F], b1 [N, H, F], "
                        f"W2 [N, H, F, K], b2 [N, H, K]), got {type(initial_state).__name__}")
    W1 = initial_state[0]
    check_tensor("initial_state W1", W1, 4, "N, H, K, F", like=like)
    shapes = _param_shapes(N, H, K, W1.shape[-1])
    for (name, shape, dims), x in zip(shapes, initial_state[:4]):
        check_tensor(f"initial_state {name}", x, len(shape), dims, like=like)
        check_shape(f"initial_state {name}", x, shape, dims)
    if len(initial_state) == 4 or all(x is None for x in initial_state[4:]):  # at a mini-batch boundary
        return TTTMLPState(*initial_state[:4], None, None, None, None, None)
    for (name, shape, dims), x in zip(shapes, initial_state[4:8]):
        check_tensor(f"initial_state sum_{name}", x, len(shape), dims, like=like)
        check_shape(f"initial_state sum_{name}", x, shape, dims)
    position = initial_state[8]
    if not isinstance(position, torch.Tensor) or position.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"initial_state position: expected an int32/int64 tensor [N], got {position!r}")
    check_shape("initial_state position", position, (N,), "N")
    return TTTMLPState(*initial_state[:8], position.to(device=like.device, dtype=torch.long))


def _check_inputs(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, expand, initial_state, cu_seqlens):
    """Checks every argument; returns N, the hidden width F and the initial state as a TTTMLPState."""
    N = check_common(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, cu_seqlens)
    check_positive_int("expand", expand)
    _, _, H, K = q.shape
    state = as_state(initial_state, N, H, K, q)
    if state is None:
        return N, expand * K, None
    check_position(state.position, mini_batch_size)
    return N, state.W1.shape[-1], state


def _full_state(q, state: Optional[TTTMLPState], N: int, Fd: int) -> TTTMLPState:
    """The initial state with zeros where not given (weights, sums) and position 0 at a boundary."""
    _, _, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    zeros = [q.new_zeros(shape, dtype=acc) for _, shape, _ in _param_shapes(N, H, K, Fd)]
    if state is None:
        state = TTTMLPState(*[None] * 9)
    weights = [z if x is None else x for z, x in zip(zeros, state[:4])]
    sums = [z if x is None else x for z, x in zip(zeros, state[4:8])]
    position = torch.zeros(N, dtype=torch.long, device=q.device) if state.position is None else state.position
    return TTTMLPState(*weights, *sums, position)


def mlp(x: torch.Tensor, W1, b1, W2, b2) -> torch.Tensor:
    """The bare inner MLP per head: x [H, K] -> gelu(x W1 + b1) W2 + b2, [H, K]."""
    h = F.gelu(torch.einsum("hk,hkf->hf", x, W1) + b1, approximate="tanh")
    return torch.einsum("hf,hfk->hk", h, W2) + b2


def ttt_mlp_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    *,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    mini_batch_size: int = 16,
    expand: int = 4,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = True,
    use_residual: bool = True,
) -> Tuple[torch.Tensor, Optional[TTTMLPState]]:
    """Token by token, written for clarity; the inner gradients by `torch.func.grad` of the loss. Runs in
    float64 when given float64 inputs."""
    B, T, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    spans = sequence_spans(B, T, cu_seqlens)
    state = as_state(initial_state, len(spans), H, K, q)
    Fd = expand * K if state is None else state.W1.shape[-1]
    init = _full_state(q, state, len(spans), Fd)
    gamma, beta, s = (x.to(acc) for x in inner_params(q, ln_weight, ln_bias, token_scale, mini_batch_size))

    def predict(theta, x):  # [H, K] -> the inner model's prediction (before the residual)
        z = mlp(x, *theta)
        return layer_norm(z, gamma, beta) if use_ln else z

    def loss(theta, x, target):  # summed over heads: its gradient in each head's weights is that head's own
        return 0.5 * ((predict(theta, x) - target) ** 2).sum()

    grad = torch.func.grad(loss)
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(spans):
        theta0 = tuple(x[n].to(acc) for x in init[:4])  # the open mini-batch's start weights
        sums, i = tuple(x[n].to(acc) for x in init[4:8]), int(init.position[n])
        rows = [torch.zeros(0, H, K, dtype=acc, device=q.device)]
        for t in range(start, end):
            qt, kt, vt = q[row, t].to(acc), k[row, t].to(acc), v[row, t].to(acc)  # [H, K] each
            et = eta[row, t].to(acc)  # [H]
            G = grad(theta0, kt, vt - kt if use_residual else vt)
            sums = tuple(S + et.view(H, *[1] * (g.dim() - 1)) * g for S, g in zip(sums, G))
            i += 1
            theta = tuple(w - s[:, i - 1].view(H, *[1] * (w.dim() - 1)) * S for w, S in zip(theta0, sums))
            out = predict(theta, qt)
            rows.append((qt + out if use_residual else out)[None])  # [1, H, K]
            if i == mini_batch_size:  # the mini-batch ends: commit its update
                theta0, sums, i = theta, tuple(torch.zeros_like(S) for S in sums), 0
        outputs.append(torch.cat(rows))  # [T_n, H, K]
        finals.append((*theta0, *sums, i))
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    if not output_final_state:
        return o.to(v.dtype), None
    *tensors, position = zip(*finals)
    return o.to(v.dtype), TTTMLPState(*(torch.stack(x) for x in tensors),
                                      torch.tensor(position, dtype=torch.long, device=q.device))


class TTTMLPChunkFunction(torch.autograd.Function):
    """The torch path on padded sequences [N, Tp, H, *] (Tp a multiple of the mini-batch size C), with the
    hand-written backward of `ttt_mlp_chunk_bwd.py`."""

    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, scale, W1, b1, W2, b2, sum_W1, sum_b1, sum_W2, sum_b2, last,
                C, use_ln, use_residual):
        o, final, saved = chunk.chunk_forward(q, k, v, eta, ln_weight, ln_bias, scale, (W1, b1, W2, b2),
                                              (sum_W1, sum_b1, sum_W2, sum_b2), last, C, use_ln, use_residual)
        ctx.chunk_saved = saved  # intermediates (chunked operands, start weights, pre-activations), not inputs
        ctx.last, ctx.flags = last, (C, use_ln, use_residual)
        ctx.dtypes = [x.dtype if ctx.needs_input_grad[i] else None
                      for i, x in enumerate((q, k, v, eta, ln_weight, ln_bias, scale, W1, b1, W2, b2, sum_W1, sum_b1,
                                             sum_W2, sum_b2))]
        return (o, *final)

    @staticmethod
    def backward(ctx, do, *dfinal):
        # the saved intermediates stay on ctx: gradcheck and retain_graph run this more than once
        grads = chunk_backward(ctx.chunk_saved, do, dfinal, ctx.last, *ctx.flags, ctx.dtypes)
        return (*grads, None, None, None, None)


def ttt_mlp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    *,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    mini_batch_size: int = 16,
    expand: int = 4,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = True,
    use_residual: bool = True,
    update_state_in_place: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[TTTMLPState]]:
    """TTT-MLP: the inner MLP's outputs on q while it learns from (k, v) by mini-batch GD.

    Args:
        q, k, v: [B, T, H, K] (V == K).
        eta: [B, T, H] per-token learning rates.
        ln_weight, ln_bias: [H, K] the inner LN's per-head gamma/beta (default ones/zeros; unused without LN).
        token_scale: per-position scale s_i of the accumulated gradient, [b] or [H, b]; default s_i = 1/i.
        mini_batch_size: b; mini-batches continue across calls through the state, as in `ttt_linear`.
        expand: hidden width F = expand * K when there is no initial state (else F is W1's last dim).
        initial_state: None (zeros: an MLP at zero weights gets zero gradients in W1 and W2, so pass the
            learnable start weights), a tuple (W1 [N, H, K, F], b1 [N, H, F], W2 [N, H, F, K], b2 [N, H, K])
            at a mini-batch boundary, or a `TTTMLPState` from an earlier call; all differentiable.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        use_ln, use_residual: the inner model's LN and residual connection.
        update_state_in_place: when the call is a fused C++ decoding step (below) and initial_state is a
            `TTTMLPState` of fp32, contiguous tensors that share no memory, write the new weights and sums over
            them (the returned state holds them, and a new position) instead of allocating new ones: a cache's own state, decoded token
            after token. Otherwise, or with the flag off, initial_state is left unchanged.
        backend: "torch" (dual form layer by layer, the CPU path; one token per sequence without autograd runs
            the fused C++ step of `ipl_layers._C` when it is built) or "reference". Default: `IPL_BACKEND`,
            else "torch" on CPU; CUDA tensors need an explicit backend until the Triton kernels exist.

    Returns:
        o: [B, T, H, K] in the dtype of v; final_state: None, or a `TTTMLPState` in fp32 (float64 for float64
        inputs) whose `weights(token_scale)` are the weights after the last token.
    """
    N, Fd, state = _check_inputs(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, expand,
                                 initial_state, cu_seqlens)
    name = resolve_backend("ttt_mlp", backend, q.device, BACKENDS)
    flags = dict(use_ln=use_ln, use_residual=use_residual)
    if name == "reference":
        return ttt_mlp_reference(
            q, k, v, eta, ln_weight=ln_weight, ln_bias=ln_bias, token_scale=token_scale,
            mini_batch_size=mini_batch_size, expand=expand, initial_state=state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, **flags,
        )
    C = mini_batch_size
    gamma, beta, scale = inner_params(q, ln_weight, ln_bias, token_scale, C)
    init = _full_state(q, state, N, Fd)
    if _ext.step_applies(q, init.W1, cu_seqlens, k, v, eta, gamma, beta, scale, *init[:8]):
        # decoding: one token per sequence through the fused C++ step (fp32), on CPU without autograd
        full = state is not None and state.position is not None  # an earlier call's state, not start weights
        in_place = update_state_in_place and full and _ext.in_place_applies(init[:8])
        o, final = _ext.ttt_mlp_step(q[:, 0], k[:, 0], v[:, 0], eta[:, 0], gamma, beta, scale, init, **flags,
                                     in_place=in_place)
        return o[:, None].to(v.dtype), (final if output_final_state else None)
    lengths = torch.diff(cu_seqlens.long()) if cu_seqlens is not None else init.position.new_full((N,), q.shape[1])
    ends = init.position + lengths.to(init.position.device)  # [N]: mini-batch positions covered
    # each sequence continues its open mini-batch: `position` empty rows in front align mini-batches to chunks
    front = None if state is None or state.position is None else init.position
    (qp, kp, vp, etap), unpad = pad_sequences([q, k, v, eta], cu_seqlens, C, front=front)
    args = (qp, kp, vp, etap, gamma, beta, scale, *init[:8], ends // C, C, use_ln, use_residual)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args[:15]):
        o, *final = TTTMLPChunkFunction.apply(*args)
    else:
        # inference: nothing to save for a backward, so the working set is bounded by runs of chunks
        o, final, _ = chunk.chunk_forward(*args[:7], init[:4], init[4:8], *args[15:],
                                          segment_chunks=chunk.SEGMENT_CHUNKS)
    return unpad(o), (TTTMLPState(*final, ends % C) if output_final_state else None)
