"""Torch path of `ttt_mlp`: the dual form of mini-batch gradient descent applied layer by layer, the CPU
path, with a hand-written backward (`ttt_mlp_chunk_bwd.py`).

Sequences come padded to [N, Tp, H, *] so that mini-batches are the chunks of C tokens (eta = 0 in the
padding adds nothing to the sums). Per (sequence, head), chunk c with start weights (W1, b1, W2, b2), the
keys' forward and the closed-form inner gradients at those weights (rows are tokens, L = tril(ones)):

    Z1 = K W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2,  G2 = dl/dZ2 (through the LN),  G1 = (G2 W2^T) * gelu'(Z1)

Position i's weights are W1_i = W1 - s_i sum_{j<=i} eta_j k_j^T G1_j (b1_i likewise without k_j), so its first
layer is Q W1_i + b1_i = Q W1 + b1 - s * ((tril(Q K^T) + L) (eta G1)); with X2q = gelu(that), the second
layer follows in the same way from X2q and the keys' X2: X2q W2 + b2 - s * ((tril(X2q X2^T) + L) (eta G2)).
This is exact (each layer's weights at position i are linear in the gradient sums), and no [C, K, F]
per-position weights exist. The open mini-batch's sums S (chunk 0 only) enter as - s * (Q S_W1 + S_b1) and
- s * (X2q S_W2 + S_b2); the update at the chunk's end is theta - s_C (sums).

Only the keys' side and the update run chunk after chunk (they need the chunk's start weights, which need
the chunk before); each chunk's start weights go into one [NC + 1, ...] buffer, and the queries of all
chunks then run at once, as batched matmuls against it. Without a backward to save for,
`chunk_forward(segment_chunks=...)` runs the chunks in runs of a few, each from the weights the previous
one ended with: the working set is then that of one run.
"""

import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ipl_layers.ops.ttt_linear_chunk import LN_EPS, grid, ln_l2_grad, per_row, ungrid

GELU_C, GELU_A = math.sqrt(2 / math.pi), 0.044715


def gelu_and_slope(z: torch.Tensor):
    """The tanh-approximated GELU (as `F.gelu(approximate="tanh")`) and its derivative, in few ops (they run once
    per chunk): with u = tanh(c (z + a z^3)), gelu = z (1 + u) / 2 and
    gelu' = (1 + u) / 2 + (c / 2) z (1 - u^2) (1 + 3 a z^2)."""
    z2 = z * z
    u = torch.tanh(torch.addcmul(z, z2, z, value=GELU_A).mul_(GELU_C))
    half = torch.add(u, 1).mul_(0.5)  # (1 + u) / 2
    poly = torch.mul(z2, 3 * GELU_A).add_(1)  # 1 + 3 a z^2
    return z * half, torch.addcmul(half, torch.rsub(u * u, 1).mul_(z), poly, value=GELU_C / 2)


SEGMENT_CHUNKS = 16  # chunks per run of the inference forward: its working set is that of one run


class Saved(NamedTuple):
    """What the backward needs, chunk-major [NC, NH, ...] in the compute dtype."""

    qc: torch.Tensor  # [NC, NH, C, K]
    kc: torch.Tensor  # [NC, NH, C, K]
    t: torch.Tensor  # [NC, NH, C, K]: the target, v - k with the residual, else v
    e: torch.Tensor  # [NC, NH, C, 1]: eta
    P1: torch.Tensor  # [NC, NH, C, C]: tril(Q K^T) + tril(ones)
    thetas: List[torch.Tensor]  # W1, b1, W2, b2 at each chunk start and the end: [NC + 1, NH, ...]
    X2: torch.Tensor  # [NC, NH, C, F]: the keys' activations gelu(K W1 + b1)
    eG1: torch.Tensor  # [NC, NH, C, F]: eta times the keys' first-layer gradients
    eG2: torch.Tensor  # [NC, NH, C, K]
    Z1q: torch.Tensor  # [NC, NH, C, F]: the queries' first-layer pre-activations
    xo: Optional[torch.Tensor]  # [NC, NH, C, K]: the normalised output pre-activation (with LN)
    ro: Optional[torch.Tensor]  # [NC, NH, C, 1]: its 1 / sigma
    open_sums: List[torch.Tensor]  # the open mini-batch's sums before chunk 0, [NH, ...]
    gamma: torch.Tensor  # [NH, 1, K]
    beta: torch.Tensor  # [NH, 1, K]
    s: torch.Tensor  # [NH, C, 1]


def _run(qc, kc, tt, ec, P1, theta, open_sums, s, gamma_sq, use_ln, c0, wanted, kept):
    """Chunks c0.. of one run from the start weights `theta` (open_sums: chunk c0's open sums, or None): the
    keys' side and the update chunk after chunk, then the queries of all the run's chunks at once. Records
    (weights, sums) of the chunks in `wanted` into `kept`. Returns Z2q [NR, NH, C, K] and the run's thetas
    [NR + 1, NH, ...], X2, eG1, eG2 and Z1q."""
    NR, NH, C, K = qc.shape
    s_end = s[:, -1:]  # [NH, 1, 1]: every chunk but a sequence's last is full; nothing reads past that one
    thetas = [x.new_empty(NR + 1, *x.shape) for x in theta]
    for buf, x in zip(thetas, theta):
        buf[0] = x
    X2s, eG1s, eG2s = [], [], []
    for c, (k_c, e_c, t_c) in enumerate(zip(kc, ec, tt)):
        W1, b1, W2, b2 = (x[c] for x in thetas)
        X2, slope = gelu_and_slope(torch.baddbmm(b1, k_c, W1))  # [NH, C, F]
        Z2 = torch.baddbmm(b2, X2, W2)  # [NH, C, K]
        if use_ln:
            f = ln_l2_grad(Z2, t_c, gamma_sq)
            G2 = f.g * f.r
        else:
            G2 = Z2 - t_c
        eG2 = e_c * G2  # [NH, C, K]
        eG1 = (e_c * slope) * (G2 @ W2.mT)  # [NH, C, F]
        grads = [k_c.mT @ eG1, eG1.sum(1, keepdim=True), X2.mT @ eG2, eG2.sum(1, keepdim=True)]
        if c == 0 and open_sums is not None:
            grads = [g + S for g, S in zip(grads, open_sums)]
        if c0 + c in wanted:
            kept[c0 + c] = ([x[c] for x in thetas], grads)
        for buf, g in zip(thetas, grads):
            torch.addcmul(buf[c], s_end, g, value=-1, out=buf[c + 1])
        X2s.append(X2)
        eG1s.append(eG1)
        eG2s.append(eG2)
    X2, eG1, eG2 = torch.stack(X2s), torch.stack(eG1s), torch.stack(eG2s)
    del X2s, eG1s, eG2s

    # the queries, layer by layer, each chunk from its start weights: [NR, NH, C, *]
    W1, b1, W2, b2 = (x[:-1] for x in thetas)
    causal = P1.new_ones(C, C).tril_()
    Z1q = torch.matmul(qc, W1).add_(b1).sub_(s * (P1 @ eG1))
    if open_sums is not None:
        Z1q[0] -= s * (qc[0] @ open_sums[0] + open_sums[1])
    X2q = F.gelu(Z1q, approximate="tanh")
    P2 = (X2q @ X2.mT).tril_().add_(causal)  # [NR, NH, C, C]
    Z2q = torch.matmul(X2q, W2).add_(b2).sub_(s * (P2 @ eG2))
    if open_sums is not None:
        Z2q[0] -= s * (X2q[0] @ open_sums[2] + open_sums[3])
    return Z2q, thetas, X2, eG1, eG2, Z1q


def chunk_forward(q, k, v, eta, ln_weight, ln_bias, scale, weights, sums, last, C, use_ln, use_residual,
                  segment_chunks=None):
    """Padded inputs -> (o [N, Tp, H, K] in v.dtype, the state at chunk `last` per sequence as the 8 tensors
    W1, b1, W2, b2, sum_W1, sum_b1, sum_W2, sum_b2, and the `Saved` for the backward).

    q, k, v [N, Tp, H, K]; eta [N, Tp, H]; ln_weight, ln_bias [H, K]; scale [H, C]; weights (W1 [N, H, K, F],
    b1 [N, H, F], W2 [N, H, F, K], b2 [N, H, K]) and sums likewise (the open mini-batch before chunk 0); last
    [N] int64 in [0, NC]. segment_chunks: None, one run over all chunks, saved for the backward; else runs
    of that many chunks, nothing saved (Saved None): the inference forward."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, Tp, H, K = q.shape
    NC = Tp // C

    def chunked(x):  # [N, Tp, H, *] -> [NC, NH, C, *] in dt
        return grid(x.to(dt), C).flatten(1, 2)

    def rows(x):  # [N, H, *] -> [NH, 1 or *, *]: biases become one row that broadcasts over the tokens
        x = x.to(dt).flatten(0, 1)
        return x[:, None] if x.dim() == 2 else x

    qc, kc, vc, ec = chunked(q), chunked(k), chunked(v), chunked(eta[..., None])  # [NC, NH, C, K or 1]
    target = vc - kc if use_residual else vc
    gamma, beta = (per_row(x, N, dt)[:, None] for x in (ln_weight, ln_bias))  # [NH, 1, K]
    tt = (beta - target) * gamma if use_ln else target  # the inner gradient's target term
    s = per_row(scale, N, dt)[..., None]  # [NH, C, 1]
    theta = [rows(x) for x in weights]  # W1 [NH, K, F], b1 [NH, 1, F], W2 [NH, F, K], b2 [NH, 1, K]
    open_sums = [rows(x) for x in sums]
    # tril(Q K^T) plus the bias's cumsum (tril of ones), for all chunks at once: [NC, NH, C, C]
    P1 = (qc @ kc.mT).tril_().add_(qc.new_ones(C, C).tril_())
    wanted = {int(c) for c in last}  # the chunks some sequence's final state starts at
    kept = {}
    out = qc.new_empty(qc.shape)  # [NC, NH, C, K]
    step = segment_chunks or NC
    for r in range(0, NC, step):
        part = slice(r, r + step)
        out[part], thetas, X2, eG1, eG2, Z1q = _run(
            qc[part], kc[part], tt[part], ec[part], P1[part], theta, open_sums if r == 0 else None, s,
            gamma * gamma, use_ln, r, wanted, kept,
        )
        theta = [x[-1] for x in thetas]
    xo = ro = None
    if use_ln:
        xo, _, ro = torch.native_layer_norm(out, (K,), None, None, LN_EPS)
        out = torch.addcmul(beta, xo, gamma)
    o = ungrid(out + qc if use_residual else out, N).to(v.dtype)  # [N, Tp, H, K]

    # each sequence's state: the weights chunk last[n] starts from and that chunk's sums (zero past the end)
    kept[NC] = (theta, [torch.zeros_like(x) for x in theta])
    final = []
    for part in range(2):
        for i, shape in enumerate(w.shape for w in weights):
            rows_n = [kept[int(c)][part][i].unflatten(0, (N, H))[n] for n, c in enumerate(last)]
            final.append(torch.stack(rows_n).reshape(shape) if N else theta[i].new_zeros(shape))
    saved = None
    if segment_chunks is None:
        saved = Saved(qc, kc, target, ec, P1, thetas, X2, eG1, eG2, Z1q, xo, ro, open_sums, gamma, beta, s)
    return o, final, saved
