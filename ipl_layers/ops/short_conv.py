"""`short_conv`: short causal depthwise convolution (the token mixer before q/k/v in most fast-weight layers).

Per sequence and channel d, with width W and the sequence's history h (its last W-1 inputs, oldest first):

    y_t[d] = act(bias[d] + sum_{w=0}^{W-1} weight[d, w] * x_{t-(W-1)+w}[d])

where x at positions before the sequence start are read from `initial_state` (zeros without it). The
state after a sequence is its last W-1 inputs; a sequence shorter than W-1 shifts its inputs in after the
old state. This module holds the reference, the torch path (one tap loop over all sequences, each
preceded by its history), the Triton autograd Function and the dispatching entry point.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers._checks import check_cu_seqlens, check_shape, check_tensor, sequence_spans
from ipl_layers.backend import resolve_backend

BACKENDS = ("reference", "torch", "triton")
ACTIVATIONS = (None, "silu")


def _check_inputs(x, weight, bias, activation, initial_state, cu_seqlens):
    check_tensor("x", x, 3, "B, T, D")
    B, T, D = x.shape
    check_tensor("weight", weight, 2, "D, W", like=x, like_name="x")
    if weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(
            f"weight: expected shape [D, W] with D = {D} (the last dim of x) and W >= 1, "
            f"got [{weight.shape[0]}, {weight.shape[1]}]"
        )
    W = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, 1, "D", like=x, like_name="x")
        check_shape("bias", bias, (D,), "D")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    N = check_cu_seqlens(cu_seqlens, B, T, x.device, like_name="x")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 3, "N, D, W-1", like=x, like_name="x")
        check_shape("initial_state", initial_state, (N, D, W - 1), "N, D, W-1")
    return N


def short_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One sequence at a time, one tap at a time. Runs in float64 when given float64 inputs."""
    D, W = weight.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    outputs, finals = [], []
    for n, (b, start, end) in enumerate(sequence_spans(x.shape[0], x.shape[1], cu_seqlens)):
        if initial_state is None:
            history = torch.zeros(W - 1, D, dtype=acc, device=x.device)  # [W-1, D]
        else:
            history = initial_state[n].to(acc).T
        xs = torch.cat([history, x[b, start:end].to(acc)])  # [W-1+L, D]: xs[W-1+t] = x_t
        L = end - start
        z = torch.zeros(L, D, dtype=acc, device=x.device)  # [L, D]
        if bias is not None:
            z = z + bias.to(acc)
        for w in range(W):
            z = z + weight[:, w].to(acc) * xs[w : w + L]  # tap w reads x_{t-(W-1)+w}
        outputs.append(F.silu(z) if activation == "silu" else z)
        finals.append(xs[L:].T)  # [D, W-1]: the last W-1 rows, oldest first
    y = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    final = torch.stack(finals) if output_final_state else None
    return y.to(x.dtype), final


def _conv(padded, weight, bias):
    """Causal depthwise convolution without padding, [B, W-1+L, D] -> [B, L, D], as a loop of fused
    multiply-adds over the taps: on CPU twice as fast as a grouped conv1d, which has no fast depthwise
    kernel there."""
    W = weight.shape[1]
    L = padded.shape[1] - (W - 1)
    weight = weight.to(padded.dtype)
    if bias is None:
        z = padded[:, :L] * weight[:, 0]
    else:
        z = torch.addcmul(bias.to(padded.dtype), padded[:, :L], weight[:, 0])
    for w in range(1, W):
        z = z.addcmul_(padded[:, w : w + L], weight[:, w])  # tap w reads x_{t-(W-1)+w}
    return z


def _pack_histories(x, history, cu_seqlens):
    """Packed sequences, each preceded by its history: [1, T + N*(W-1), D], sequence n in rows
    [offsets[n] + n*(W-1), offsets[n+1] + (n+1)*(W-1)). Also returns the conv output row of every token
    [T] and the last W-1 rows of every sequence [N, W-1]."""
    T, D = x.shape[1:]
    N, W1, _ = history.shape
    dev = x.device
    offsets = cu_seqlens.long()
    shift = torch.arange(N, device=dev) * W1  # [N]: history rows before sequence n
    taps = torch.arange(W1, device=dev)
    seq = torch.repeat_interleave(torch.arange(N, device=dev), offsets[1:] - offsets[:-1], output_size=T)  # [T]
    tokens = torch.arange(T, device=dev)
    gather = torch.empty(T + N * W1, dtype=torch.long, device=dev)  # row of [x; history] per padded row
    gather[tokens + shift[seq] + W1] = tokens
    gather[((offsets[:-1] + shift)[:, None] + taps).reshape(-1)] = T + torch.arange(N * W1, device=dev)
    padded = torch.cat([x[0], history.reshape(N * W1, D)])[gather]  # [T + N*(W-1), D]
    last_rows = (offsets[1:] + shift)[:, None] + taps  # [N, W-1]
    return padded[None], tokens + shift[seq], last_rows  # conv output row p sees padded rows p .. p+W-1


def _short_conv_torch(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens):
    """One convolution over every sequence preceded by its history (the last W-1 inputs before it), so
    it never crosses a boundary. Gradients flow through the concatenations and gathers into x and the
    state."""
    B, T, D = x.shape
    W1 = weight.shape[1] - 1
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if initial_state is None:
        history = torch.zeros(N, W1, D, dtype=acc, device=x.device)
    else:
        history = initial_state.to(acc).transpose(1, 2)  # [N, W-1, D]
    if cu_seqlens is None:
        padded = torch.cat([history, x.to(acc)], 1)  # [B, W-1+T, D]
        z = _conv(padded, weight, bias)  # [B, T, D]
        final = padded[:, T:]  # [B, W-1, D]: the last W-1 rows
    else:
        padded, out_rows, last_rows = _pack_histories(x.to(acc), history, cu_seqlens)
        z = _conv(padded, weight, bias)[:, out_rows]  # [1, T, D]
        final = padded[0, last_rows]  # [N, W-1, D]
    y = (F.silu(z) if activation == "silu" else z).to(x.dtype)
    return y, (final.transpose(1, 2) if output_final_state else None)


class ShortConvTritonFunction(torch.autograd.Function):
    """Triton path: the forward kernel (or the fused decode step for one token with a state), and the
    backward kernel that recomputes the pre-activation for silu instead of saving it."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
        from ipl_layers.kernels import conv as kern

        decode = x.shape[1] == 1 and initial_state is not None and cu_seqlens is None
        fwd = kern.short_conv_decode if decode else kern.short_conv_fwd
        y, final = fwd(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state)
        ctx.save_for_backward(x, weight, bias, initial_state, cu_seqlens)
        ctx.activation = activation
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        from ipl_layers.kernels import conv as kern

        x, weight, bias, initial_state, cu_seqlens = ctx.saved_tensors
        dx, dweight, dbias, dh0 = kern.short_conv_bwd(
            x, weight, bias, initial_state, cu_seqlens, ctx.activation, dy, dfinal
        )
        return dx, dweight, dbias, dh0, None, None, None


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    update_state_in_place: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Short causal depthwise convolution with optional bias and silu.

    Args:
        x: [B, T, D].
        weight: [D, W], tap w multiplies x_{t-(W-1)+w} (the last tap the current token).
        bias: None or [D].
        activation: None or "silu".
        initial_state: [N, D, W-1], the last W-1 inputs before each sequence, oldest first
            (N = B, or the number of sequences with `cu_seqlens`); zeros when None.
        output_final_state: also return the last W-1 inputs of each sequence, [N, D, W-1] (fp32,
            float64 for float64 inputs).
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        update_state_in_place: when the call is a fused C++ decoding step (below) and initial_state is fp32 and
            contiguous, write the new state over it (the returned state is initial_state itself) instead of
            allocating one: a cache's own state, decoded token after token. Otherwise initial_state is unchanged.
        backend: "torch" (a tap loop, the CPU path; one token with a state and no autograd runs the
            fused C++ step of `ipl_layers._C` when it is built), "triton" (forward/backward kernels, the fused
            decode kernel for T == 1 with a state), or "reference".
            Default: `IPL_BACKEND`, else "triton" on CUDA and "torch" elsewhere.

    Returns:
        y: [B, T, D] in the dtype of x; final_state: [N, D, W-1] or None.
    """
    _check_inputs(x, weight, bias, activation, initial_state, cu_seqlens)
    name = resolve_backend("short_conv", backend, x.device, BACKENDS)
    if name == "reference":
        return short_conv_reference(
            x, weight, bias, activation=activation, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    if name == "torch":
        if _ext.step_applies(x, initial_state, cu_seqlens, weight, bias):  # decoding: the fused C++ step
            in_place = update_state_in_place and _ext.in_place_applies([initial_state])
            y, final = _ext.short_conv_step(x[:, 0], weight, bias, initial_state, activation == "silu", in_place)
            return y[:, None].to(x.dtype), (final if output_final_state else None)
        return _short_conv_torch(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    return ShortConvTritonFunction.apply(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state)
