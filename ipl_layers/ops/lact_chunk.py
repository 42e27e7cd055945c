"""The torch path of `lact`: every (sequence, head) pair batched, one chunk at a time, closed-form gradients.

Per chunk the work is a handful of `[N*H, C, K] @ [N*H, K, F]`-shaped matmuls (C = chunk_size, thousands of
rows), so the loop over chunks is short and matmul-bound; autograd differentiates it (it saves per chunk
the weights and the `[C, F]` activations, a small fraction of the inputs at large C).

With the weights in row-vector orientation (W0, W2 [K, F], W1 [F, V]; f(x) = (silu(x W0) * (x W2)) W1), the
gradients of L = -sum_i lr_i <f(k_i), v_i> over a chunk with keys X [C, K] and values Y [C, V] are

    A = X W0, Z = X W2, S = silu(A), Hd = S * Z                       [C, F]
    D = Y W1^T                                                        [C, F]: dL/dHd up to the sign and lr
    g1 = -(lr1 * Hd)^T Y,  g2 = -(lr2 * X)^T (D * S),  g0 = -(lr0 * X)^T (D * Z * silu'(A))

with silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))). The update of each weight is then
M <- beta M + g (beta: the chunk's mean momentum gate), u = NS5(M) with Muon, else M; W <- W - u, and with
renorm each column of W (the weights into one hidden or output unit) is rescaled to its initial norm.
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

# Newton-Schulz quintic coefficients (a, b, c) of Muon (Jordan et al. 2024), five steps; see `lact.py`.
NS_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),) * 5
NS_EPS = 1e-7  # X / (||X||_F + eps) before the iterations, as in the authors' code
RENORM_EPS = 1e-5  # W / (||W_col|| + eps) * norm0, as in the authors' code


def newton_schulz(G: torch.Tensor, coefficients: Sequence[Tuple[float, float, float]] = NS_COEFFICIENTS) -> torch.Tensor:
    """Muon's orthogonalisation of a batch of matrices [..., R, S]: X = G / ||G||_F, then X <- a X + b (X X^T) X
    + c (X X^T)^2 X per step, on the smaller Gram side (the map commutes with transposition)."""
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    for a, b, c in coefficients:
        A = X @ X.mT  # [..., R, R]
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


def swiglu(x: torch.Tensor, W0: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """f(x) = (silu(x W0) * (x W2)) W1 on batched rows: x [P, R, K], W0/W2 [P, K, F], W1 [P, F, V] -> [P, R, V]."""
    return (F.silu(x @ W0) * (x @ W2)) @ W1


def chunk_update(weights, moments, norms, X, Y, lr, beta, use_muon: bool, renorm: bool):
    """One chunk's update of (W0, W1, W2) [P, K, F], [P, F, V], [P, K, F] with momentum buffers `moments` (same
    shapes), from keys X [P, C, K], values Y [P, C, V], learning rates lr [P, C, 3] and momentum gate beta [P]
    (None: no momentum). `norms` [P, F], [P, V], [P, F] are the column norms renorm restores. Returns the new
    weights and momentum buffers."""
    W0, W1, W2 = weights
    A, Z = X @ W0, X @ W2  # [P, C, F]
    sig = torch.sigmoid(A)
    S = A * sig
    D = Y @ W1.mT  # [P, C, F]
    DS = D * S
    DA = D * Z * (sig * (1 + A * (1 - sig)))
    g1 = -(((S * Z) * lr[..., 1:2]).mT @ Y)  # [P, F, V]
    g0 = -((X * lr[..., 0:1]).mT @ DA)  # [P, K, F]
    g2 = -((X * lr[..., 2:3]).mT @ DS)  # [P, K, F]
    grads = (g0, g1, g2)
    if beta is not None:
        grads = tuple(g + beta[:, None, None] * m for g, m in zip(grads, moments))
    steps = tuple(newton_schulz(g) for g in grads) if use_muon else grads
    new = tuple(w - u for w, u in zip(weights, steps))
    if renorm:
        new = tuple(w / (w.norm(dim=-2, keepdim=True) + RENORM_EPS) * n[:, None] for w, n in zip(new, norms))
    return new, grads


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[N, H, *] -> [N * H, *]."""
    return x.flatten(0, 1)


def chunk_forward(qp, kp, vp, lrp, mp, state, ends: torch.Tensor, C: int, use_muon: bool, renorm: bool,
                  need_final: bool):
    """The padded sequences [N, Tp, H, *] (Tp a multiple of C; mp None without momentum) and `state` (a
    LaCTState in the compute dtype) whose open chunks' rows fill the first `state.position` rows of each sequence;
    `ends` [N]: the rows each sequence covers (open chunk + this call). Returns o [N, Tp, H, V], the final weights
    and momentum buffers, and (with `need_final`) the new open chunks' k, v, lr, momentum [N, C, H, *].

    Chunk j is applied with the weights after chunk j-1; it updates them only where it is complete (its end
    <= ends[n]): a sequence's last partial chunk stays open. Without `need_final`, the update after the last
    chunk is skipped: no output reads it."""
    N, Tp, H, K = qp.shape
    NC = Tp // C
    dtype = state[0].dtype

    def chunks(x):  # [N, Tp, H, *] -> [N * H, NC, C, *]
        return _heads_first(x.to(dtype).unflatten(1, (NC, C)).movedim(3, 1))

    mom_buffer = state.momentum if mp is not None else None
    q, k, v, lr, mom = (None if x is None else chunks(x) for x in (qp, kp, vp, lrp, mp))
    buffered = state.position.repeat_interleave(H)  # [N * H]
    if bool(buffered.any()):  # the open chunks' rows, in front of this call's tokens in chunk 0
        front = (torch.arange(C, device=qp.device)[None] < buffered[:, None])  # [N * H, C]
        firsts = []
        for x, b in zip((k, v, lr, mom), (state.k, state.v, state.lr, mom_buffer)):
            if x is not None:
                b = _heads_first(b.movedim(2, 1))  # [N * H, C, *]
                firsts.append(torch.where(front.view(*front.shape, *[1] * (b.dim() - 2)), b, x[:, 0]))
            else:
                firsts.append(None)
    else:
        firsts = [None if x is None else x[:, 0] for x in (k, v, lr, mom)]
    weights = tuple(_heads_first(w) for w in state[0:3])
    moments = tuple(_heads_first(m) for m in state[3:6])
    norms = tuple(_heads_first(n) for n in state[6:9])
    complete = ((torch.arange(1, NC + 1, device=ends.device) * C)[None] <= ends[:, None])  # [N, NC]
    complete = complete.repeat_interleave(H, 0)  # [N * H, NC]
    n_updates = NC if need_final else NC - 1
    outputs = []
    for j in range(NC):
        outputs.append(swiglu(q[:, j], *weights))  # [N * H, C, V]
        if j >= n_updates or not bool(complete[:, j].any()):
            continue
        kj, vj, lrj, mj = firsts if j == 0 else (None if x is None else x[:, j] for x in (k, v, lr, mom))
        beta = None if mj is None else mj.mean(-1)  # [N * H]: the chunk's mean momentum gate
        new = chunk_update(weights, moments, norms, kj, vj, lrj, beta, use_muon, renorm)
        if bool(complete[:, j].all()):
            weights, moments = new
        else:  # sequences whose chunk j is partial (or padding) keep their weights
            keep = complete[:, j, None, None]
            weights, moments = (tuple(torch.where(keep, x, y) for x, y in zip(xs, ys))
                                for xs, ys in zip(new, (weights, moments)))
    o = torch.stack(outputs, 1).unflatten(0, (N, H)).movedim(1, 3).flatten(1, 2)  # [N, Tp, H, V]
    final = tuple(w.unflatten(0, (N, H)) for w in (*weights, *moments))
    if not need_final:
        return o, final, None
    opened = []
    for x, first, b in zip((k, v, lr, mom), firsts, state[9:13]):
        if x is None:
            opened.append(torch.zeros_like(b))
            continue
        x = torch.cat([first[:, None], x[:, 1:]], 1) if NC > 1 else first[:, None]  # [N * H, NC, C, *]
        opened.append(open_chunk(x.unflatten(0, (N, H)), ends, C))
    return o, final, tuple(opened)


def open_chunk(x: torch.Tensor, ends: torch.Tensor, C: int) -> torch.Tensor:
    """The rows of each sequence's last, partial chunk: [N, H, NC, C, *] -> [N, C, H, *], rows past `ends` zero
    (all of them when ends % C == 0: the chunk after the last)."""
    N, H, NC = x.shape[:3]
    index = ends // C  # [N]
    rows = x[torch.arange(N, device=x.device), :, index.clamp(max=NC - 1)]  # [N, H, C, *]
    live = (torch.arange(C, device=x.device)[None] < (ends % C)[:, None])  # [N, C]
    return torch.where(live.view(N, 1, C, *[1] * (x.dim() - 4)), rows, 0.0).movedim(1, 2)


def decode_step(q, k, v, lr, mom, state, C: int, use_muon: bool, renorm: bool):
    """One token per sequence, q, k [N, H, K], v [N, H, V], lr [N, H, 3], mom [N, H] or None, against the
    state's fields in the compute dtype: the output from the committed weights, the token appended to the
    open chunk, and the chunk's update where it is now complete. Returns o [N, H, V] and the new fields."""
    N, H, K = q.shape
    dtype = state[0].dtype
    weights, moments, norms = state[0:3], state[3:6], state[6:9]
    o = swiglu(q.to(dtype).unsqueeze(2).flatten(0, 1), *(_heads_first(w) for w in weights))  # [N * H, 1, V]
    position = state[13]
    at = (torch.arange(C, device=q.device)[None] == position[:, None])  # [N, C]: the token's row
    token = (k, v, lr, torch.zeros(N, H, dtype=dtype, device=q.device) if mom is None else mom)
    buffers = tuple(torch.where(at.view(N, C, *[1] * (b.dim() - 2)), t.to(dtype)[:, None], b)
                    for t, b in zip(token, state[9:13]))
    full = position + 1 == C  # [N]
    if bool(full.any()):
        kb, vb, lrb, mb = (_heads_first(b.movedim(2, 1)) for b in buffers)  # [N * H, C, *]
        beta = None if mom is None else mb.mean(-1)
        new_w, new_m = chunk_update(tuple(_heads_first(w) for w in weights), tuple(_heads_first(m) for m in moments),
                                    tuple(_heads_first(n) for n in norms), kb, vb, lrb, beta, use_muon, renorm)
        keep = full.view(N, 1, 1, 1)
        weights = tuple(torch.where(keep, x.unflatten(0, (N, H)), y) for x, y in zip(new_w, weights))
        moments = tuple(torch.where(keep, x.unflatten(0, (N, H)), y) for x, y in zip(new_m, moments))
        buffers = tuple(torch.where(full.view(N, *[1] * (b.dim() - 1)), torch.zeros_like(b), b) for b in buffers)
    return o.unflatten(0, (N, H))[:, :, 0], (*weights, *moments, *norms, *buffers, (position + 1) % C)
