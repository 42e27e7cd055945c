"""Torch path of `ttt_linear`: the dual form of mini-batch gradient descent, the CPU path, with a hand-written
backward (`ttt_linear_chunk_bwd.py`).

Sequences come padded to [N, Tp, H, *] so that mini-batches are the chunks of C tokens (zero q/k/v and eta
in the padding: eta = 0 adds nothing to the weights' update). With bias, the bias is the last row of an
augmented weight matrix W = [W; b] ([K + 1, K]) and q, k get a ones column (q = [q, 1]), so one matmul
carries both. Per (sequence, head), chunk c with start weights W_c (positions i, j = 1..C, s_i the position
scales, S0 the open mini-batch's gradient sums before chunk 0):

    Z = K W_c,   G = dl/dZ (closed form through the layer norm, `ln_l2_grad`; Z - target without LN)
    acc_c = [c == 0] S0 + K^T (eta G),    W_{c+1} = W_c - s_C acc_c
    X = Q W_c - s * ([c == 0] Q S0 + tril(Q K^T) (eta G)),     o = LN(X) (+ q with the residual)

(with the ones columns, tril(Q K^T) (eta G) also carries the bias's cumsum of eta G), so no [C, K, K]
per-position weights exist. Only Z, G and the weight update run chunk after chunk (G depends on W_c
non-linearly; Q W_c comes from the same matmul as Z, [Q; K] W_c, while W_c is in cache); the tril(Q K^T)
products and the output layer norm run for all chunks at once. Everything runs chunk-major,
[NC, N * H, C, *], so each chunk's operands are one contiguous batch of N * H matrices. The loops run
many small ops: their count, not their FLOPs, is the cost on CPU (hence sums, not means, fused
addcmul/baddbmm, and out= buffers). Without a backward to save for, `chunk_forward(segment_chunks=...)`
runs the chunks in runs of a few, each from the weights the previous one ended with: the working set is
then that of one run.
"""

from typing import NamedTuple, Optional

import torch

LN_EPS = 1e-6


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LN over the last dim (biased variance, eps `LN_EPS`) with per-head weight/bias broadcast onto x."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdim=True)
    return xc * torch.rsqrt(var + LN_EPS) * weight + bias


class LNGrad(NamedTuple):
    """The inner gradient G = r g of 1/2 ||LN(z) - t||^2 and the intermediates its backward reuses."""

    x: torch.Tensor  # (z - mean z) r: [.., C, K]
    r: torch.Tensor  # 1 / sqrt(var z + eps): [.., C, 1]
    gx: torch.Tensor  # gamma (LN(z) - t), the gradient at x: [.., C, K]
    gxx: torch.Tensor  # sum(gx x) over the K features: [.., C, 1]
    g: torch.Tensor  # gx - mean(gx) - x mean(gx x) = G / r: [.., C, K]


def ln_l2_grad(z: torch.Tensor, target_term: torch.Tensor, gamma_sq: torch.Tensor) -> LNGrad:
    """d/dz of 1/2 ||LN(z) - t||^2 per row, in closed form: with x = (z - mean z) r, r = 1 / sqrt(var z + eps)
    and gx = gamma (gamma x + beta - t) the gradient at x, dl/dz = r (gx - mean(gx) - x mean(gx x)).

    target_term = gamma (beta - t) and gamma_sq = gamma^2 come precomputed, so that gx is one addcmul (this
    runs once per chunk in the sequential loops; a mean would be three ops, a sum is one)."""
    K = z.shape[-1]
    x, _, r = torch.native_layer_norm(z, (K,), None, None, LN_EPS)
    gx = torch.addcmul(target_term, x, gamma_sq)
    gxx = torch.linalg.vecdot(gx, x).unsqueeze_(-1)
    g = torch.sub(gx, gx.sum(-1, keepdim=True), alpha=1 / K).addcmul_(x, gxx, value=-1 / K)
    return LNGrad(x, r, gx, gxx, g)


def grid(x: torch.Tensor, C: int) -> torch.Tensor:
    """[N, Tp, H, *] -> a view [NC, N, H, C, *] (chunk-major; no copy)."""
    return x.unflatten(1, (x.shape[1] // C, C)).transpose(0, 1).movedim(3, 2)


def ungrid(x: torch.Tensor, N: int) -> torch.Tensor:
    """[NC, N * H, C, *] -> [N, NC * C, H, *] (a copy)."""
    NC, NH, C = x.shape[:3]
    return x.unflatten(1, (N, NH // N)).movedim(3, 2).transpose(0, 1).reshape(N, NC * C, NH // N, *x.shape[3:])


def per_row(x: torch.Tensor, N: int, dt: torch.dtype) -> torch.Tensor:
    """A per-head tensor [H, *] -> [N * H, *] in dt, matching the chunk-major batch (sequence-major heads)."""
    return x.to(dt).repeat(N, *([1] * (x.dim() - 1)))


def augmented(W: torch.Tensor, b: Optional[torch.Tensor], dt: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """W [N, H, K, K] and b [N, H, K] (or None) -> out [N * H, K (+ 1), K] = [W; b] in dt."""
    K = W.shape[-1]
    out[:, :K].copy_(W.reshape(-1, K, K))
    if b is not None:
        out[:, K].copy_(b.reshape(-1, K))
    return out


SEGMENT_CHUNKS = 16  # chunks per run of the inference forward: its working set is that of one run


class Saved(NamedTuple):
    """What the backward needs, all chunk-major [NC, N * H, ...] in the compute dtype."""

    qk: torch.Tensor  # [NC, NH, 2C, Ka]: rows q then k of each chunk (Ka = K + 1 with the ones column)
    target: torch.Tensor  # [NC, NH, C, K]: v - k with the residual, else v
    eta: torch.Tensor  # [NC, NH, C, 1]
    Ws: torch.Tensor  # [NC + 1, NH, Ka, K]: W_c, the weights each chunk starts from, and the final ones
    eG: torch.Tensor  # [NC, NH, C, K]: eta G
    xo: Optional[torch.Tensor]  # [NC, NH, C, K]: the normalised output pre-activation (with LN)
    ro: Optional[torch.Tensor]  # [NC, NH, C, 1]: its 1 / sigma (with LN)
    S0: torch.Tensor  # [NH, Ka, K]: the open mini-batch's gradient sums [sum_W0; sum_b0]
    gamma: torch.Tensor  # [NH, 1, K]
    beta: torch.Tensor  # [NH, 1, K]
    s: torch.Tensor  # [NH, C, 1]: the position scales


def _run(q, k, v, eta, gamma, beta, s, W_start, S0, C, use_ln, use_residual, o):
    """Chunks one after another from the start weights W_start [NH, Ka, K]: q, k, v [N, Tr, H, K], eta
    [N, Tr, H] (Tr a multiple of C); S0 [NH, Ka, K] the open sums of the run's first chunk, or None (zero).
    Writes o [N, Tr, H, K]; returns the chunk-major qk, target, eta, Ws, eG, xo, ro (as in `Saved`)."""
    dt, Ka = W_start.dtype, W_start.shape[1]
    N, Tr, H, K = q.shape
    NC, NH = Tr // C, N * H
    qk = q.new_empty(NC, NH, 2 * C, Ka, dtype=dt)
    qk[:, :, :C, :K].unflatten(1, (N, H)).copy_(grid(q, C))
    qk[:, :, C:, :K].unflatten(1, (N, H)).copy_(grid(k, C))
    if Ka > K:
        qk[..., K] = 1
    qa, ka = qk[:, :, :C], qk[:, :, C:]  # [NC, NH, C, Ka] each
    target = q.new_empty(NC, NH, C, K, dtype=dt)
    if use_residual:
        torch.sub(grid(v, C), ka[..., :K].unflatten(1, (N, H)), out=target.unflatten(1, (N, H)))
    else:
        target.unflatten(1, (N, H)).copy_(grid(v, C))
    e = q.new_empty(NC, NH, C, 1, dtype=dt)
    e[..., 0].unflatten(1, (N, H)).copy_(grid(eta, C))
    s_end = s[:, -1:]  # [NH, 1, 1]: every chunk but a sequence's last is full; nothing reads past that one

    Ws = q.new_empty(NC + 1, NH, Ka, K, dtype=dt)
    Ws[0] = W_start
    k_end = ka * s_end  # s_C K: the update W_{c+1} = W_c - (s_C K)^T (eta G) is one baddbmm
    eG = torch.empty_like(target)
    XZ = q.new_empty(NC, NH, 2 * C, K, dtype=dt)  # [Q W_c; K W_c] per chunk: one matmul on the fresh W_c
    if use_ln:
        inner_target = (beta - target).mul_(gamma)  # gamma (beta - t): [NC, NH, C, K]
        gamma_sq = gamma * gamma
    else:
        inner_target = target
    W_prev = W_start if S0 is None else W_start - s_end * S0  # chunk 0's update starts from W_0 - s_C S0
    for W_c, qk_c, XZ_c, t_c, e_c, eG_c, kend_c, W_next in zip(Ws, qk, XZ, inner_target, e, eG, k_end, Ws[1:]):
        torch.bmm(qk_c, W_c, out=XZ_c)
        Z = XZ_c[:, C:]  # [NH, C, K]
        if use_ln:
            f = ln_l2_grad(Z, t_c, gamma_sq)
            torch.mul(f.g, f.r * e_c, out=eG_c)
        else:
            torch.mul(Z.sub_(t_c), e_c, out=eG_c)  # (K W - t) eta
        W_prev = torch.baddbmm(W_prev, kend_c.mT, eG_c, alpha=-1, out=W_next)
    del k_end, W_prev, inner_target

    # all chunks at once: X = Q W_c - s (tril(Q K^T) eG), and chunk 0's open sums - s Q S0
    sP = torch.matmul(qa, ka.mT).tril_().mul_(s)  # [NC, NH, C, C]
    X = torch.baddbmm(XZ[:, :, :C].flatten(0, 1), sP.flatten(0, 1), eG.flatten(0, 1), alpha=-1).view_as(eG)
    if S0 is not None:
        X[0].baddbmm_(qa[0] * s, S0, alpha=-1)
    del sP
    xo = ro = None
    out = XZ[:, :, C:]  # the Z rows are free now: o in the compute dtype
    if use_ln:
        xo, _, ro = torch.native_layer_norm(X, (K,), None, None, LN_EPS)
        torch.addcmul(beta, xo, gamma, out=out)
    else:
        out.copy_(X)
    if use_residual:
        out += qa[..., :K]
    grid(o, C).copy_(out.unflatten(1, (N, H)))
    return qk, target, e, Ws, eG, xo, ro


def _state_at(last, c0, Ws, qk, eG, S0, W, acc):
    """Each sequence's state at the start of chunk last[n] where that is one of this run's chunks c0.. c0 + nr
    (nr = its chunk count; W at c0 + nr is the next run's start): writes the weights into W and that chunk's
    gradient sums (with S0 at chunk 0, zero after the final chunk) into acc, both [N, H, Ka, K]."""
    nr, NH, C2 = qk.shape[:3]
    N = last.shape[0]
    n = torch.arange(N, device=last.device)
    rel = last - c0
    inside = ((rel >= 0) & (rel <= nr))[:, None, None, None]
    at = rel.clamp(0, nr)
    W.copy_(torch.where(inside, Ws.unflatten(1, (N, NH // N))[at, n], W))
    at = at.clamp(max=nr - 1)
    run_acc = qk[:, :, C2 // 2:].unflatten(1, (N, NH // N))[at, n].mT @ eG.unflatten(1, (N, NH // N))[at, n]
    if S0 is not None:
        run_acc += (rel == 0)[:, None, None, None] * S0.unflatten(0, (N, NH // N))
    run_acc *= (rel < nr)[:, None, None, None]  # a sequence that ends on a chunk boundary has no open sums
    acc.copy_(torch.where(inside, run_acc, acc))


def chunk_forward(q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, last, C, use_ln,
                  use_residual, segment_chunks=None):
    """Padded inputs -> (o [N, Tp, H, K] in v.dtype, W, b, sum_W, sum_b at chunk `last` per sequence, Saved).

    q, k, v [N, Tp, H, K]; eta [N, Tp, H]; ln_weight, ln_bias [H, K]; scale [H, C]; W0, sum_W0 [N, H, K, K];
    b0, sum_b0 [N, H, K] or both None (no bias); last [N] int64 in [0, NC]. segment_chunks: None, one run
    over all chunks, saved for the backward; else runs of that many chunks, each from the weights the one
    before ended with, nothing saved (Saved is None): the inference forward."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, Tp, H, K = q.shape
    if Tp % C:
        raise ValueError(f"q: expected a padded length Tp that is a multiple of C = {C}, got Tp = {Tp}")
    NC, NH, bias = Tp // C, N * H, b0 is not None
    Ka = K + bias
    gamma, beta = (per_row(x, N, dt)[:, None] for x in (ln_weight, ln_bias))  # [NH, 1, K]
    s = per_row(scale, N, dt)[..., None]  # [NH, C, 1]
    W_start = augmented(W0, b0, dt, q.new_empty(NH, Ka, K, dtype=dt))
    S0 = augmented(sum_W0, sum_b0, dt, q.new_empty(NH, Ka, K, dtype=dt))
    o = v.new_empty(N, Tp, H, K)
    W, acc = q.new_zeros(N, H, Ka, K, dtype=dt), q.new_zeros(N, H, Ka, K, dtype=dt)
    step = (segment_chunks or NC) * C
    for t in range(0, Tp, step):
        run = [x[:, t:t + step] for x in (q, k, v, eta)]
        S0_run = S0 if t == 0 else None
        qk, target, e, Ws, eG, xo, ro = _run(*run, gamma, beta, s, W_start, S0_run, C, use_ln, use_residual,
                                             o[:, t:t + step])
        _state_at(last, t // C, Ws, qk, eG, S0_run, W, acc)
        W_start = Ws[-1]
    saved = None if segment_chunks else Saved(qk, target, e, Ws, eG, xo, ro, S0, gamma, beta, s)
    return (o, W[:, :, :K], W[:, :, K] if bias else None, acc[:, :, :K], acc[:, :, K] if bias else None,
            saved)


class TTTLinearChunkFunction(torch.autograd.Function):
    """The torch path on padded sequences [N, Tp, H, *] (Tp a multiple of the mini-batch size C), saving for
    its backward (without one, call `chunk_forward` with `segment_chunks=SEGMENT_CHUNKS`)."""

    @staticmethod
    def forward(ctx, q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, last, C, use_ln,
                use_residual):
        *outputs, saved = chunk_forward(q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, last,
                                        C, use_ln, use_residual)
        ctx.chunk_saved = saved  # intermediates (chunked operands, start weights, eta G), not inputs
        ctx.last, ctx.flags = last, (use_ln, use_residual)
        ctx.dtypes = [None if x is None else x.dtype
                      for x in (q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0)]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, do, dW, db, dsum_W, dsum_b):
        from ipl_layers.ops.ttt_linear_chunk_bwd import chunk_backward  # it imports this module's helpers

        saved = [ctx.chunk_saved]  # the backward empties the list and frees each tensor after its last use
        del ctx.chunk_saved
        grads = chunk_backward(saved, do, dW, db, dsum_W, dsum_b, ctx.last, *ctx.flags, ctx.dtypes)
        return (*grads, None, None, None, None)
