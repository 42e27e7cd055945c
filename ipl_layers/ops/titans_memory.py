"""`titans_memory`: the long-term neural memory of Titans (Behrouz et al. 2025), an MLP learning at test time
with momentum and forgetting.

Per sequence and head the memory is an MLP of depth L >= 1, M(x) = gelu(..gelu(x W_1)..) W_L (exact GELU, no
biases, widths K -> F -> .. -> F -> V, F = expand * K; L = 1 is the linear map x W_1), optionally wrapped as
x + LN(MLP(x)) (`use_residual`, `use_ln`, LN over V with per-head gamma/beta). It learns from the associative
loss l(M; k, v) = ||M(k) - v||^2 with data-dependent step size theta_t >= 0, momentum eta_t in [0, 1] and
forgetting alpha_t in [0, 1]:

    S_t = eta_t S_t-1 - theta_t grad l(M_c; k_t, v_t),     M_t = (1 - alpha_t) M_t-1 + S_t,     y_t = M_t(q_t)

for every weight matrix. The causality, exactly (the reference implements it token by token):
- tokens are grouped into chunks of `chunk_size` counted from the start of each sequence (continuing across
  calls through the state's position); every gradient in a chunk is taken at M_c, the weights the chunk
  started from (Titans' chunked training form; chunk_size = 1 is the fully sequential memory);
- momentum and forgetting still advance token by token, so M_t differs from token to token inside a chunk;
- retrieval y_t reads M_t, the weights after token t's own update (the in-chunk correction is exact: the
  torch path's dual form in `titans_chunk.py`).
With L = 1 and no wrapper, eta = alpha = 0 and chunk_size = 1 this is the delta rule with beta = 2 theta and
scale 1 (a test checks it).

`normalize_step` (the layers' default; off in the op, which is the paper's memory) divides each token's step by
one plus the curvature of its loss seen along its error, as normalised LMS does for a linear filter:

    theta_t  ->  theta_t / (1 + 2 rho_t),    rho_t = sum_l |x_l|^2 |d_l|^2 / |d_L|^2

with x_l the input of layer l and d_l the loss gradient at its output, both at the weights the token takes its
gradient at (so |u_l| = |x_l| |d_l|), d_L the gradient at the memory's last output before the wrapper. With J the
Jacobian of that output in the weights, rho_t = |J^T d_L|^2 / |d_L|^2: without LN (d_L = 2 r, r the error
M(k_t) - t_t) a step of theta along u_t moves the linearised error to r - 2 theta J J^T r, whose component along
r is (1 - 2 rho_t theta) r. Scaled, one step removes the fraction theta_t 2 rho_t / (1 + 2 rho_t) < theta_t of the
error along itself whatever the scale of the activations, so an MLP memory whose hidden activations grow cannot
overshoot; unscaled, a step's effect grows with |x_L|^2, and a trained 4-layer model of these memories diverged
to NaN (README, Titans). The scale is part of the op: the gradients flow through it.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers._checks import (check_cu_seqlens, check_positive_int, check_qkv, check_shape, check_tensor,
                                 sequence_spans)
from ipl_layers.backend import resolve_backend
from ipl_layers.ops import titans_chunk as chunk
from ipl_layers.ops.chunking import pad_sequences
from ipl_layers.ops.ttt_linear_chunk import layer_norm
from ipl_layers.state import TitansState

BACKENDS = ("reference", "torch")

InitialState = Union[TitansState, Sequence[torch.Tensor]]


def layer_dims(K: int, V: int, F_: int, depth: int):
    """(d_in, d_out) of each of the depth layers: K -> F -> .. -> F -> V (K -> V for depth 1)."""
    dims = (K, *([F_] * (depth - 1)), V)
    return list(zip(dims[:-1], dims[1:]))


def as_state(initial_state, N: int, H: int, K: int, V: int, like: torch.Tensor) -> Optional[TitansState]:
    """None, a tuple of L weight matrices [N, H, d_in, d_out] (at a chunk boundary: momentum zero), or a
    `TitansState` (or the plain tuple of 3 L + 1 tensors a cache round trip makes of one) -> a checked
    `TitansState`."""
    if initial_state is None:
        return None
    if not isinstance(initial_state, (tuple, list)) or not initial_state or \
            not all(isinstance(x, torch.Tensor) for x in initial_state):
        raise TypeError("initial_state: expected a TitansState or a tuple of the memory's weight matrices "
                        f"[N, H, d_in, d_out], got {type(initial_state).__name__}")
    boundary = len(initial_state) % 3 != 1 or initial_state[-1].is_floating_point()
    if not boundary and len(initial_state) < 4:
        raise TypeError("initial_state: expected a TitansState or a tuple of the memory's floating weight "
                        f"matrices [N, H, d_in, d_out], got {len(initial_state)} tensors ending in "
                        f"{initial_state[-1].dtype}")
    L = len(initial_state) if boundary else (len(initial_state) - 1) // 3
    matrices = initial_state if boundary else initial_state[:-1]
    F_ = matrices[0].shape[-1] if L > 1 else K
    for i, (x, dims) in enumerate(zip(matrices, layer_dims(K, V, F_, L) * (1 if boundary else 3))):
        name = f"initial_state[{i}]"
        check_tensor(name, x, 4, "N, H, d_in, d_out", like=like)
        check_shape(name, x, (N, H, *dims), "N, H, d_in, d_out")
    if boundary:
        return TitansState.of(matrices, [torch.zeros_like(x) for x in matrices], matrices,
                              torch.zeros(N, dtype=torch.long, device=like.device))
    position = initial_state[-1]
    if position.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"initial_state position: expected an int32/int64 tensor [N], got dtype {position.dtype}")
    check_shape("initial_state position", position, (N,), "N")
    return TitansState(*matrices, position.to(device=like.device, dtype=torch.long))


def _check_inputs(q, k, v, theta, eta, alpha, ln_weight, ln_bias, chunk_size, depth, expand, initial_state,
                  cu_seqlens, use_residual):
    """Checks every argument; returns N and the initial state as a TitansState (zeros where not given; the
    start weights of sequences at a chunk boundary as given: `_at_boundaries` sets them)."""
    B, T, H, K, V = check_qkv(q, k, v)
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        check_tensor(name, x, 3, "B, T, H", like=q)
        check_shape(name, x, (B, T, H), "B, T, H")
    for name, x in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if x is not None:
            check_tensor(name, x, 2, "H, V", like=q)
            check_shape(name, x, (H, V), "H, V")
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("depth", depth)
    check_positive_int("expand", expand)
    if use_residual and V != K:
        raise ValueError(f"v: use_residual adds the query to the memory's output, so V must equal K = {K}, got V = {V}")
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    state = as_state(initial_state, N, H, K, V, q)
    if state is None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        zeros = [q.new_zeros(N, H, *dims, dtype=acc) for dims in layer_dims(K, V, expand * K, depth)]
        return N, TitansState.of(zeros, zeros, zeros, torch.zeros(N, dtype=torch.long, device=q.device))
    if bool(((state.position < 0) | (state.position >= chunk_size)).any()):
        raise ValueError(f"initial_state position: expected values in [0, chunk_size = {chunk_size}), "
                         f"got {state.position.tolist()}")
    return N, state


def _at_boundaries(state: TitansState, in_place: bool = False) -> TitansState:
    """A sequence at a chunk boundary takes its next gradients at its weights (its start entries are not read):
    the state with those start entries set to the weights, in new tensors or (`in_place`) over the start's."""
    if in_place:
        rows = (state.position == 0).nonzero().squeeze(-1)  # [n] sequences at a boundary
        for s, w in zip(state.start, state.weights):
            s.index_copy_(0, rows, w.index_select(0, rows))
        return state
    boundary = (state.position == 0).view(-1, 1, 1, 1)
    start = [torch.where(boundary, w, s) for s, w in zip(state.start, state.weights)]
    return TitansState.of(start, state.momentum, state.weights, state.position)


def _ln_params(q, v, ln_weight, ln_bias):
    _, _, H, V = v.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_ones(H, V, dtype=acc) if ln_weight is None else ln_weight,
            q.new_zeros(H, V, dtype=acc) if ln_bias is None else ln_bias)


def titans_memory_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    *,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    depth: int = 2,
    expand: int = 4,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = False,
    use_residual: bool = False,
    normalize_step: bool = False,
) -> Tuple[torch.Tensor, Optional[TitansState]]:
    """Token by token, written to read like the equations; gradients by `torch.func.grad` of the loss. Runs
    in float64 when given float64 inputs."""
    N, init = _check_inputs(q, k, v, theta, eta, alpha, ln_weight, ln_bias, chunk_size, depth, expand,
                            initial_state, cu_seqlens, use_residual)
    init = _at_boundaries(init)
    B, T, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    gamma, beta = (x.to(acc) for x in _ln_params(q, v, ln_weight, ln_bias))

    def last_output(weights, x):  # [H, K] -> the last layer's output [H, V] (before the wrapper's LN)
        for l, W in enumerate(weights):
            x = torch.einsum("hi,hio->ho", x if l == 0 else F.gelu(x), W)
        return x

    def memory(weights, x):  # [H, K] -> M(x) [H, V], each head through its own weights
        z = last_output(weights, x)
        return layer_norm(z, gamma, beta) if use_ln else z

    def loss_at_output(z, x, target):  # the loss as a function of the last layer's output z [H, V]
        out = layer_norm(z, gamma, beta) if use_ln else z
        return ((out + x if use_residual else out) - target).pow(2).sum()

    def loss(weights, x, target):  # summed over heads: its gradient in each head's weights is that head's own
        return loss_at_output(last_output(weights, x), x, target)

    grad = torch.func.grad(loss)
    tiny = torch.finfo(acc).tiny
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(sequence_spans(B, T, cu_seqlens)):
        Mc, S, M = ([x[n].to(acc) for x in part] for part in (init.start, init.momentum, init.weights))
        i = int(init.position[n])
        rows = [q.new_zeros(0, H, v.shape[-1], dtype=acc)]
        for t in range(start, end):
            qt, kt, vt = q[row, t].to(acc), k[row, t].to(acc), v[row, t].to(acc)  # [H, K], [H, K], [H, V]
            th, et, al = (x[row, t].to(acc).view(H, 1, 1) for x in (theta, eta, alpha))
            u = grad(tuple(Mc), kt, vt)  # the gradient at the chunk's start weights
            if normalize_step:  # |u_l|^2 = |x_l|^2 |d_l|^2 per head; d_L the gradient at the last output
                d_last = torch.func.grad(loss_at_output)(last_output(Mc, kt), kt, vt)  # [H, V]
                rho = sum(x.pow(2).sum((1, 2)) for x in u) / d_last.pow(2).sum(-1).clamp_min(tiny)  # [H]
                th = th / (1 + 2 * rho).view(H, 1, 1)
            S = [et * s - th * g for s, g in zip(S, u)]
            M = [(1 - al) * w + s for w, s in zip(M, S)]
            out = memory(M, qt)  # retrieval after the token's own update
            rows.append((out + qt if use_residual else out)[None])
            i += 1
            if i == chunk_size:  # the chunk ends: the next one takes its gradients here
                Mc, i = list(M), 0
        outputs.append(torch.cat(rows))  # [T_n, H, V]
        finals.append((Mc, S, M, i))
    o = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    if not output_final_state:
        return o.to(v.dtype), None
    parts = [[torch.stack([f[p][l] for f in finals]) for l in range(init.depth)] for p in range(3)]
    return o.to(v.dtype), TitansState.of(*parts, torch.tensor([f[3] for f in finals], dtype=torch.long,
                                                                device=q.device))


def titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    *,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    depth: int = 2,
    expand: int = 4,
    initial_state: Optional[InitialState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_ln: bool = False,
    use_residual: bool = False,
    normalize_step: bool = False,
    update_state_in_place: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[TitansState]]:
    """The Titans memory's retrievals on q while it learns from (k, v); see the module docstring.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        theta: [B, T, H] step sizes (>= 0); eta: [B, T, H] momentum (in [0, 1]); alpha: [B, T, H] forgetting
            (in [0, 1]; 1 - alpha is the fraction of the weights kept).
        ln_weight, ln_bias: [H, V] gamma/beta of the wrapper's LN (default ones/zeros; unused without `use_ln`).
        chunk_size: tokens whose gradients share the chunk's start weights (counted from each sequence's start).
        depth, expand: L and F = expand * K of the memory MLP when there is no initial state (else read from it).
        initial_state: None (zeros: an MLP of depth >= 2 at zero weights gets zero gradients, so pass start
            weights), a tuple of the L weight matrices [N, H, d_in, d_out] (momentum zero), or a `TitansState`
            from an earlier call (at position 0 its start weights are not read: they are the weights); all
            differentiable.
        output_final_state: also return the state after the last token (a `TitansState`, fp32; float64 for
            float64 inputs).
        cu_seqlens: [N+1] offsets of sequences packed along T (requires B == 1); empty ones allowed.
        use_ln, use_residual: the wrapper x + LN(MLP(x)) (the residual needs V == K).
        normalize_step: divide each token's theta by 1 + its loss's curvature along its gradient (module
            docstring): one step never removes more than theta of the token's error.
        update_state_in_place: when the call is a fused C++ decoding step (below) and initial_state is a
            `TitansState` of fp32, contiguous tensors that share no memory, write the new matrices over them
            (the returned state holds them, and a new position) instead of allocating new ones: a cache's own state, decoded token
            after token. Otherwise, or with the flag off, initial_state is left unchanged.
        backend: "torch" (the chunked form, the CPU path; one token per sequence without autograd runs the
            fused C++ step of `ipl_layers._C` when it is built) or "reference". Default: `IPL_BACKEND`, else
            "torch" on CPU; CUDA tensors need an explicit backend until the Triton kernels exist.

    Returns:
        o: [B, T, H, V] in the dtype of v; final_state: None or a `TitansState`.
    """
    N, init = _check_inputs(q, k, v, theta, eta, alpha, ln_weight, ln_bias, chunk_size, depth, expand,
                            initial_state, cu_seqlens, use_residual)
    name = resolve_backend("titans_memory", backend, q.device, BACKENDS)
    flags = dict(use_ln=use_ln, use_residual=use_residual, normalize_step=normalize_step)
    if name == "reference":
        return titans_memory_reference(
            q, k, v, theta, eta, alpha, ln_weight=ln_weight, ln_bias=ln_bias, chunk_size=chunk_size,
            initial_state=init, output_final_state=output_final_state, cu_seqlens=cu_seqlens, **flags,
        )
    C = chunk_size
    if q.shape[1] == 1 and cu_seqlens is None:  # decoding: one token per sequence, no [C, C] grids
        ln = _ln_params(q, v, ln_weight, ln_bias)
        tokens = (q[:, 0], k[:, 0], v[:, 0], theta[:, 0], eta[:, 0], alpha[:, 0])
        fused = _ext.step_applies(q, init.weights[0], None, k, v, theta, eta, alpha, *ln, *init[:-1])
        in_place = update_state_in_place and fused and _ext.in_place_applies(init[:-1])
        init = _at_boundaries(init, in_place)
        state = (init.start, init.momentum, init.weights, init.position)
        if fused:  # the fused C++ step (fp32) on CPU without autograd
            o, (start, momentum, weights, position) = _ext.titans_step(*tokens, *ln, state, C, **flags,
                                                                        in_place=in_place)
            o = o.to(v.dtype)
        else:
            o, (start, momentum, weights, position) = chunk.step(*tokens, *ln, state, C, **flags)
        return o[:, None], (TitansState.of(start, momentum, weights, position) if output_final_state else None)
    init = _at_boundaries(init)
    lengths = torch.diff(cu_seqlens.long()) if cu_seqlens is not None else init.position.new_full((N,), q.shape[1])
    ends = init.position + lengths.to(init.position.device)  # [N]: positions covered in the padded grid
    # padding rows: theta = 0, eta = 1, alpha = 0 and mask 0 leave S and M as they are; `position` rows in
    # front line each sequence's chunks up with the grid
    (qp, kp, vp, thp, etp, alp, m), unpad = pad_sequences(
        [q, k, v, theta, eta, alpha, torch.ones_like(theta)], cu_seqlens, C, front=init.position,
    )
    etp = torch.where(m > 0, etp, torch.ones_like(etp))
    ln_weight, ln_bias = _ln_params(q, v, ln_weight, ln_bias)
    o, (start, momentum, weights) = chunk.chunk_forward(
        qp, kp, vp, thp, etp, alp, m, ln_weight, ln_bias, (init.start, init.momentum, init.weights), ends, C, **flags,
    )
    final = TitansState.of(start, momentum, weights, ends % C) if output_final_state else None
    return unpad(o), final
