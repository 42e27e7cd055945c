"""`ttt_linear`: TTT-Linear (Sun et al. 2024), a linear inner model trained by mini-batch gradient descent.

Per sequence and head, the hidden state is an inner model f(x) = x + LN(x W + b) (W [K, K], b [K], LN
over the K features with per-head gamma/beta, eps 1e-6), trained on l_t = 1/2 ||LN(k_t W + b) - (v_t - k_t)||^2.
Inside a mini-batch of b tokens (positions i, j = 1..b) every gradient G_j = dl_j/dz_j (z_j = k_j W0 + b0)
is taken at the mini-batch's start weights W0, b0:

    W_i = W0 - s_i sum_{j<=i} eta_j k_j^T G_j,   b_i = b0 - s_i sum_{j<=i} eta_j G_j,   o_i = q_i + LN(q_i W_i + b_i)

and the next mini-batch starts from the last position's weights. Without the residual the target is v_t
and the output LN(q_i W_i + b_i); without LN the inner map is x W + b; without bias b = 0, never updated.

This module holds the token-by-token reference, the input checks and the dispatching entry point; the
torch path (dual form, `ttt_linear_chunk.py`) is differentiated by autograd; the Triton kernels come later.
"""

from typing import Optional, Sequence, Tuple

import torch

from ipl_layers._checks import (
    check_cu_seqlens, check_positive_int, check_qkv, check_shape, check_tensor, sequence_spans,
)
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import ttt_linear_chunk as chunk
from ipl_layers.ops.chunking import pad_sequences

BACKENDS = ("reference", "torch")

State = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _check_inputs(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state, cu_seqlens):
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
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("initial_state: expected a tuple (W [N, H, K, K], b [N, H, K] or None)")
        W0, b0 = initial_state
        check_tensor("initial_state W", W0, 4, "N, H, K, K", like=q)
        check_shape("initial_state W", W0, (N, H, K, K), "N, H, K, K")
        if b0 is not None:
            check_tensor("initial_state b", b0, 3, "N, H, K", like=q)
            check_shape("initial_state b", b0, (N, H, K), "N, H, K")
    return N


def _defaults(q, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state, N, use_bias):
    """The per-head LN parameters [H, K], the position scales [H, b] and the start weights (W, b or None)."""
    _, _, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ln_weight = q.new_ones(H, K, dtype=acc) if ln_weight is None else ln_weight
    ln_bias = q.new_zeros(H, K, dtype=acc) if ln_bias is None else ln_bias
    if token_scale is None:  # s_i = 1 / i: the mean of the gradients seen so far in the mini-batch
        token_scale = torch.arange(1, mini_batch_size + 1, dtype=acc, device=q.device).reciprocal()
    scale = token_scale.expand(H, mini_batch_size)  # [H, b]
    W0, b0 = (None, None) if initial_state is None else initial_state
    W0 = q.new_zeros(N, H, K, K, dtype=acc) if W0 is None else W0
    if not use_bias:
        b0 = None
    elif b0 is None:
        b0 = q.new_zeros(N, H, K, dtype=acc)
    return ln_weight, ln_bias, scale, W0, b0


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
    initial_state: Optional[Sequence[Optional[torch.Tensor]]] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = True,
    use_residual: bool = True,
    use_bias: bool = True,
) -> Tuple[torch.Tensor, Optional[State]]:
    """Token by token, written for clarity; the inner gradient by `torch.func.grad` of the loss (not the
    closed form of the torch path). Runs in float64 when given float64 inputs."""
    B, T, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    N = len(sequence_spans(B, T, cu_seqlens))
    gamma, beta, s, W_init, b_init = _defaults(q, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state,
                                               N, use_bias)
    gamma, beta, s = gamma.to(acc), beta.to(acc), s.to(acc)  # [H, K], [H, K], [H, b]

    def inner(x, W, b):  # x [H, K] -> LN(x W + b) (or x W + b): [H, K]
        z = torch.einsum("hk,hkv->hv", x, W) + b
        return chunk.layer_norm(z, gamma, beta) if use_ln else z

    def loss(z, target):  # summed over heads: its gradient in z is each head's own
        pred = chunk.layer_norm(z, gamma, beta) if use_ln else z
        return 0.5 * ((pred - target) ** 2).sum()

    grad_z = torch.func.grad(loss)
    outputs, finals_W, finals_b = [], [], []
    for n, (row, start, end) in enumerate(sequence_spans(B, T, cu_seqlens)):
        W = W_init[n].to(acc)  # [H, K, K]
        b = torch.zeros(H, K, dtype=acc, device=q.device) if b_init is None else b_init[n].to(acc)  # [H, K]
        rows = [torch.zeros(0, H, K, dtype=acc, device=q.device)]
        for mb in range(start, end, mini_batch_size):
            W0, b0 = W, b
            sum_W, sum_b = torch.zeros_like(W0), torch.zeros_like(b0)
            for i, t in enumerate(range(mb, min(mb + mini_batch_size, end))):
                qt, kt, vt = q[row, t].to(acc), k[row, t].to(acc), v[row, t].to(acc)  # [H, K] each
                et = eta[row, t].to(acc)[:, None]  # [H, 1]
                G = grad_z(torch.einsum("hk,hkv->hv", kt, W0) + b0, vt - kt if use_residual else vt)  # [H, K]
                sum_W = sum_W + et[:, :, None] * kt[:, :, None] * G[:, None, :]
                sum_b = sum_b + et * G
                W = W0 - s[:, i, None, None] * sum_W
                if b_init is not None:
                    b = b0 - s[:, i, None] * sum_b
                out = inner(qt, W, b)
                rows.append((qt + out if use_residual else out)[None])  # [1, H, K]
        outputs.append(torch.cat(rows))  # [T_n, H, K]
        finals_W.append(W)
        finals_b.append(b)
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    final = (torch.stack(finals_W), torch.stack(finals_b)) if output_final_state else None
    return o.to(v.dtype), final


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
    initial_state: Optional[Sequence[Optional[torch.Tensor]]] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = True,
    use_residual: bool = True,
    use_bias: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[State]]:
    """TTT-Linear: the inner model's outputs on q while it learns from (k, v) by mini-batch GD.

    Args:
        q, k, v: [B, T, H, K] (V == K: the inner model maps K features to K features).
        eta: [B, T, H] per-token learning rates.
        ln_weight, ln_bias: [H, K] the inner LN's per-head gamma/beta (default ones/zeros; unused without LN).
        token_scale: per-position scale s_i of the accumulated gradient, [b] or [H, b]; default s_i = 1/i.
        mini_batch_size: b. Mini-batches start at each sequence's first token; a trailing partial mini-batch
            (T, or a varlen sequence's length, not a multiple of b) is a mini-batch of its own length L,
            using s_1..s_L, and the final weights are those at its last position.
        initial_state: None (zeros) or a tuple (W [N, H, K, K], b [N, H, K] or None), differentiable
            (N = B, or the number of sequences with `cu_seqlens`). Without bias its b is not used.
        output_final_state: also return the weights after the last token.
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        use_ln, use_residual, use_bias: the inner model's LN, residual connection and bias.
        backend: "torch" (dual form, the CPU path; backward by autograd) or "reference". Default:
            `IPL_BACKEND`, else "torch" on CPU; CUDA tensors need an explicit backend until the Triton
            kernels exist.

    Returns:
        o: [B, T, H, K] in the dtype of v; final_state: None, or a tuple (W [N, H, K, K], b [N, H, K]) in
        fp32 (float64 for float64 inputs); b is zeros without bias.
    """
    N = _check_inputs(q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state, cu_seqlens)
    name = resolve_backend("ttt_linear", backend, q.device, BACKENDS)
    flags = dict(use_ln=use_ln, use_residual=use_residual, use_bias=use_bias)
    if name == "reference":
        return ttt_linear_reference(
            q, k, v, eta, ln_weight=ln_weight, ln_bias=ln_bias, token_scale=token_scale,
            mini_batch_size=mini_batch_size, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, **flags,
        )
    gamma, beta, scale, W0, b0 = _defaults(q, ln_weight, ln_bias, token_scale, mini_batch_size, initial_state, N,
                                           use_bias)
    valid = q.new_ones(q.shape[:2] + (1,))  # [B, T, 1]: marks real tokens once padded
    (qp, kp, vp, etap, validp), unpad = pad_sequences([q, k, v, eta, valid], cu_seqlens, mini_batch_size)
    o, W, b = chunk.chunk_forward(qp, kp, vp, etap, validp, gamma, beta, scale, W0, b0, mini_batch_size, use_ln,
                                  use_residual)
    if not output_final_state:
        return unpad(o), None
    return unpad(o), (W, torch.zeros_like(W[..., 0, :]) if b is None else b)
