"""The torch path of `lact`: every (sequence, head) pair batched, one chunk at a time, closed-form gradients.

Per chunk the work is a handful of `[N*H, C, K] @ [N*H, K, F]`-shaped matmuls (C = chunk_size, thousands of
rows), so the loop over chunks is short and matmul-bound. Each chunk's apply and gradient steps are autograd
Functions with hand-written backwards; autograd composes them across chunks (saving per chunk the weights and
three `[C, F]` pre-activations).

With the weights in row-vector orientation (W0, W2 [K, F], W1 [F, V]; f(x) = (silu(x W0) * (x W2)) W1), the
gradients of L = -sum_i lr_i <f(k_i), v_i> over a chunk with keys X [C, K] and values Y [C, V] are

    A = X W0, Z = X W2, S = silu(A), Hd = S * Z                       [C, F]
    D = Y W1^T                                                        [C, F]: dL/dHd up to the sign and lr
    g1 = -(lr1 * Hd)^T Y,  g2 = -(lr2 * X)^T (D * S),  g0 = -(lr0 * X)^T (D * Z * silu'(A))

with silu'(a) = sigmoid(a) (1 + a - silu(a)). The update of each weight is then
M <- beta M + g (beta: the chunk's mean momentum gate), u = NS5(M) with Muon, else M; W <- W - u, and with
renorm each column of W (the weights into one hidden or output unit) is rescaled to its initial norm.
"""

import torch
import torch.nn.functional as F

# Newton-Schulz quintic coefficients (a, b, c) of Muon (Jordan et al. 2024), five steps; see `lact.py`.
NS_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),) * 5
NS_EPS = 1e-7  # X / (||X||_F + eps) before the iterations, as in the authors' code
RENORM_EPS = 1e-5  # W / (||W_col|| + eps) * norm0, as in the authors' code


def newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalisation of a batch of matrices [..., R, S]: X = G / ||G||_F, then X <- a X + b (X X^T) X
    + c (X X^T)^2 X per step, on the smaller Gram side (the map commutes with transposition)."""
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + NS_EPS)
    for a, b, c in NS_COEFFICIENTS:
        A = X @ X.mT  # [..., R, R]
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


def swiglu(x: torch.Tensor, W0: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, scratch: "Scratch") -> torch.Tensor:
    """f(x) = (silu(x W0) * (x W2)) W1 on batched rows: x [P, R, K], W0/W2 [P, K, F], W1 [P, F, V] -> [P, R, V]."""
    return LaCTApplyFunction.apply(x, W0, W1, W2, scratch)


class Scratch:
    """Temporaries of the chunk Functions, allocated once per op call and reused by every chunk, forward and
    backward: a fresh [P, C, F] tensor per elementwise step writes to cold memory each time (measured 5-20%
    of the forward+backward at T = 8192, C = 2048). Nothing held here is ever returned or saved for backward."""

    def __init__(self):
        self._buffers = {}

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The buffer `name`, with the shape, dtype and device of `like` (contents undefined)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf


# The two Functions below save their pre-activations (x W0, x W2, and v W1^T for the gradients: [P, C, F] each,
# small beside the chunk's matmuls), keep every other [P, C, F] temporary in the call's `Scratch`, and run their
# elementwise steps in place. The backward never writes into saved tensors (it may run more than once).


class LaCTApplyFunction(torch.autograd.Function):
    """f(x) = (silu(x W0) * (x W2)) W1 with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, W0, W1, W2, scratch):
        A, Z = x @ W0, x @ W2  # [P, R, F]
        ctx.save_for_backward(x, W0, W1, W2, A, Z)
        ctx.scratch = scratch
        h = torch.sigmoid(A, out=scratch("apply_h", A)).mul_(A).mul_(Z)  # silu(A) * Z
        return h @ W1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        x, W0, W1, W2, A, Z = ctx.saved_tensors
        scratch = ctx.scratch
        sig = torch.sigmoid(A, out=scratch("apply_sig", A))
        S = torch.mul(A, sig, out=scratch("apply_S", A))
        dH = torch.bmm(do, W1.mT, out=scratch("apply_dH", A))  # [P, R, F]
        dW1 = torch.mul(S, Z, out=scratch("apply_SZ", A)).mT @ do
        dA = torch.mul(dH, Z, out=scratch("apply_SZ", A))  # d silu(A), times silu'(A) = sig (1 + A - silu(A))
        dZ = S.mul_(dH)  # d(x W2) = dH * silu(A), in S's memory
        dA.mul_(dH.copy_(A).mul_(sig).neg_().add_(A).add_(1).mul_(sig))
        dx = (dA @ W0.mT).baddbmm_(dZ, W2.mT)
        return dx, x.mT @ dA, dW1, x.mT @ dZ, None


class LaCTGradFunction(torch.autograd.Function):
    """The chunk gradients (g0, g1, g2) of the module docstring from (W0, W1, W2, X, Y, lr), with a hand-written
    backward."""

    @staticmethod
    def forward(ctx, W0, W1, W2, X, Y, lr, scratch):
        lr0, lr1, lr2 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]  # [P, C, 1]
        A, Z = X @ W0, X @ W2  # [P, C, F]
        D = Y @ W1.mT  # [P, C, F]
        ctx.save_for_backward(W0, W1, W2, X, Y, lr, A, Z, D)
        ctx.scratch = scratch
        sig = torch.sigmoid(A, out=scratch("sig", A))
        S = torch.mul(A, sig, out=scratch("S", A))
        T = torch.mul(S, Z, out=scratch("T", A)).mul_(lr1)
        g1 = T.mT @ Y  # [P, F, V], negated below
        Xs = torch.mul(X, lr2, out=scratch("Xs", X))  # [P, C, K]
        g2 = Xs.mT @ torch.mul(D, S, out=T)
        S.neg_().add_(A).add_(1).mul_(sig)  # silu'(A) = sigmoid(A) (1 + A - silu(A)), in S's memory
        E = torch.mul(D, Z, out=T).mul_(S)  # D Z silu'(A)
        g0 = torch.mul(X, lr0, out=Xs).mT @ E
        return g0.neg_(), g1.neg_(), g2.neg_()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G0, G1, G2):
        W0, W1, W2, X, Y, lr, A, Z, D = ctx.saved_tensors
        scratch = ctx.scratch
        lr0, lr1, lr2 = lr[..., 0:1], lr[..., 1:2], lr[..., 2:3]  # [P, C, 1]
        nG0, nG1, nG2 = -G0, -G1, -G2  # the forward's minus signs, on the small matrices
        sig = torch.sigmoid(A, out=scratch("sig", A))
        S = torch.mul(A, sig, out=scratch("S", A))
        P = torch.sub(A, S, out=scratch("P", A)).add_(1).mul_(sig)  # silu'(A)
        DZ = torch.mul(D, Z, out=scratch("DZ", A))
        # g0 = -(lr0 X)^T (D Z P), g2 = -(lr2 X)^T (D S), g1 = -(lr1 Hd)^T Y, each differentiated in its factors
        T = torch.mul(DZ, P, out=scratch("T", A))
        dX0 = T @ nG0.mT  # [P, C, K]: d(lr0 X)
        dX2 = torch.bmm(torch.mul(D, S, out=T), nG2.mT, out=scratch("dX2", X))
        Xs = torch.mul(X, lr0, out=scratch("Xs", X))
        dE = torch.bmm(Xs, nG0, out=scratch("dE", A))  # [P, C, F]: d(D Z P)
        dR = torch.bmm(torch.mul(X, lr2, out=Xs), nG2, out=scratch("dR", A))  # d(D S)
        Hd = torch.mul(S, Z, out=T)
        dHd = torch.bmm(Y, nG1.mT, out=scratch("dHd", A))  # d(lr1 Hd), times lr1 below
        dlr = torch.stack([torch.mul(X, dX0, out=Xs).sum(-1), torch.mul(Hd, dHd, out=scratch("dZ", A)).sum(-1),
                           torch.mul(X, dX2, out=Xs).sum(-1)], -1)  # [P, C, 3]
        dY = Hd.mul_(lr1) @ nG1  # [P, C, V]
        dHd.mul_(lr1)
        # through E = D Z P, R = D S, Hd = S Z, P = sig (1 + A - S), S = A sig, sig = sigmoid(A)
        dP = torch.mul(dE, DZ, out=T)
        dZ = torch.mul(dE, D, out=scratch("dZ", A)).mul_(P).addcmul_(dHd, S)
        dD = dE.mul_(Z).mul_(P).addcmul_(dR, S)
        dS = dR.mul_(D).addcmul_(dHd, Z).addcmul_(dP, sig, value=-1)
        dsig = torch.sub(A, S, out=DZ).add_(1).mul_(dP).addcmul_(dS, A)
        dA = dP.add_(dS).mul_(sig).addcmul_(dsig, S.copy_(sig).neg_().add_(1).mul_(sig))
        dY.baddbmm_(dD, W1)
        dX = dX0.mul_(lr0).addcmul_(dX2, lr2).baddbmm_(dA, W0.mT).baddbmm_(dZ, W2.mT)
        return X.mT @ dA, dD.mT @ Y, X.mT @ dZ, dX, dY, dlr, None


def chunk_update(weights, moments, norms, X, Y, lr, beta, use_muon: bool, renorm: bool, scratch: Scratch):
    """One chunk's update of (W0, W1, W2) [P, K, F], [P, F, V], [P, K, F] with momentum buffers `moments` (same
    shapes), from keys X [P, C, K], values Y [P, C, V], learning rates lr [P, C, 3] and momentum gate beta [P]
    (None: no momentum). `norms` [P, F], [P, V], [P, F] are the column norms renorm restores. Returns the new
    weights and momentum buffers."""
    grads = LaCTGradFunction.apply(*weights, X, Y, lr, scratch)
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
    N, Tp, H = qp.shape[:3]
    NC = Tp // C
    dtype = state[0].dtype

    def split(x):  # [N, Tp, H, *] -> NC chunks [N * H, C, *]: views for N == 1, else one copy per chunk
        if x is None:
            return None
        # split's backward concatenates the chunks' gradients once (indexing chunk by chunk would zero-fill
        # and accumulate a whole-sequence gradient per chunk)
        return [_heads_first(c.to(dtype).movedim(2, 1)) for c in x.split(C, 1)]

    mom_buffer = state.momentum if mp is not None else None
    q, k, v, lr, mom = (split(x) for x in (qp, kp, vp, lrp, mp))
    buffered = state.position.repeat_interleave(H)  # [N * H]
    if bool(buffered.any()):  # the open chunks' rows, in front of this call's tokens in chunk 0
        front = (torch.arange(C, device=qp.device)[None] < buffered[:, None])  # [N * H, C]
        for x, b in zip((k, v, lr, mom), (state.k, state.v, state.lr, mom_buffer)):
            if x is not None:
                b = _heads_first(b.movedim(2, 1))  # [N * H, C, *]
                x[0] = torch.where(front.view(*front.shape, *[1] * (b.dim() - 2)), b, x[0])
    weights = tuple(_heads_first(w) for w in state[0:3])
    moments = tuple(_heads_first(m) for m in state[3:6])
    norms = tuple(_heads_first(n) for n in state[6:9])
    complete = ((torch.arange(1, NC + 1, device=ends.device) * C)[None] <= ends[:, None])  # [N, NC]
    complete = complete.repeat_interleave(H, 0)  # [N * H, NC]
    n_updates = NC if need_final else NC - 1
    scratch = Scratch()
    outputs = []
    for j in range(NC):
        outputs.append(swiglu(q[j], *weights, scratch))  # [N * H, C, V]
        if j >= n_updates or not bool(complete[:, j].any()):
            continue
        kj, vj, lrj, mj = (None if x is None else x[j] for x in (k, v, lr, mom))
        beta = None if mj is None else mj.mean(-1)  # [N * H]: the chunk's mean momentum gate
        new = chunk_update(weights, moments, norms, kj, vj, lrj, beta, use_muon, renorm, scratch)
        if bool(complete[:, j].all()):
            weights, moments = new
        else:  # sequences whose chunk j is partial (or padding) keep their weights
            keep = complete[:, j, None, None]
            weights, moments = (tuple(torch.where(keep, x, y) for x, y in zip(xs, ys))
                                for xs, ys in zip(new, (weights, moments)))
    o = torch.cat([x.unflatten(0, (N, H)).movedim(1, 2) for x in outputs], 1)  # [N, Tp, H, V]
    final = tuple(w.unflatten(0, (N, H)) for w in (*weights, *moments))
    if not need_final:
        return o, final, None
    opened = []
    for x, b in zip((k, v, lr, mom), state[9:13]):
        opened.append(torch.zeros_like(b) if x is None else open_chunk(torch.stack(x, 1).unflatten(0, (N, H)), ends, C))
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
    N, H = q.shape[:2]
    dtype = state[0].dtype
    weights, moments, norms = state[0:3], state[3:6], state[6:9]
    scratch = Scratch()
    q = q.to(dtype).unsqueeze(2).flatten(0, 1)  # [N * H, 1, K]
    o = swiglu(q, *(_heads_first(w) for w in weights), scratch)  # [N * H, 1, V]
    position = state[13]
    at = (torch.arange(C, device=q.device)[None] == position[:, None])  # [N, C]: the token's row
    token = (k, v, lr, torch.zeros(N, H, dtype=dtype, device=q.device) if mom is None else mom)
    buffers = tuple(torch.where(at.view(N, C, *[1] * (b.dim() - 2)), t.to(dtype)[:, None], b)
                    for t, b in zip(token, state[9:13]))
    full = position + 1 == C  # [N]
    if bool(full.any()):
        kb, vb, lrb, mb = (_heads_first(b.movedim(2, 1)) for b in buffers)  # [N * H, C, *]
        beta = None if mom is None else mb.mean(-1)
        new_w, new_m = chunk_update(*((tuple(_heads_first(x) for x in xs)) for xs in (weights, moments, norms)),
                                    kb, vb, lrb, beta, use_muon, renorm, scratch)
        keep = full.view(N, 1, 1, 1)
        weights = tuple(torch.where(keep, x.unflatten(0, (N, H)), y) for x, y in zip(new_w, weights))
        moments = tuple(torch.where(keep, x.unflatten(0, (N, H)), y) for x, y in zip(new_m, moments))
        buffers = tuple(torch.where(full.view(N, *[1] * (b.dim() - 1)), torch.zeros_like(b), b) for b in buffers)
    return o.unflatten(0, (N, H))[:, :, 0], (*weights, *moments, *norms, *buffers, (position + 1) % C)
