"""`lact`: Large-Chunk Test-Time Training (Zhang et al. 2025, "Test-Time Training Done Right").

Per sequence and head the fast weight is a SwiGLU MLP, in row-vector orientation

    f(x) = (silu(x W0) * (x W2)) W1        W0, W2 [K, F], W1 [F, V] (F the hidden width; V may differ from K)

trained on the negative dot-product loss L_W = -sum_i lr_{i,W} <f(k_i), v_i> with a separate per-token learning
rate for each weight (lr [B, T, H, 3]: W0, W1, W2). Tokens are grouped into chunks of `chunk_size` counted from
the start of the sequence, and each chunk is applied, then learned from ("apply-then-update"):

    o_i = f_{W^(n-1)}(q_i) for the tokens i of chunk n,   then for each W:
    g = dL_W/dW at W^(n-1) over chunk n,   M <- beta_n M + g,   u = NS5(M) (use_muon) or M,   W <- W - u,
    renorm: each column of W rescaled to its norm in the sequence's initial state (||W_col|| + 1e-5 below)

beta_n is the mean of the momentum gates over chunk n, as in the authors' code (momentum None: beta = 0, so the
buffers hold the last gradient). NS5 is Muon's Newton-Schulz orthogonalisation, five steps of the quintic
(3.4445, -4.7750, 2.0315) in fp32 (the authors' lact_llm code uses a per-step coefficient schedule instead). The
columns renorm keeps are the weights into one hidden unit (W0, W2) or one output unit (W1): the authors'
per-row norms of their transposed [F, K] / [V, F] weights. A final partial chunk is applied but not learned
from: its tokens wait in the state (`LaCTState`) until later calls complete it.

This module holds the chunk-by-chunk reference (gradients by `torch.func.grad`), the input checks and the
dispatching entry point; the torch path is `lact_chunk.py`.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ipl_layers._checks import (check_cu_seqlens, check_positive_int, check_qkv, check_shape, check_tensor,
                                sequence_spans)
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import lact_chunk as chunk
from ipl_layers.ops.chunking import pad_sequences
from ipl_layers.state import LaCTState

BACKENDS = ("reference", "torch")

InitialState = Union[LaCTState, Sequence[torch.Tensor]]


def _weight_shapes(N: int, H: int, K: int, V: int, Fd: int):
    """(name, shape, dims) of W0, W1, W2."""
    return (("W0", (N, H, K, Fd), "N, H, K, F"), ("W1", (N, H, Fd, V), "N, H, F, V"),
            ("W2", (N, H, K, Fd), "N, H, K, F"))


def _state_shapes(N: int, H: int, K: int, V: int, Fd: int, C: int):
    """(name, shape, dims) of every tensor field of a LaCTState but position."""
    weights = _weight_shapes(N, H, K, V, Fd)
    moments = tuple((f"M{name[1]}", shape, dims) for name, shape, dims in weights)
    return weights + moments + (
        ("norm0", (N, H, Fd), "N, H, F"), ("norm1", (N, H, V), "N, H, V"), ("norm2", (N, H, Fd), "N, H, F"),
        ("k", (N, C, H, K), "N, C, H, K"), ("v", (N, C, H, V), "N, C, H, V"), ("lr", (N, C, H, 3), "N, C, H, 3"),
        ("momentum", (N, C, H), "N, C, H"),
    )


def column_norms(W: torch.Tensor) -> torch.Tensor:
    """[..., R, S] -> [..., S]: the norm of each column, what renorm keeps."""
    return W.norm(dim=-2)


def as_state(initial_state, N: int, H: int, K: int, V: int, C: int, like: torch.Tensor) -> LaCTState:
    """A tuple (W0, W1, W2) of start weights, or a `LaCTState` (or the plain 14-tuple a cache round trip makes
    of one) -> a checked `LaCTState` in the compute dtype (fp32, float64 for float64 inputs)."""
    if initial_state is None:
        raise ValueError("initial_state: expected start weights (W0 [N, H, K, F], W1 [N, H, F, V], W2 [N, H, K, F]) "
                         "or a LaCTState, got None (at zero weights every gradient is zero: nothing is learned)")
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) not in (3, len(LaCTState._fields)):
        raise TypeError("initial_state: expected a LaCTState or a tuple (W0 [N, H, K, F], W1 [N, H, F, V], "
                        f"W2 [N, H, K, F]), got {type(initial_state).__name__}")
    check_tensor("initial_state W0", initial_state[0], 4, "N, H, K, F", like=like)
    Fd = initial_state[0].shape[-1]
    shapes = _state_shapes(N, H, K, V, Fd, C)
    for (name, shape, dims), x in zip(shapes, initial_state[: len(shapes)]):
        check_tensor(f"initial_state {name}", x, len(shape), dims, like=like)
        check_shape(f"initial_state {name}", x, shape, dims)
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    weights = [w.to(acc) for w in initial_state[:3]]
    if len(initial_state) == 3:  # the start of every sequence
        zeros = [like.new_zeros(shape, dtype=acc) for _, shape, _ in shapes[9:]]
        return LaCTState(*weights, *(torch.zeros_like(w) for w in weights), *(column_norms(w) for w in weights),
                         *zeros, torch.zeros(N, dtype=torch.long, device=like.device))
    position = initial_state[-1]
    if not isinstance(position, torch.Tensor) or position.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"initial_state position: expected an int32/int64 tensor [N], got {position!r}")
    check_shape("initial_state position", position, (N,), "N")
    if bool(((position < 0) | (position >= C)).any()):
        raise ValueError(f"initial_state position: expected values in [0, chunk_size = {C}), got {position.tolist()}")
    return LaCTState(*(x.to(acc) for x in initial_state[:-1]), position.to(device=like.device, dtype=torch.long))


def _check_inputs(q, k, v, lr, momentum, chunk_size, initial_state, cu_seqlens) -> Tuple[int, LaCTState]:
    """Checks every argument; returns the number of sequences N and the initial state."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_tensor("lr", lr, 4, "B, T, H, 3", like=q)
    check_shape("lr", lr, (B, T, H, 3), "B, T, H, 3")
    if momentum is not None:
        check_tensor("momentum", momentum, 3, "B, T, H", like=q)
        check_shape("momentum", momentum, (B, T, H), "B, T, H")
    check_positive_int("chunk_size", chunk_size)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    return N, as_state(initial_state, N, H, K, V, chunk_size, q)


def _orthogonalize(G: torch.Tensor) -> torch.Tensor:
    """Muon's Newton-Schulz iteration on each head's matrix G [H, R, S], written plainly."""
    X = G / (G.flatten(1).norm(dim=1)[:, None, None] + chunk.NS_EPS)
    for a, b, c in chunk.NS_COEFFICIENTS:
        A = X @ X.mT
        X = a * X + b * A @ X + c * A @ A @ X
    return X


def lact_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    *,
    chunk_size: int = 2048,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    momentum: Optional[torch.Tensor] = None,
    use_muon: bool = False,
    renorm: bool = True,
) -> Tuple[torch.Tensor, Optional[LaCTState]]:
    """Token by token for the outputs, chunk by chunk for the updates, written for clarity; the gradients by
    `torch.func.grad` of the loss. Runs in float64 when given float64 inputs."""
    B, T, H, K = q.shape
    C = chunk_size
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    spans = sequence_spans(B, T, cu_seqlens)
    init = as_state(initial_state, len(spans), H, K, v.shape[-1], C, q)

    def f(W, x):  # x [R, H, K] -> [R, H, V], each head with its own weights
        W0, W1, W2 = W
        return torch.einsum("rhf,hfv->rhv", F.silu(torch.einsum("rhk,hkf->rhf", x, W0))
                            * torch.einsum("rhk,hkf->rhf", x, W2), W1)

    def loss(W, x, y, rate):  # -sum_i rate_i <f(x_i), y_i>, summed over heads (each head's gradient is its own)
        return -(rate[..., None] * f(W, x) * y).sum()

    grads = [torch.func.grad(lambda W0, W1, W2, *a, i=i: loss((W0, W1, W2), *a), argnums=i) for i in range(3)]
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(spans):
        W = [x[n] for x in init[0:3]]  # [H, K, F], [H, F, V], [H, K, F]
        M = [x[n] for x in init[3:6]]
        norms = [x[n] for x in init[6:9]]
        p = int(init.position[n])
        buffer = [list(x[n, :p].unbind(0)) for x in init[9:13]]  # the open chunk's k, v, lr, momentum rows
        rows = [torch.zeros(0, H, v.shape[-1], dtype=acc, device=q.device)]
        for t in range(start, end):
            rows.append(f(W, q[row, t : t + 1].to(acc)))  # [1, H, V]: apply with the committed weights
            token = (k[row, t], v[row, t], lr[row, t], momentum[row, t] if momentum is not None else lr.new_zeros(H))
            for b, x in zip(buffer, token):
                b.append(x.to(acc))
            if len(buffer[0]) < C:
                continue
            kc, vc, lrc, mc = (torch.stack(b) for b in buffer)  # [C, H, *]: the chunk is complete
            beta = mc.mean(0) if momentum is not None else torch.zeros_like(mc[0])  # [H]
            for i in range(3):
                g = grads[i](*W, kc, vc, lrc[..., i])
                M[i] = beta[:, None, None] * M[i] + g
            updates = [_orthogonalize(m) for m in M] if use_muon else M
            W = [w - u for w, u in zip(W, updates)]
            if renorm:
                W = [w / (column_norms(w)[:, None] + chunk.RENORM_EPS) * n0[:, None] for w, n0 in zip(W, norms)]
            buffer = [[] for _ in buffer]
        outputs.append(torch.cat(rows))  # [T_n, H, V]
        opened = [torch.stack(b) if b else init[9 + j][n, :0] for j, b in enumerate(buffer)]
        padded = [torch.cat([x, x.new_zeros(C - x.shape[0], *x.shape[1:])]) for x in opened]  # [C, H, *]
        finals.append((*W, *M, *norms, *padded, len(buffer[0])))
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    if not output_final_state:
        return o.to(v.dtype), None
    *tensors, position = zip(*finals)
    return o.to(v.dtype), LaCTState(*(torch.stack(x) for x in tensors),
                                    torch.tensor(position, dtype=torch.long, device=q.device))


def lact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    *,
    chunk_size: int = 2048,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    momentum: Optional[torch.Tensor] = None,
    use_muon: bool = False,
    renorm: bool = True,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[LaCTState]]:
    """LaCT: the SwiGLU fast weight's outputs on q, learning from (k, v) once per chunk; see the module docstring.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (the fast weight maps K to V).
        lr: [B, T, H, 3] per-token learning rates of W0, W1, W2 (non-negative: the layer uses softplus).
        chunk_size: tokens per update, counted from the start of each sequence across calls.
        initial_state: the start weights (W0 [N, H, K, F], W1 [N, H, F, V], W2 [N, H, K, F]; their column norms
            become the renorm targets), or a `LaCTState` from an earlier call; required, differentiable.
        output_final_state: also return the state after the last token.
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        momentum: [B, T, H] per-token momentum gates in [0, 1), or None (no momentum).
        use_muon: orthogonalise each update (Newton-Schulz, 5 steps). renorm: keep the columns' initial norms.
        backend: "torch" (batched chunks, the CPU path) or "reference". Default: `IPL_BACKEND`, else "torch" on
            CPU; CUDA tensors need an explicit backend until the Triton kernels exist.

    Returns:
        o: [B, T, H, V] in the dtype of v; final_state: None, or a `LaCTState` in fp32 (float64 for float64 inputs).
    """
    N, state = _check_inputs(q, k, v, lr, momentum, chunk_size, initial_state, cu_seqlens)
    name = resolve_backend("lact", backend, q.device, BACKENDS)
    flags = dict(use_muon=use_muon, renorm=renorm)
    if name == "reference":
        return lact_reference(q, k, v, lr, chunk_size=chunk_size, initial_state=state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens, momentum=momentum, **flags)
    C = chunk_size
    if q.shape[1] == 1 and cu_seqlens is None:  # decoding: apply, buffer, and update where a chunk completes
        o, fields = chunk.decode_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], None if momentum is None else momentum[:, 0],
                                      state, C, **flags)
        return o[:, None].to(v.dtype), (LaCTState(*fields) if output_final_state else None)
    lengths = torch.diff(cu_seqlens.long()) if cu_seqlens is not None else state.position.new_full((N,), q.shape[1])
    ends = state.position + lengths.to(state.position.device)  # [N]: tokens each sequence's rows cover
    # each sequence continues its open chunk: as many empty rows in front as it buffers align its chunks to
    # the grid, and `chunk_forward` fills them from the buffers
    front = state.position if bool(state.position.any()) else None
    (qp, kp, vp, lrp, mp), unpad = pad_sequences([q, k, v, lr, momentum], cu_seqlens, C, front=front)
    o, final, opened = chunk.chunk_forward(qp, kp, vp, lrp, mp, state, ends, C, need_final=output_final_state,
                                           **flags)
    o = unpad(o).to(v.dtype)
    return o, (LaCTState(*final, *state[6:9], *opened, ends % C) if output_final_state else None)
